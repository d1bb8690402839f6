"""/api/v1/vms: HTTP only; rules in service.py."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from sendense.hub.backups.schemas import MAX_INT
from sendense.hub.deps import Admin, HubDep, Viewer
from sendense.hub.openapi import errors
from sendense.hub.vms import service
from sendense.hub.vms.schemas import DiscoverRequest, VmList, VmPage, VmRead, VmUpdate

router = APIRouter(prefix="/api/v1/vms", tags=["vms"])


@router.post("/discover", response_model=VmList, responses=errors(404, 409, 503))
def discover(body: DiscoverRequest, st: HubDep, who: Admin) -> dict:
    return {"vms": service.discover(st, body.source_id)}


@router.get("", response_model=VmPage, responses=errors())
def list_vms(
    st: HubDep,
    who: Viewer,
    limit: int | None = Query(
        default=None, ge=1, le=1000, description="a page of this many VMs (default: all of them)"
    ),
    offset: int = Query(default=0, ge=0, le=MAX_INT, description="VMs skipped before the page"),
    name: str | None = Query(
        default=None, max_length=200, description="only VMs whose name contains this (any case)"
    ),
) -> Response:
    """VMs by name with their disks and last completed backup; ``total``
    counts every VM the caller may see (matching ``name``). Large catalogs:
    page with ``limit`` and ``offset``."""
    return Response(
        service.list_vms_json(st, who, limit=limit, offset=offset, name=name),
        media_type="application/json",
    )


@router.get("/{vm_name}", response_model=VmRead, responses=errors(404))
def get_vm(vm_name: str, st: HubDep, who: Viewer) -> dict:
    return service.get_vm(st, who, vm_name)


@router.patch("/{vm_name}", response_model=VmRead, responses=errors(404))
def update_vm(vm_name: str, body: VmUpdate, st: HubDep, who: Admin) -> dict:
    """Set the VM's tags (replaced whole): policies select VMs by tag, and so
    do scoped tokens (``tag:key=value``), hence admin only."""
    return service.update_vm(st, who, vm_name, body.tags)
