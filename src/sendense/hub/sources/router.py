"""/api/v1/sources: HTTP only; rules in engine/inventory.py."""

from __future__ import annotations

from fastapi import APIRouter, Path

from sendense.hub.deps import Admin, HubDep, Viewer
from sendense.hub.openapi import errors
from sendense.hub.sources import service
from sendense.hub.sources.schemas import SourceCreate, SourceList, SourceRead, SourceRemoved

router = APIRouter(prefix="/api/v1/sources", tags=["sources"])


@router.post("", status_code=201, response_model=SourceRead, responses=errors(409, 413))
def create_source(body: SourceCreate, st: HubDep, who: Admin) -> dict:
    """Register a source. Credentials in ``config``, at any depth, are stored
    encrypted and never returned (``has_credentials``)."""
    return service.create_source(st, body)


@router.get("", response_model=SourceList, responses=errors())
def list_sources(st: HubDep, who: Viewer) -> dict:
    """Sources, configs without credentials (none for a scoped token)."""
    return {"sources": service.list_sources(st, who)}


@router.delete("/{source_id}", response_model=SourceRemoved, responses=errors(404, 409))
def delete_source(
    st: HubDep,
    who: Admin,
    source_id: str = Path(max_length=36, description="The source's id"),
) -> dict:
    """Remove a source and its VMs. 409 ``has_backups`` naming the VMs that
    have restore points, ``in_use`` while a job runs on one of its VMs."""
    return service.delete_source(st, source_id)
