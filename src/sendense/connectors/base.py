"""What every connector offers the node: discovery and a point-in-time view.

A connector turns a hypervisor's VM into NBD exports of a frozen view of all
its disks (taken in one step, before any byte moves), plus, per disk, the
meta context that lists what changed since a change id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class DiskInfo:
    index: int
    key: int
    label: str
    capacity_bytes: int
    path: str
    node_name: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "disk_index": self.index,
            "disk_key": self.key,
            "label": self.label,
            "capacity_bytes": self.capacity_bytes,
            "size_gb": round(self.capacity_bytes / 2**30, 3),
            "path": self.path,
            "node_name": self.node_name,
        }


@dataclass
class VmInfo:
    name: str
    path: str
    disks: list[DiskInfo]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "disks": [d.as_dict() for d in self.disks]}


@dataclass
class DiskView:
    """One disk of a frozen view, readable over NBD."""

    disk: DiskInfo
    nbd_url: str
    # ``qemu:dirty-bitmap:<id>`` for an incremental, None for a full read.
    dirty_context: str | None
    # Why an incremental was turned into a full read, if it was.
    fallback_reason: str | None = None
    new_change_id: str | None = None
    # The changed areas of an incremental, when the connector knows them itself
    # (VMware CBT) instead of through a meta context of the export: sorted,
    # non-overlapping (offset, length) pairs; everything else is unchanged.
    # None: the export's ``dirty_context`` says (or this is a full read).
    changed_extents: list[tuple[int, int]] | None = None

    @property
    def incremental(self) -> bool:
        """Only the changes since the previous change id are read."""
        return self.dirty_context is not None or self.changed_extents is not None


@dataclass
class PointInTime:
    views: list[DiskView] = field(default_factory=list)


class Connector(Protocol):
    def discover(self) -> list[VmInfo]: ...

    def freeze(
        self, vm_name: str, disk_keys: list[int], previous_change_ids: dict[int, str]
    ) -> PointInTime: ...

    def release(self, success: bool) -> None: ...
