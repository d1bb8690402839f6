"""VMs: the list (last backup, tags) and a VM's page (each disk's chain,
"back up now", tags)."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response

from sendense.console import queries
from sendense.console.page import Form, Signed, build, field_int
from sendense.console.render import quote
from sendense.core.errors import InvalidRequest
from sendense.hub.backups import service as backups
from sendense.hub.backups.schemas import BackupCreate
from sendense.hub.vms import service as vms
from sendense.hub.vms.schemas import VmUpdate

router = APIRouter()

PAGE = 50


@router.get("/vms", response_class=HTMLResponse)
def vm_list(
    page: Signed,
    q: str = Query(default="", max_length=200),
    offset: int = Query(default=0, ge=0),
) -> HTMLResponse:
    # One page: only its VMs, disks and last backups are read (a catalog
    # can hold thousands). ``q`` matches names and ``key=value`` tags.
    found = vms.list_vms(page.st, page.who, limit=PAGE, offset=offset, text=q or None)
    return page.render(
        "vms.html",
        policies=queries.policies_by_vm(page.st, page.who),
        vms=found["vms"],
        total=found["total"],
        offset=offset,
        limit=PAGE,
        q=q,
    )


@router.get("/vms/{vm_name:path}", response_class=HTMLResponse)
def vm_page(vm_name: str, page: Signed) -> HTMLResponse:
    vm = vms.get_vm(page.st, page.who, vm_name)
    chains = backups.chain(page.st, page.who, vm_name=vm_name)
    recent = backups.list_backups(
        page.st, page.who, backups.BackupFilter(vm_name=vm_name), limit=10, offset=0
    )
    repos = queries.repository_choices(page.st, page.who) if page.can("operator") else []
    return page.render(
        "vm.html",
        vm=vm,
        policies=queries.policies_by_vm(page.st, page.who).get(vm["name"], []),
        history=queries.vm_history(page.st, vm["vm_id"]),
        chains=chains["disks"],
        recent=recent["backups"],
        recent_total=recent["total"],
        repositories=repos,
    )


@router.post("/vms/{vm_name:path}/backup")
def back_up_now(vm_name: str, page: Signed, form: Form) -> Response:
    page.require("operator")
    body = build(
        BackupCreate,
        vm_name=vm_name,
        repository_id=form.get("repository_id", ""),
        backup_type=form.get("backup_type", "auto"),
        disk_id=field_int(form, "disk_id"),
    )
    started = backups.start_backup(page.st, page.who, body)
    return page.done(f"/ui/jobs/{quote(started['job_id'])}", f"Backup of {vm_name} started")


@router.post("/vms/{vm_name:path}/tags")
def set_tags(vm_name: str, page: Signed, form: Form) -> Response:
    """Replace the VM's tags (admin: policies and scoped tokens select by tag)."""
    page.require("admin")
    tags: dict[str, str] = {}
    for item in form.get("tags", "").replace("\n", ",").split(","):
        if item.strip():
            key, sep, value = item.strip().partition("=")
            if not sep:
                raise InvalidRequest(f"tag {item.strip()!r} is not key=value", field="tags")
            tags[key.strip()] = value.strip()
    body = build(VmUpdate, tags=tags)
    vms.update_vm(page.st, page.who, vm_name, body.tags)
    return page.done(f"/ui/vms/{quote(vm_name)}", "Tags saved")
