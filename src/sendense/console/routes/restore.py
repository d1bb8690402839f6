"""File restore in the browser (a restore session: partitions, directories,
files, archives), whole-disk restore, and NBD exports.

Downloads go through these routes (the session cookie authenticates them,
the API's routes want a bearer token) and answer exactly as the API does
(hub/restore/answers.py): the same session lookup, scope and path checks,
ETag, ranges, HEAD, and file and archive streams.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from sendense.console.page import Form, Signed, build
from sendense.console.render import quote
from sendense.hub.restore import answers
from sendense.hub.restore import service as restore
from sendense.hub.restore.schemas import RestoreCreate
from sendense.restore.fs.paths import has_raw_bytes, shown

router = APIRouter()

PAGE = 200
# Sorting by something else than the name reads the whole directory: up to here.
SORTABLE = 5000


@router.post("/backups/{backup_id}/mount")
def open_session(backup_id: str, page: Signed, form: Form) -> Response:
    page.require("operator")
    opened = restore.open_mount(page.st, page.who, backup_id)
    return page.done(f"/ui/restore/{quote(opened['mount_id'])}", "Restore session open")


@router.get("/restore", response_class=HTMLResponse)
def session_list(page: Signed) -> HTMLResponse:
    return page.render(
        "restore_sessions.html",
        sessions=restore.list_mounts(page.st, page.who, include_closed=False),
        exports=restore.list_exports(page.st, page.who),
    )


@router.get("/restore/{mount_id}", response_class=HTMLResponse)
def browse(
    mount_id: str,
    page: Signed,
    path: str = Query(default="/", max_length=4096),
    partition: int | None = Query(default=None, ge=0, le=1024),
    offset: int = Query(default=0, ge=0, le=10_000_000),
    sort: Literal["name", "size", "mtime"] = "name",
    order: Literal["asc", "desc"] = "asc",
    escaped: bool = False,
) -> HTMLResponse:
    page.require("operator")
    session = restore.get_mount(page.st, page.who, mount_id)
    readable = [p for p in session["partitions"] if p["filesystem"]]
    listing: dict[str, Any] | None = None
    note = None
    if session["status"] == "open" and (partition is not None or len(readable) == 1):
        fs, part = restore.session_fs(page.st, page.who, mount_id, partition)
        partition = part
        where = answers.fs_path(path, escaped)
        if sort == "name" and order == "asc":
            got = fs.list_dir(part, where, offset=offset, limit=PAGE)
            entries, total = list(got.entries), got.total
        else:
            got = fs.list_dir(part, where, offset=0, limit=SORTABLE)
            entries, total = list(got.entries), got.total
            if total > SORTABLE:
                note = f"this directory has {total} entries: sorted by name only"
                got = fs.list_dir(part, where, offset=offset, limit=PAGE)
                entries = list(got.entries)
            else:
                key = {
                    "name": lambda e: e.name,
                    "size": lambda e: (e.size, e.name),
                    "mtime": lambda e: (e.mtime_ns or 0, e.name),
                }[sort]
                entries = sorted(entries, key=key, reverse=order == "desc")
                entries = entries[offset : offset + PAGE]
        listing = {
            # Names that are not UTF-8 are shown escaped, as the API shows them.
            "path": shown(got.path),
            "escaped": has_raw_bytes(got.path),
            "entries": [answers.entry_view(e) for e in entries],
            "total": total,
        }
    return page.render(
        "restore_browse.html",
        s=session,
        readable=readable,
        partition=partition,
        listing=listing,
        offset=offset,
        limit=PAGE,
        sort=sort,
        order=order,
        note=note,
        crumbs=_crumbs(str(listing["path"]) if listing else path),
    )


def _crumbs(path: str) -> list[tuple[str, str]]:
    parts = [p for p in path.split("/") if p]
    out = [("/", "/")]
    for i, name in enumerate(parts):
        out.append((name, "/" + "/".join(parts[: i + 1])))
    return out


@router.api_route("/restore/{mount_id}/download", methods=["GET", "HEAD"])
def download(
    mount_id: str,
    request: Request,
    page: Signed,
    path: str = Query(max_length=4096),
    partition: int | None = Query(default=None, ge=0, le=1024),
    escaped: bool = False,
) -> Response:
    """The API's answer (restore/answers.py): ETag, ranges, HEAD, the first
    piece read before the answer starts."""
    page.require("operator")
    return answers.file_response(
        page.st,
        page.who,
        mount_id,
        partition,
        path,
        escaped=escaped,
        method=request.method,
        range_header=request.headers.get("range"),
        if_range=request.headers.get("if-range"),
    )


@router.get("/restore/{mount_id}/archive")
def archive(
    mount_id: str,
    page: Signed,
    path: str = Query(default="/", max_length=4096),
    partition: int | None = Query(default=None, ge=0, le=1024),
    format: Literal["zip", "tar.gz"] = "zip",
    escaped: bool = False,
) -> Response:
    page.require("operator")
    return answers.archive_response(
        page.st, page.who, mount_id, partition, path, escaped=escaped, format=format
    )


@router.post("/restore/{mount_id}/close")
def close_session(mount_id: str, page: Signed, form: Form) -> Response:
    page.require("operator")
    restore.close_mount(page.st, page.who, mount_id)
    return page.done("/ui/restore", "Restore session closed")


@router.post("/backups/{backup_id}/restore")
def restore_disk(backup_id: str, page: Signed, form: Form) -> Response:
    page.require("operator")
    body = build(
        RestoreCreate,
        backup_id=backup_id,
        destination={
            "type": "file",
            "path": form.get("path", "").strip(),
            "format": form.get("format") or "qcow2",
        },
    )
    started = restore.start_restore(page.st, page.who, body)
    return page.done(f"/ui/jobs/{quote(started['job_id'])}", "Whole-disk restore started")


@router.post("/backups/{backup_id}/export")
def start_export(backup_id: str, page: Signed, form: Form) -> Response:
    page.require("operator")
    export = restore.start_export(page.st, page.who, backup_id, form.get("writable") == "on")
    if export.get("tls_psk"):
        # Beyond loopback the export's key is in this answer only: show it
        # once (console pages are no-store) rather than redirect it away.
        return page.render("export_key.html", export=export, backup_id=backup_id)
    return page.done(f"/ui/backups/{quote(backup_id)}", "Export started")


@router.post("/backups/{backup_id}/export/close")
def close_export(backup_id: str, page: Signed, form: Form) -> Response:
    page.require("operator")
    restore.close_export(page.st, page.who, backup_id)
    return page.done(f"/ui/backups/{quote(backup_id)}", "Export stopped")
