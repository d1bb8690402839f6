"""Where restore points live in a repository, and their sidecars.

Layout (ARCHITECTURE "Storage format")::

    <repo>/<vm>/<disk-key>/<UTC stamp>-<full|incr>.qcow2
    <repo>/<vm>/<disk-key>/<UTC stamp>-<full|incr>.json     sidecar

A full has no backing file; an incremental's backing file is its parent's
file name (relative: the chain moves with its folder) with the backing format
set. The sidecar (format ``sendense-backup/1``) holds what the catalog needs
to re-import the restore point: ids, VM, disk, type, parent, change id,
digest, sizes and times.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

SIDECAR_FORMAT = "sendense-backup/1"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A VM name as a single safe path component."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or "vm"
    return cleaned[:200]


def backup_path(repo: Path, vm_name: str, disk_key: int, when: datetime, backup_type: str) -> Path:
    stamp = when.strftime("%Y%m%dT%H%M%S.%fZ")
    kind = "full" if backup_type == "full" else "incr"
    return repo / safe_name(vm_name) / str(disk_key) / f"{stamp}-{kind}.qcow2"


def sidecar_path(qcow2: Path) -> Path:
    return qcow2.with_suffix(".json")


def write_sidecar(qcow2: Path, data: dict[str, Any]) -> None:
    path = sidecar_path(qcow2)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": SIDECAR_FORMAT, **data}, indent=2, default=str))
    os.replace(tmp, path)


def remove_backup_files(qcow2: Path) -> None:
    for p in (qcow2, sidecar_path(qcow2)):
        p.unlink(missing_ok=True)
    # Drop empty disk/VM folders, never the repository itself.
    for folder in (qcow2.parent, qcow2.parent.parent):
        try:
            folder.rmdir()
        except OSError:
            break
