"""Backups (restore points): what the API takes and answers."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

MAX_INT = 2**31 - 1


class BackupCreate(BaseModel):
    vm_name: str = Field(min_length=1, max_length=200)
    repository_id: str = Field(min_length=1, max_length=36)
    backup_type: Literal["full", "incremental", "auto"] = "auto"
    disk_id: int | None = Field(default=None, ge=0, le=MAX_INT)
    tags: dict[str, Any] | None = None
    queue: bool = Field(
        default=False,
        description="When the VM already has a job: wait for it (the new job is queued, "
        'step "queued") instead of 409 disk_busy. A backup whose node is at its job '
        "limit is queued whatever this says.",
    )


class BackupRead(BaseModel):
    backup_id: str
    job_id: str
    vm_name: str | None
    vm_context_id: str
    disk_id: int
    disk_key: int
    repository_id: str
    backup_type: str
    status: str
    parent_backup_id: str | None
    file_path: str
    nbd_export_name: str
    total_bytes: int
    bytes_transferred: int
    size_on_disk: int
    change_id: str | None
    previous_change_id: str | None
    digest: str | None
    error: str | None
    tags: dict[str, Any]
    synthetic: bool
    verify_status: Literal["ok", "failed"] | None
    verified_at: datetime | None
    verify_error: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    immutable_until: datetime | None


class BackupList(BaseModel):
    backups: list[BackupRead]
    total: int


class ChainLink(BaseModel):
    backup_id: str
    backup_type: str
    parent_backup_id: str | None
    file_path: str
    size_on_disk: int
    bytes_transferred: int
    change_id: str | None
    synthetic: bool
    verify_status: str | None
    immutable_until: datetime | None
    created_at: datetime | None


class DiskChain(BaseModel):
    disk_id: int
    disk_key: int
    chain: list[ChainLink]
    chain_length: int
    total_size_bytes: int
    restore_points: int


class ChainRead(BaseModel):
    vm_name: str
    vm_context_id: str
    disks: list[DiskChain]


# ------------------------------------------------- delete, consolidate, verify


class BackupDeleted(BaseModel):
    """What a delete removed: the backups (newest first) and the bytes freed."""

    deleted: list[str]
    freed_bytes: int


class ConsolidateRequest(BaseModel):
    """Merge the oldest restore points so that at most ``keep`` remain:
    of each disk of ``vm_name`` (or of ``disk_id`` only), or of the chain
    that ``chain_id`` (the backup id of any of its restore points) is in."""

    vm_name: str | None = Field(default=None, min_length=1, max_length=200)
    disk_id: int | None = Field(default=None, ge=0, le=MAX_INT)
    chain_id: str | None = Field(default=None, min_length=1, max_length=36)
    keep: int = Field(ge=1, le=MAX_INT)

    @model_validator(mode="after")
    def one_target(self) -> ConsolidateRequest:
        if (self.vm_name is None) == (self.chain_id is None):
            raise ValueError("give either vm_name or chain_id")
        if self.chain_id is not None and self.disk_id is not None:
            raise ValueError("disk_id goes with vm_name (a chain is one disk's already)")
        return self


class PlanLink(BaseModel):
    backup_id: str
    file_path: str
    status: str


class DiskPlan(BaseModel):
    disk_id: int
    disk_key: int
    repository_id: str
    base: PlanLink
    new_base: PlanLink
    remove: list[PlanLink]
    kept: list[str]
    chain_length_before: int
    chain_length_after: int
    merge_bytes: int


class ConsolidatePlan(BaseModel):
    """A dry run's answer: what the job would do, per disk (none: nothing to merge)."""

    dry_run: bool
    vm_name: str
    keep: int
    disks: list[DiskPlan]
    backup_ids: list[str]
