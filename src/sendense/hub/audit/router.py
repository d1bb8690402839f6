"""/api/v1/audit: HTTP only; rules in service.py. Admin only."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query

from sendense.hub.audit import service
from sendense.hub.audit.schemas import AuditList
from sendense.hub.backups.schemas import MAX_INT
from sendense.hub.deps import Admin, HubDep
from sendense.hub.openapi import errors
from sendense.hub.validation import IsoDateTime

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


@router.get("", response_model=AuditList, responses=errors())
def list_audit(
    st: HubDep,
    who: Admin,
    token: str | None = Query(default=None, max_length=200, description="Token name"),
    route: str | None = Query(
        default=None, max_length=300, description="Route template, e.g. /api/v1/backups"
    ),
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] | None = None,
    status: int | None = Query(default=None, ge=100, le=599),
    since: IsoDateTime = None,
    until: IsoDateTime = None,
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=MAX_INT),
) -> dict:
    """Every mutating or refused request, newest first."""
    return service.list_entries(
        st,
        token=token,
        route=route,
        method=method,
        status=status,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )
