"""Jobs: what the API answers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from sendense.hub.backups.schemas import BackupRead


class JobError(BaseModel):
    code: str | None
    message: str


class RetryInfo(BaseModel):
    """A copy reconnecting (issue 11): the node's mover lost a connection to
    its source or target and tries again with backoff until ``deadline``
    (the job fails then); or the hub served a dead target again."""

    reason: str
    attempt: int
    since: datetime | None = None
    deadline: datetime | None = None


class JobDisk(BaseModel):
    disk_id: int
    disk_key: int
    backup_id: str
    backup_type: str
    status: str
    mode: str | None
    bytes_done: int
    bytes_total: int
    percent: float
    rate: float | None
    eta: float | None
    fallback_reason: str | None
    retry: RetryInfo | None = None


class JobRead(BaseModel):
    job_id: str
    kind: str
    status: str
    step: str
    vm_name: str | None
    vm_context_id: str | None
    repository_id: str | None
    node_id: str | None
    backup_type: str
    backups: list[str]
    disks: list[JobDisk]
    bytes_done: int
    bytes_total: int
    percent: float
    rate: float | None
    eta: float | None
    messages: list[Any]
    error: JobError | None
    params: dict[str, Any]
    result: dict[str, Any]
    created_by: str
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    elapsed_seconds: float | None
    tags: dict[str, Any]
    # Step "retrying": why, which attempt, since when, until when.
    retry: RetryInfo | None = None


class JobList(BaseModel):
    jobs: list[JobRead]
    total: int


class JobStarted(BaseModel):
    """A job was accepted (202): follow it at ``/api/v1/jobs/{job_id}``."""

    job_id: str
    status: str
    job: JobRead
    backups: list[BackupRead] = []
