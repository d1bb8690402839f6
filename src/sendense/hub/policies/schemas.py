"""Policies: what the API takes and answers (SPEC §7).

Field checks that need nothing but the body are here (400 naming the field);
those that need the catalog or the cron parser (repository, schedule, time
zone, a policy that keeps nothing) are in service.py, with the same 400.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from sendense.hub.vms.schemas import TagKey, TagValue

VmName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
HHMM = Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", examples=["22:00"])]
KEEP_MAX = 1_000_000
Keep = Annotated[StrictInt, Field(ge=-1, le=KEEP_MAX)]


class Selector(BaseModel):
    """The VMs a policy protects: each named one, and each carrying every tag given."""

    model_config = ConfigDict(extra="forbid")

    vms: list[VmName] = Field(default_factory=list, max_length=10_000)
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=50)


class Retention(BaseModel):
    """Restore points to keep (restic's GFS rules): 0 turns a rule off, -1 keeps every bucket."""

    model_config = ConfigDict(extra="forbid")

    keep_last: Keep = 0
    keep_hourly: Keep = 0
    keep_daily: Keep = 0
    keep_weekly: Keep = 0
    keep_monthly: Keep = 0
    keep_yearly: Keep = 0


class Window(BaseModel):
    """Local hours (in the policy's time zone) in which its jobs may start;
    ``start`` later than ``end`` wraps midnight."""

    model_config = ConfigDict(extra="forbid")

    start: HHMM
    end: HHMM


class PolicyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    enabled: StrictBool = True
    selector: Selector
    repository_id: str = Field(min_length=1, max_length=36)
    schedule: str = Field(
        min_length=1,
        max_length=200,
        description="cron, 5 fields: minute hour day-of-month month day-of-week",
        examples=["0 2 * * *"],
    )
    timezone: str = Field(default="UTC", min_length=1, max_length=100, examples=["Europe/Berlin"])
    full_every: StrictInt | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="Every nth run of a VM is a full (null: only the first, then incrementals)",
    )
    retention: Retention
    verify_after: StrictBool = False
    window: Window | None = None


class PolicyUpdate(BaseModel):
    """Fields to change; ``selector``, ``retention`` and ``window`` are replaced
    whole; ``full_every`` and ``window`` may be set to null."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        default=None, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$"
    )
    enabled: StrictBool | None = None
    selector: Selector | None = None
    repository_id: str | None = Field(default=None, min_length=1, max_length=36)
    schedule: str | None = Field(default=None, min_length=1, max_length=200)
    timezone: str | None = Field(default=None, min_length=1, max_length=100)
    full_every: StrictInt | None = Field(default=None, ge=1, le=10_000)
    retention: Retention | None = None
    verify_after: StrictBool | None = None
    window: Window | None = None


class JobOutcome(BaseModel):
    code: str | None
    message: str | None


class PolicyLastRun(BaseModel):
    """The newest run of the policy for one VM, and the job it started."""

    vm_name: str
    run_id: str
    trigger: str = Field(description="schedule, missed or manual")
    scheduled_at: datetime | None
    missed_count: int
    status: str = Field(
        description="queued, starting, started (backup running), verifying, retaining, "
        "done, failed (with reason) or skipped (superseded by a newer run)"
    )
    reason: str | None
    backup_type: str
    attempts: int
    job_id: str | None
    job_status: str | None = Field(description="the job's: pending, running, completed, ...")
    error: JobOutcome | None
    backup_ids: list[str] = Field(description="Restore points the backup job made (by disk)")
    verify_job_ids: list[str] = Field(description="verify_after: the verify jobs of those points")
    retention_job_id: str | None = Field(description="The retention job run after the backup")
    queued_at: datetime | None
    finished_at: datetime | None


class PolicyRead(BaseModel):
    policy_id: str
    name: str
    enabled: bool
    selector: Selector
    repository_id: str
    schedule: str
    schedule_description: str
    timezone: str
    full_every: int | None
    retention: Retention
    verify_after: bool
    window: Window | None
    created_by: str
    created_at: datetime | None
    updated_at: datetime | None
    last_scheduled_at: datetime | None
    next_runs: list[datetime] = Field(
        description="The next scheduled times in UTC (empty while disabled)"
    )
    matched_vms: list[str] = Field(description="VMs the selector matches now (those you may see)")


class PolicyDetail(PolicyRead):
    last_runs: list[PolicyLastRun] = Field(description="Per VM: the newest run and its job")


class PolicyList(BaseModel):
    policies: list[PolicyRead]
    total: int


class PolicyRunStarted(BaseModel):
    """The run was accepted (202): one backup job per matched VM that could start now."""

    model_config = ConfigDict(extra="allow")

    job_ids: list[str]


class KeptPoint(BaseModel):
    backup_id: str
    reasons: list[str]


class RemovedPoint(BaseModel):
    backup_id: str
    action: Literal["delete", "consolidate"]
    reason: str
    into: str | None = Field(default=None, description="consolidate: the point the run merges into")


class LockedPoint(BaseModel):
    backup_id: str
    reason: str
    immutable_until: datetime | None
    held_by: list[str]


class DiskPlan(BaseModel):
    disk_id: int | None
    keep: list[KeptPoint]
    remove: list[RemovedPoint]
    locked: list[LockedPoint]


class VmPlan(BaseModel):
    vm_name: str
    vm_id: str
    repository_id: str | None
    rules: dict[str, Any]
    timezone: str
    planned_at: datetime
    disks: list[DiskPlan]


class RetentionPlanRead(BaseModel):
    """What retention would keep and remove now (nothing changed)."""

    vms: list[VmPlan]


class VmRetentionJob(BaseModel):
    vm_name: str
    job_id: str | None = Field(description="null: nothing to remove for this VM")
    removes: int


class RetentionApplied(BaseModel):
    """Retention started (202): one ``retention`` job per VM with something to remove."""

    job_id: str | None = Field(description="The first job (null: nothing to remove anywhere)")
    job_ids: list[str]
    vms: list[VmRetentionJob]
