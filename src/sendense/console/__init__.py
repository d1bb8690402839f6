"""The web console (``/ui/``): server-rendered pages over the hub's services."""

from sendense.console.app import create_console

__all__ = ["create_console"]
