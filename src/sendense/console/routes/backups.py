"""Backups: list with the API's filters, a restore point's details, verify,
delete (409 reasons in words), consolidate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response

from sendense.console import queries
from sendense.console.page import Form, Signed, build, field_int
from sendense.console.render import quote
from sendense.core.errors import InvalidRequest, NotFound
from sendense.hub.backups import service as backups
from sendense.hub.backups.schemas import ConsolidateRequest
from sendense.hub.restore import service as restore

router = APIRouter()

PAGE = 50


@router.get("/backups", response_class=HTMLResponse)
def backup_list(
    page: Signed,
    vm_name: str = Query(default="", max_length=200),
    repository_id: str = Query(default="", max_length=36),
    backup_type: Literal["", "full", "incremental"] = "",
    status: Literal["", "pending", "running", "completed", "failed", "cancelled"] = "",
    verify_status: Literal["", "ok", "failed", "never"] = "",
    disk_id: int | None = Query(default=None, ge=0, le=1_000_000),
    since: str = Query(default="", max_length=40),
    until: str = Query(default="", max_length=40),
    offset: int = Query(default=0, ge=0, le=10_000_000),
) -> HTMLResponse:
    found = backups.list_backups(
        page.st,
        page.who,
        backups.BackupFilter(
            vm_name=vm_name or None,
            repository_id=repository_id or None,
            backup_type=backup_type or None,
            status=status or None,
            verify_status=verify_status or None,
            disk_index=disk_id,
            since=_day_start(since, "since"),
            until=_day_start(until, "until", next_day=True),
        ),
        limit=PAGE,
        offset=offset,
    )
    return page.render(
        "backups.html",
        recent=found["backups"],
        total=found["total"],
        offset=offset,
        limit=PAGE,
        f={
            "vm_name": vm_name,
            "repository_id": repository_id,
            "backup_type": backup_type,
            "status": status,
            "verify_status": verify_status,
            "disk_id": "" if disk_id is None else disk_id,
            "since": since,
            "until": until,
        },
        repositories=queries.repository_choices(page.st, page.who),
    )


def _day_start(text: str, name: str, *, next_day: bool = False) -> datetime | None:
    """A day (``2026-11-20``, the form's date field) or an ISO date-time, in
    UTC; ``until`` a day means up to the end of that day."""
    if not text.strip():
        return None
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{name} must be a date (2026-11-20)", field=name) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    if next_day and len(text.strip()) == 10:
        value += timedelta(days=1)
    return value


@router.get("/backups/{backup_id}", response_class=HTMLResponse)
def backup_page(backup_id: str, page: Signed) -> HTMLResponse:
    b = backups.get_backup(page.st, page.who, backup_id)
    export = None
    try:
        export = restore.get_export(page.st, page.who, backup_id)
    except NotFound:
        pass
    sessions = [
        m
        for m in restore.list_mounts(page.st, page.who, include_closed=False)
        if m["backup_id"] == backup_id
    ]
    return page.render(
        "backup.html",
        b=b,
        export=export,
        sessions=sessions,
        restore_dirs=[str(d) for d in page.st.settings.restore_directories],
    )


@router.post("/backups/{backup_id}/verify")
def verify(backup_id: str, page: Signed, form: Form) -> Response:
    page.require("operator")
    started = backups.verify_backup(page.st, page.who, backup_id)
    return page.done(f"/ui/jobs/{quote(started['job_id'])}", "Verification started")


@router.post("/backups/{backup_id}/delete")
def delete(backup_id: str, page: Signed, form: Form) -> Response:
    page.require("admin")
    b = backups.get_backup(page.st, page.who, backup_id)
    result = backups.delete_backup(
        page.st, page.who, backup_id, cascade=form.get("cascade") == "on"
    )
    gone = len(result.get("deleted") or result.get("backup_ids") or [backup_id])
    target = f"/ui/vms/{quote(b['vm_name'])}" if b.get("vm_name") else "/ui/backups"
    return page.done(target, f"Deleted {gone} restore point{'s' if gone != 1 else ''}")


@router.post("/backups/{backup_id}/consolidate")
def consolidate(backup_id: str, page: Signed, form: Form) -> Response:
    page.require("admin")
    body = build(ConsolidateRequest, chain_id=backup_id, keep=field_int(form, "keep"))
    started = backups.consolidate(page.st, page.who, body, dry_run=False)
    return page.done(f"/ui/jobs/{quote(started['job_id'])}", "Consolidation started")
