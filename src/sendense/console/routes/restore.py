"""File restore in the browser (a restore session: partitions, directories,
files, archives), whole-disk restore, and NBD exports.

Downloads go through these routes (the session cookie authenticates them,
the API's routes want a bearer token) and reuse the hub's restore service:
the same session lookup, scope and path checks, the same file and archive
streams.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import quote as url_quote

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from sendense.console.page import Form, Signed, build
from sendense.console.render import quote
from sendense.core.errors import NotADirectory, NotAFile
from sendense.hub.restore import service as restore
from sendense.hub.restore import streams
from sendense.hub.restore.schemas import RestoreCreate

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
) -> HTMLResponse:
    page.require("operator")
    session = restore.get_mount(page.st, page.who, mount_id)
    readable = [p for p in session["partitions"] if p["filesystem"]]
    listing: dict[str, Any] | None = None
    note = None
    if session["status"] == "open" and (partition is not None or len(readable) == 1):
        fs, part = restore.session_fs(page.st, page.who, mount_id, partition)
        partition = part
        if sort == "name" and order == "asc":
            got = fs.list_dir(part, path, offset=offset, limit=PAGE)
            entries, total = got.entries, got.total
        else:
            got = fs.list_dir(part, path, offset=0, limit=SORTABLE)
            entries, total = list(got.entries), got.total
            if total > SORTABLE:
                note = f"this directory has {total} entries: sorted by name only"
                got = fs.list_dir(part, path, offset=offset, limit=PAGE)
                entries = got.entries
            else:
                key = {
                    "name": lambda e: e.name,
                    "size": lambda e: (e.size, e.name),
                    "mtime": lambda e: (e.mtime_ns or 0, e.name),
                }[sort]
                entries = sorted(entries, key=key, reverse=order == "desc")
                entries = entries[offset : offset + PAGE]
        listing = {"path": got.path, "entries": entries, "total": total}
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


@router.get("/restore/{mount_id}/download")
def download(
    mount_id: str,
    page: Signed,
    path: str = Query(max_length=4096),
    partition: int | None = Query(default=None, ge=0, le=1024),
) -> Response:
    page.require("operator")
    fs, part = restore.session_fs(page.st, page.who, mount_id, partition)
    entry = fs.stat(part, path, follow=True)
    if entry.type != "file":
        raise NotAFile(f"{path} is a {entry.type}, not a file", path=path)
    return StreamingResponse(
        fs.iter_file(part, entry.path),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(entry.size),
            "Content-Disposition": f"attachment; filename*=UTF-8''{url_quote(entry.name)}",
        },
    )


@router.get("/restore/{mount_id}/archive")
def archive(
    mount_id: str,
    page: Signed,
    path: str = Query(default="/", max_length=4096),
    partition: int | None = Query(default=None, ge=0, le=1024),
    format: Literal["zip", "tar.gz"] = "zip",
) -> Response:
    page.require("operator")
    fs, part = restore.session_fs(page.st, page.who, mount_id, partition)
    root = fs.stat(part, path, follow=True)
    if root.type != "dir":
        raise NotADirectory(f"{path} is a {root.type}, not a directory", path=path)
    base = root.name or "root"
    if format == "zip":
        body, media, name = (
            streams.zip_stream(fs, part, root.path),
            "application/zip",
            base + ".zip",
        )
    else:
        body = streams.tar_gz_stream(fs, part, root.path)
        media, name = "application/gzip", base + ".tar.gz"
    return StreamingResponse(
        body,
        media_type=media,
        headers={"Content-Disposition": f"attachment; filename*=UTF-8''{url_quote(name)}"},
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
    restore.start_export(page.st, page.who, backup_id, form.get("writable") == "on")
    return page.done(f"/ui/backups/{quote(backup_id)}", "Export started")


@router.post("/backups/{backup_id}/export/close")
def close_export(backup_id: str, page: Signed, form: Form) -> Response:
    page.require("operator")
    restore.close_export(page.st, page.who, backup_id)
    return page.done(f"/ui/backups/{quote(backup_id)}", "Export stopped")
