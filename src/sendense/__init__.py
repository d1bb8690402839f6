"""Sendense: open, API-first backup for virtual machines."""

__version__ = "0.1.0"
