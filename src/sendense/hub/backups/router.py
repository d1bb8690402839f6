"""/api/v1/backups: HTTP only; rules in service.py.

Order matters: ``/chain`` and ``/{vm_name}/chain`` are declared before
``/{backup_id}`` so that the latter never swallows them.
"""

from __future__ import annotations

from typing import Any, Literal

import anyio
import anyio.to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from sendense.hub.backups import service
from sendense.hub.backups.schemas import (
    MAX_INT,
    BackupCreate,
    BackupDeleted,
    BackupList,
    BackupRead,
    ChainRead,
    ConsolidatePlan,
    ConsolidateRequest,
)
from sendense.hub.deps import Admin, HubDep, Operator, Viewer
from sendense.hub.jobs.schemas import JobStarted
from sendense.hub.openapi import errors
from sendense.hub.state import HubState
from sendense.hub.validation import IsoDateTime
from sendense.web.responses import FastJSON

router = APIRouter(prefix="/api/v1/backups", tags=["backups"])


# The launch (targets up, the node's start call: 0.1 s idle, 4-7 s on a
# loaded machine) runs on threads of its own, SENDENSE_LAUNCH_THREADS per
# process, never on the API's (SENDENSE_API_THREADS): 20 concurrent backups
# held all 4 of them before and reads queued behind (bench/load_bench.py).
def launch_limiter(request: Request, st: HubState) -> anyio.CapacityLimiter:
    """The app's launch limiter (made in its event loop, on first use)."""
    limiter: anyio.CapacityLimiter | None = getattr(request.app.state, "launch_limiter", None)
    if limiter is None:
        limiter = anyio.CapacityLimiter(max(1, st.settings.launch_threads))
        request.app.state.launch_limiter = limiter
    return limiter


@router.post("", status_code=202, response_model=JobStarted, responses=errors(404, 409, 503))
async def start_backup(request: Request, body: BackupCreate, st: HubDep, who: Operator) -> dict:
    """Start a backup job of a VM (all disks, or ``disk_id``).

    Answers once the job's targets are up and its node has accepted it (a
    node that cannot be reached: 503 naming it, the job on record as
    failed); a job that waits for a slot of its node answers at once (step
    ``queued``)."""
    return await anyio.to_thread.run_sync(
        service.start_backup, st, who, body, limiter=launch_limiter(request, st)
    )


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
    since: IsoDateTime = None,
    until: IsoDateTime = None,
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=MAX_INT),
) -> Any:
    """Restore points, newest first (ties broken by id: a stable order for paging)."""
    return FastJSON(
        service.list_backups(
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
    )


@router.get("/chain", response_model=ChainRead, responses=errors(404))
def chain_by_context(
    st: HubDep,
    who: Viewer,
    vm_context_id: str = Query(min_length=1, max_length=36),
    disk_id: int | None = Query(default=None, ge=0, le=MAX_INT),
    repository_id: str | None = Query(default=None, max_length=36),
) -> Any:
    return FastJSON(
        service.chain(st, who, vm_id=vm_context_id, disk_id=disk_id, repository_id=repository_id)
    )


@router.get("/{vm_name}/chain", response_model=ChainRead, responses=errors(404))
def chain_by_name(
    vm_name: str,
    st: HubDep,
    who: Viewer,
    disk_id: int | None = Query(default=None, ge=0, le=MAX_INT),
    repository_id: str | None = Query(default=None, max_length=36),
) -> Any:
    """Per disk, the chain full -> incr -> ... with sizes and backing backups."""
    return FastJSON(
        service.chain(st, who, vm_name=vm_name, disk_id=disk_id, repository_id=repository_id)
    )


@router.get("/{backup_id}", response_model=BackupRead, responses=errors(404))
def get_backup(backup_id: str, st: HubDep, who: Viewer) -> Any:
    return FastJSON(service.get_backup(st, who, backup_id))


# ------------------------------------------------- delete, consolidate, verify


@router.delete("/{backup_id}", response_model=BackupDeleted, responses=errors(404, 409))
def delete_backup(
    backup_id: str,
    st: HubDep,
    who: Admin,
    cascade: bool = Query(
        default=False, description="also delete every newer restore point that depends on it"
    ),
) -> dict:
    """Delete a restore point: its QCOW2, sidecar and record go together.

    409 ``has_dependents`` (``details.dependents``) unless ``cascade``;
    409 ``immutable`` (``details.immutable_until``); 409 ``in_use`` while a
    job or restore session holds it (or any backup of the cascade).
    """
    return service.delete_backup(st, who, backup_id, cascade=cascade)


@router.post(
    "/consolidate",
    status_code=202,
    response_model=JobStarted,
    responses={
        **errors(404, 409),
        200: {"model": ConsolidatePlan, "description": "``dry_run``: the plan, nothing done"},
    },
)
def consolidate(
    body: ConsolidateRequest,
    st: HubDep,
    who: Admin,
    dry_run: bool = Query(default=False, description="answer the plan (200) without running it"),
) -> Any:
    """Merge the oldest restore points of each disk's chain so that at most
    ``keep`` remain; the oldest remaining one becomes a synthetic full that
    keeps its ``backup_id``. Every remaining restore point reads as before."""
    result = service.consolidate(st, who, body, dry_run=dry_run)
    if dry_run:
        plan = ConsolidatePlan.model_validate(result)
        return JSONResponse(status_code=200, content=plan.model_dump(mode="json"))
    return result


@router.post(
    "/{backup_id}/verify",
    status_code=202,
    response_model=JobStarted,
    responses=errors(404, 409),
)
def verify_backup(backup_id: str, st: HubDep, who: Operator) -> dict:
    """Check a restore point: ``qemu-img check`` of its chain, then its digest
    recomputed through the chain. The outcome lands on the backup
    (``verify_status``, ``verified_at``, ``verify_error``)."""
    return service.verify_backup(st, who, backup_id)
