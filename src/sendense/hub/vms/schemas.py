"""VMs and their disks: what the API takes and answers."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from sendense.hub.backups.schemas import BackupRead


class DiscoverRequest(BaseModel):
    source_id: str = Field(min_length=1, max_length=36)


# No "=" in a key and no spaces: every tag can be named in a token's scope
# ("tag:key=value") and on the command line (key=value).
TagKey = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^=\s\x00-\x1f\x7f]+$")]
TagValue = Annotated[str, Field(max_length=256, pattern=r"^[^\s\x00-\x1f\x7f]*$")]


class VmUpdate(BaseModel):
    """``tags`` replaces the VM's tags (``{}`` removes them all)."""

    model_config = ConfigDict(extra="forbid")

    tags: dict[TagKey, TagValue] = Field(max_length=50, examples=[{"tier": "gold"}])


class DiskRead(BaseModel):
    disk_id: int = Field(description="0-based index of the disk in the VM")
    disk_key: int = Field(description="VMware-style key: 2000 + index for most sources")
    label: str
    capacity_bytes: int
    size_gb: float
    path: str


class VmRead(BaseModel):
    vm_id: str
    vm_context_id: str
    name: str
    source_id: str
    path: str
    tags: dict[str, str]
    discovered_at: datetime | None
    disks: list[DiskRead]
    last_backup: BackupRead | None


class VmList(BaseModel):
    vms: list[VmRead]


class VmPage(VmList):
    total: int = Field(description="How many VMs the caller may see (matching ``name``), all pages")
