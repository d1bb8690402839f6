"""/api/v1/repositories: HTTP only; rules in service.py."""

from __future__ import annotations

from fastapi import APIRouter

from sendense.hub.deps import HubDep, Viewer
from sendense.hub.openapi import errors
from sendense.hub.repositories import service
from sendense.hub.repositories.schemas import RepositoryList

router = APIRouter(prefix="/api/v1/repositories", tags=["repositories"])


@router.get("", response_model=RepositoryList, responses=errors())
def list_repositories(st: HubDep, who: Viewer) -> dict:
    return {"repositories": service.list_repositories(st, who)}
