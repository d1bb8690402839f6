"""/api/v1/vms: HTTP only; rules in service.py."""

from __future__ import annotations

from fastapi import APIRouter, Response

from sendense.hub.deps import Admin, HubDep, Viewer
from sendense.hub.openapi import errors
from sendense.hub.vms import service
from sendense.hub.vms.schemas import DiscoverRequest, VmList, VmRead, VmUpdate

router = APIRouter(prefix="/api/v1/vms", tags=["vms"])


@router.post("/discover", response_model=VmList, responses=errors(404, 409, 503))
def discover(body: DiscoverRequest, st: HubDep, who: Admin) -> dict:
    return {"vms": service.discover(st, body.source_id)}


@router.get("", response_model=VmList, responses=errors())
def list_vms(st: HubDep, who: Viewer) -> Response:
    """Every VM with its disks and last completed backup."""
    return Response(service.list_vms_json(st, who), media_type="application/json")


@router.get("/{vm_name}", response_model=VmRead, responses=errors(404))
def get_vm(vm_name: str, st: HubDep, who: Viewer) -> dict:
    return service.get_vm(st, who, vm_name)


@router.patch("/{vm_name}", response_model=VmRead, responses=errors(404))
def update_vm(vm_name: str, body: VmUpdate, st: HubDep, who: Admin) -> dict:
    """Set the VM's tags (replaced whole): policies select VMs by tag, and so
    do scoped tokens (``tag:key=value``), hence admin only."""
    return service.update_vm(st, who, vm_name, body.tags)
