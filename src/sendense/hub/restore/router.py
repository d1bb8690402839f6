"""/api/v1/restores and /api/v1/backups/{backup_id}/export: HTTP only."""

from __future__ import annotations

from fastapi import APIRouter

from sendense.hub.deps import HubDep, Operator, Viewer
from sendense.hub.jobs.schemas import JobStarted
from sendense.hub.openapi import errors
from sendense.hub.restore import service
from sendense.hub.restore.schemas import ExportCreate, ExportList, ExportRead, RestoreCreate

router = APIRouter(tags=["restore"])


@router.post(
    "/api/v1/restores",
    status_code=202,
    response_model=JobStarted,
    responses=errors(404, 409),
)
def start_restore(body: RestoreCreate, st: HubDep, who: Operator) -> dict:
    """Write a restore point out as a standalone image: a new QCOW2 or raw file
    inside SENDENSE_RESTORE_DIRS (never over an existing file), or into an NBD
    export. A job with progress; the chain is held (delete/merge 409) meanwhile."""
    return service.start_restore(st, who, body)


@router.post(
    "/api/v1/backups/{backup_id}/export",
    status_code=201,
    response_model=ExportRead,
    responses=errors(404, 409, 503),
)
def start_export(
    backup_id: str, st: HubDep, who: Operator, body: ExportCreate | None = None
) -> dict:
    """Serve a restore point over NBD (instant access): read-only, or writable
    through a throw-away overlay that never touches the backup. Answers once it
    serves (``url``); held until ``DELETE``."""
    return service.start_export(st, who, backup_id, bool(body and body.writable))


@router.get("/api/v1/backups/{backup_id}/export", response_model=ExportRead, responses=errors(404))
def get_export(backup_id: str, st: HubDep, who: Viewer) -> dict:
    return service.get_export(st, who, backup_id)


@router.delete(
    "/api/v1/backups/{backup_id}/export", response_model=ExportRead, responses=errors(404)
)
def close_export(backup_id: str, st: HubDep, who: Operator) -> dict:
    """Stop serving; a writable export's overlay is deleted."""
    return service.close_export(st, who, backup_id)


@router.get("/api/v1/exports", response_model=ExportList, responses=errors())
def list_exports(st: HubDep, who: Viewer) -> dict:
    """Restore points served over NBD right now."""
    return {"exports": service.list_exports(st, who)}
