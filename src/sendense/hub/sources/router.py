"""/api/v1/sources: HTTP only; rules in engine/inventory.py."""

from __future__ import annotations

from fastapi import APIRouter

from sendense.hub.deps import Admin, HubDep, Viewer
from sendense.hub.openapi import errors
from sendense.hub.sources import service
from sendense.hub.sources.schemas import SourceCreate, SourceList, SourceRead

router = APIRouter(prefix="/api/v1/sources", tags=["sources"])


@router.post("", status_code=201, response_model=SourceRead, responses=errors(409))
def create_source(body: SourceCreate, st: HubDep, who: Admin) -> dict:
    return service.create_source(st, body)


@router.get("", response_model=SourceList, responses=errors())
def list_sources(st: HubDep, who: Viewer) -> dict:
    return {"sources": service.list_sources(st)}
