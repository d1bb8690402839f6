"""CLI commands by resource: each module defines a ``typer.Typer()`` that
``cli/main.py`` registers."""
