"""/api/v1/backups: HTTP only; rules in service.py.

Order matters: ``/chain`` and ``/{vm_name}/chain`` are declared before
``/{backup_id}`` so that the latter never swallows them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Query

from sendense.hub.backups import service
from sendense.hub.backups.schemas import MAX_INT, BackupCreate, BackupList, BackupRead, ChainRead
from sendense.hub.deps import HubDep, Operator, Viewer
from sendense.hub.jobs.schemas import JobStarted
from sendense.hub.openapi import errors

router = APIRouter(prefix="/api/v1/backups", tags=["backups"])


@router.post("", status_code=202, response_model=JobStarted, responses=errors(404, 409, 503))
def start_backup(body: BackupCreate, st: HubDep, who: Operator) -> dict:
    """Start a backup job of a VM (all disks, or ``disk_id``)."""
    return service.start_backup(st, who, body)


@router.get("", response_model=BackupList, responses=errors())
def list_backups(
    st: HubDep,
    who: Viewer,
    vm_name: str | None = Query(default=None, max_length=200),
    vm_context_id: str | None = Query(default=None, max_length=36),
    repository_id: str | None = Query(default=None, max_length=36),
    backup_type: Literal["full", "incremental"] | None = None,
    status: Literal["pending", "running", "completed", "failed", "cancelled"] | None = None,
    verify_status: Literal["ok", "failed", "never"] | None = Query(
        default=None, description="``never``: not verified yet"
    ),
    disk_id: int | None = Query(default=None, ge=0, le=MAX_INT),
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=MAX_INT),
) -> dict:
    """Restore points, newest first (ties broken by id: a stable order for paging)."""
    return service.list_backups(
        st,
        who,
        service.BackupFilter(
            vm_name=vm_name,
            vm_id=vm_context_id,
            repository_id=repository_id,
            backup_type=backup_type,
            status=status,
            verify_status=verify_status,
            disk_index=disk_id,
            since=since,
            until=until,
        ),
        limit=limit,
        offset=offset,
    )


@router.get("/chain", response_model=ChainRead, responses=errors(404))
def chain_by_context(
    st: HubDep,
    who: Viewer,
    vm_context_id: str = Query(min_length=1, max_length=36),
    disk_id: int | None = Query(default=None, ge=0, le=MAX_INT),
    repository_id: str | None = Query(default=None, max_length=36),
) -> dict:
    return service.chain(st, who, vm_id=vm_context_id, disk_id=disk_id, repository_id=repository_id)


@router.get("/{vm_name}/chain", response_model=ChainRead, responses=errors(404))
def chain_by_name(
    vm_name: str,
    st: HubDep,
    who: Viewer,
    disk_id: int | None = Query(default=None, ge=0, le=MAX_INT),
    repository_id: str | None = Query(default=None, max_length=36),
) -> dict:
    """Per disk, the chain full -> incr -> ... with sizes and backing backups."""
    return service.chain(st, who, vm_name=vm_name, disk_id=disk_id, repository_id=repository_id)


@router.get("/{backup_id}", response_model=BackupRead, responses=errors(404))
def get_backup(backup_id: str, st: HubDep, who: Viewer) -> dict:
    return service.get_backup(st, who, backup_id)
