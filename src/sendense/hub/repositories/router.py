"""/api/v1/repositories: HTTP only; rules in service.py."""

from __future__ import annotations

from fastapi import APIRouter, Body, Path

from sendense.hub.deps import Admin, HubDep, Viewer
from sendense.hub.jobs.schemas import JobStarted
from sendense.hub.openapi import errors
from sendense.hub.repositories import service
from sendense.hub.repositories.schemas import (
    RepositoryCreate,
    RepositoryDeleted,
    RepositoryKeyExport,
    RepositoryList,
    RepositoryRead,
    RepositoryUpdate,
    RescanCreate,
)

router = APIRouter(prefix="/api/v1/repositories", tags=["repositories"])

RepositoryId = Path(min_length=1, max_length=36)


@router.post("", status_code=201, response_model=RepositoryRead, responses=errors(409, 503))
def create_repository(body: RepositoryCreate, st: HubDep, who: Admin) -> dict:
    """Create a repository (local, nfs or cifs); the folder is checked, made or mounted.

    ``encrypted: true``: every backup is a LUKS-encrypted QCOW2, fixed for the
    repository's life; 503 ``master_key_unavailable`` when the hub's master
    key file is missing while keys it wrapped exist."""
    return service.create_repository(st, who, body)


@router.get("", response_model=RepositoryList, responses=errors())
def list_repositories(st: HubDep, who: Viewer) -> dict:
    """Repositories with their capacity, the space their restore points use, and locks."""
    return {"repositories": service.list_repositories(st, who)}


@router.get("/{repository_id}", response_model=RepositoryRead, responses=errors(404))
def get_repository(st: HubDep, who: Viewer, repository_id: str = RepositoryId) -> dict:
    return service.get_repository(st, who, repository_id)


@router.patch("/{repository_id}", response_model=RepositoryRead, responses=errors(404, 409))
def update_repository(
    body: RepositoryUpdate, st: HubDep, who: Admin, repository_id: str = RepositoryId
) -> dict:
    """Change name, retention, immutability, config; the path only while empty."""
    return service.update_repository(st, who, repository_id, body)


@router.delete("/{repository_id}", response_model=RepositoryDeleted, responses=errors(404, 409))
def delete_repository(st: HubDep, who: Admin, repository_id: str = RepositoryId) -> dict:
    """Remove an empty repository's record (its folder and files stay)."""
    return service.delete_repository(st, who, repository_id)


@router.post(
    "/{repository_id}/rescan",
    status_code=202,
    response_model=JobStarted,
    responses=errors(404, 409, 503),
)
def rescan_repository(
    st: HubDep,
    who: Admin,
    repository_id: str = RepositoryId,
    body: RescanCreate | None = Body(default=None),
) -> dict:
    """Rebuild catalog records from the repository's files and sidecars, as a job."""
    return service.start_rescan(st, who, repository_id, body or RescanCreate())


@router.post(
    "/{repository_id}/key/export",
    response_model=RepositoryKeyExport,
    responses=errors(404, 409, 503),
)
def export_repository_key(st: HubDep, who: Admin, repository_id: str = RepositoryId) -> dict:
    """A recovery copy of an encrypted repository's key (the LUKS passphrase of
    its images). Keep it apart from the repository: with it, anyone holding the
    files reads the backups; without it and the master key, nobody does."""
    return service.export_key(st, who, repository_id)
