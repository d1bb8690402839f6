"""Restore: whole disks (disk.py), instant access over NBD (export.py), and
file-level restore sessions (fs/, the only place that imports dissect)."""
