"""Read a repository's restore points back from its files and sidecars.

The disaster-recovery half of the storage format (layout.py): the catalog
can be rebuilt from what is on disk. This module only reads files; the
``rescan`` job (``engine/rescan.py``) decides what goes into the catalog.

What is found, per disk folder ``<repo>/<vm>/<disk_key>/``::

    <stamp>-<kind>.qcow2 + <stamp>-<kind>.json (format sendense-backup/1)
                        a restore point: `Point`
    .qcow2 without a sidecar
                        not a restore point (a job that never completed, or
                        a crash before the sidecar's rename): reported
    sidecar without its .qcow2, unreadable sidecar, other format
                        reported, skipped

The parent of an incremental is read from two places that must agree: the
sidecar's ``parent_backup_id`` and the image's own header (its backing file
name, which is what ``qemu-img`` follows). When they disagree the image
wins, because it decides what the restore point reads as: the parent is the
point whose file is the backing file, and a problem is reported.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sendense.storage import layout

QCOW2_MAGIC = b"QFI\xfb"


@dataclass
class Point:
    """One restore point as its files describe it."""

    path: Path
    sidecar: dict[str, Any]
    backing_file: str | None  # from the image header (a name relative to its folder)
    size_on_disk: int
    encrypted: bool = False  # the image header names an encryption (LUKS)

    @property
    def backup_id(self) -> str:
        return str(self.sidecar["backup_id"])

    @property
    def job_id(self) -> str:
        return str(self.sidecar.get("job_id") or self.sidecar["backup_id"])

    @property
    def vm_name(self) -> str:
        return str(self.sidecar["vm_name"])

    @property
    def disk_id(self) -> int:
        return int(self.sidecar["disk_id"])

    @property
    def disk_key(self) -> int:
        return int(self.sidecar["disk_key"])

    @property
    def created_at(self) -> datetime:
        return parse_time(self.sidecar.get("created_at")) or datetime.fromtimestamp(
            self.path.stat().st_mtime, UTC
        )

    @property
    def finished_at(self) -> datetime | None:
        return parse_time(self.sidecar.get("finished_at"))


@dataclass
class Scan:
    points: list[Point] = field(default_factory=list)
    # {"path", "problem"}: what was found but is not a restore point.
    problems: list[dict[str, str]] = field(default_factory=list)


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def qcow2_backing_file(path: str | Path) -> str | None:
    """The backing file name in a QCOW2 header (qcow2.txt: bytes 8-19), or None.

    Read directly (no ``qemu-img info`` process per file): a repository may
    hold many thousands of restore points.
    """
    with open(path, "rb") as f:
        header = f.read(20)
        if len(header) < 20 or header[:4] != QCOW2_MAGIC:
            raise ValueError(f"{path} is not a QCOW2 image")
        offset, size = struct.unpack(">QI", header[8:20])
        if offset == 0 or size == 0:
            return None
        if size > 1023:  # QEMU's own limit
            raise ValueError(f"{path}: backing file name too long ({size})")
        f.seek(offset)
        return f.read(size).decode("utf-8", errors="replace")


def qcow2_encrypted(path: str | Path) -> bool:
    """Does the QCOW2 header name an encryption (qcow2.txt: ``crypt_method``,
    bytes 32-35: 0 none, 1 AES-CBC (legacy), 2 LUKS)?"""
    with open(path, "rb") as f:
        header = f.read(36)
    if len(header) < 36 or header[:4] != QCOW2_MAGIC:
        raise ValueError(f"{path} is not a QCOW2 image")
    (method,) = struct.unpack(">I", header[32:36])
    return bool(method)


REQUIRED = ("backup_id", "vm_name", "disk_id", "disk_key", "backup_type")


def read_point(qcow2: Path) -> Point | str:
    """The restore point of ``qcow2``, or why it is not one."""
    sidecar = layout.sidecar_path(qcow2)
    try:
        data = json.loads(sidecar.read_text())
    except FileNotFoundError:
        return "image without a sidecar (not a completed restore point)"
    except (OSError, ValueError) as e:
        return f"sidecar unreadable: {e}"
    if not isinstance(data, dict) or data.get("format") != layout.SIDECAR_FORMAT:
        return f"sidecar format is not {layout.SIDECAR_FORMAT}"
    missing = [k for k in REQUIRED if data.get(k) in (None, "")]
    if missing:
        return f"sidecar lacks {', '.join(missing)}"
    if data["backup_type"] not in ("full", "incremental"):
        return f"sidecar backup_type {data['backup_type']!r} is unknown"
    try:
        int(data["disk_id"]), int(data["disk_key"])
        backing = qcow2_backing_file(qcow2)
        encrypted = qcow2_encrypted(qcow2)
        size = sum(os.stat(p).st_blocks * 512 for p in (qcow2, sidecar))
    except (OSError, ValueError) as e:
        return f"image unreadable: {e}"
    return Point(
        path=qcow2, sidecar=data, backing_file=backing, size_on_disk=size, encrypted=encrypted
    )


def scan(repo: Path) -> Scan:
    """Every restore point under ``repo`` (``<vm>/<disk_key>/*.qcow2``), oldest first."""
    out = Scan()
    for qcow2 in sorted(repo.glob("*/*/*.qcow2")):
        found = read_point(qcow2)
        if isinstance(found, str):
            out.problems.append({"path": str(qcow2), "problem": found})
        else:
            out.points.append(found)
    for sidecar in sorted(repo.glob("*/*/*.json")):
        if not sidecar.with_suffix(".qcow2").exists():
            out.problems.append({"path": str(sidecar), "problem": "sidecar without its image"})
    out.points.sort(key=lambda p: (p.created_at, p.path.name))
    return out


def order_by_parent(
    points: list[Point],
) -> tuple[list[tuple[Point, Point | None]], list[dict[str, str]]]:
    """Pair each point with its parent, parents listed before their children.

    The parent is the point in the same folder whose file name is the
    image's backing file. An incremental whose backing file is not a restore
    point of this scan is left out, and so is everything above it: its chain
    is broken on disk.
    """
    by_file = {(p.path.parent, p.path.name): p for p in points}
    problems: list[dict[str, str]] = []
    parent_of: dict[str, Point | None] = {}
    broken: dict[str, str] = {}
    for p in points:
        parent = None
        if p.backing_file:
            name = p.backing_file
            parent = by_file.get((p.path.parent, name))
            if parent is None or os.path.dirname(name) not in ("", "."):
                broken[p.backup_id] = f"backing file {name} is not a restore point of its folder"
                continue
            said = p.sidecar.get("parent_backup_id")
            if said and said != parent.backup_id:
                problems.append(
                    {
                        "path": str(p.path),
                        "problem": f"sidecar names parent {said} but the image reads through "
                        f"{parent.backup_id}; the image wins",
                    }
                )
        parent_of[p.backup_id] = parent
    pairs: list[tuple[Point, Point | None]] = []
    placed: set[str] = set()

    def place(p: Point, seen: frozenset[str]) -> bool:
        if p.backup_id in placed:
            return True
        if p.backup_id in broken:
            return False
        if p.backup_id in seen:
            broken[p.backup_id] = "backing chain has a cycle"
            return False
        parent = parent_of[p.backup_id]
        if parent is not None and not place(parent, seen | {p.backup_id}):
            broken.setdefault(p.backup_id, f"its parent {parent.path.name} was skipped")
            return False
        pairs.append((p, parent))
        placed.add(p.backup_id)
        return True

    for p in points:
        place(p, frozenset())
    for p in points:
        if p.backup_id in broken:
            problems.append({"path": str(p.path), "problem": f"{broken[p.backup_id]}; skipped"})
    return pairs, problems
