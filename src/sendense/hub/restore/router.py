"""/api/v1/restores, /api/v1/backups/{backup_id}/export and
/api/v1/restore/mounts (file-level restore sessions): HTTP only."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from typing import Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from sendense.core.errors import NotADirectory, NotAFile
from sendense.hub.backups.schemas import MAX_INT
from sendense.hub.deps import HubDep, Operator, Viewer
from sendense.hub.jobs.schemas import JobStarted
from sendense.hub.openapi import errors
from sendense.hub.restore import service, streams
from sendense.hub.restore.schemas import (
    ExportCreate,
    ExportList,
    ExportRead,
    FileEntry,
    FileListing,
    MountCreate,
    MountList,
    MountRead,
    RestoreCreate,
)
from sendense.restore.fs.models import FsEntry
from sendense.restore.fs.paths import escape, has_raw_bytes, shown, unescape

router = APIRouter(tags=["restore"])


@router.post(
    "/api/v1/restores",
    status_code=202,
    response_model=JobStarted,
    responses=errors(404, 409),
)
def start_restore(body: RestoreCreate, st: HubDep, who: Operator) -> dict:
    """Write a restore point out as a standalone image: a new QCOW2 or raw file
    inside SENDENSE_RESTORE_DIRS (never over an existing file), or into an NBD
    export. A job with progress; the chain is held (delete/merge 409) meanwhile."""
    return service.start_restore(st, who, body)


@router.post(
    "/api/v1/backups/{backup_id}/export",
    status_code=201,
    response_model=ExportRead,
    responses=errors(404, 409, 503),
)
def start_export(
    backup_id: str, st: HubDep, who: Operator, body: ExportCreate | None = None
) -> dict:
    """Serve a restore point over NBD (instant access): read-only, or writable
    through a throw-away overlay that never touches the backup. Answers once it
    serves (``url``); held until ``DELETE``."""
    return service.start_export(st, who, backup_id, bool(body and body.writable))


@router.get("/api/v1/backups/{backup_id}/export", response_model=ExportRead, responses=errors(404))
def get_export(backup_id: str, st: HubDep, who: Viewer) -> dict:
    return service.get_export(st, who, backup_id)


@router.delete(
    "/api/v1/backups/{backup_id}/export", response_model=ExportRead, responses=errors(404)
)
def close_export(backup_id: str, st: HubDep, who: Operator) -> dict:
    """Stop serving; a writable export's overlay is deleted."""
    return service.close_export(st, who, backup_id)


@router.get("/api/v1/exports", response_model=ExportList, responses=errors())
def list_exports(st: HubDep, who: Viewer) -> dict:
    """Restore points served over NBD right now."""
    return {"exports": service.list_exports(st, who)}


# ------------------------------------------------------- restore sessions

PathQ = Query(default="/", max_length=4096, description="absolute path inside the filesystem")
PartitionQ = Query(
    default=None, ge=0, le=1024, description="partition index (default: the only filesystem)"
)
EscapedQ = Query(
    default=False,
    description="path is in the escaped form of an entry with escaped=true "
    "(%XX = the byte XX, %25 = '%')",
)


def fs_path(path: str, escaped: bool) -> str:
    """The path as the filesystem worker takes it (raw bytes of a name that
    is not UTF-8 as surrogates, see restore/fs/paths.py)."""
    return unescape(path) if escaped else path


@router.post(
    "/api/v1/restore/mounts",
    status_code=201,
    response_model=MountRead,
    responses=errors(404, 409, 503),
)
def open_mount(body: MountCreate, st: HubDep, who: Operator) -> dict:
    """Open a restore session on a restore point: its chain served read-only on
    a private socket and read in user space (no root, nothing mounted).
    Answers with the partitions and filesystems found."""
    return service.open_mount(st, who, body.backup_id)


@router.get("/api/v1/restore/mounts", response_model=MountList, responses=errors())
def list_mounts(
    st: HubDep,
    who: Viewer,
    include_closed: bool = Query(default=False, description="also sessions that ended"),
) -> dict:
    return {"mounts": service.list_mounts(st, who, include_closed=include_closed)}


@router.get("/api/v1/restore/mounts/{mount_id}", response_model=MountRead, responses=errors(404))
def get_mount(mount_id: str, st: HubDep, who: Viewer) -> dict:
    return service.get_mount(st, who, mount_id)


@router.delete("/api/v1/restore/mounts/{mount_id}", response_model=MountRead, responses=errors(404))
def close_mount(mount_id: str, st: HubDep, who: Operator) -> dict:
    """Close the session (its qemu-nbd and filesystem workers stop)."""
    return service.close_mount(st, who, mount_id)


def _entry(e: FsEntry) -> dict[str, Any]:
    """An entry as the API shows it: names that are not UTF-8 (and so their
    paths, and a link's target that is not) escaped, with ``escaped``."""
    escaped = has_raw_bytes(e.path) or has_raw_bytes(e.target or "")
    show = escape if escaped else str
    return {
        "name": show(e.name),
        "path": show(e.path),
        "escaped": escaped,
        "type": e.type,
        "size": e.size,
        "mode": e.mode,
        "uid": e.uid,
        "gid": e.gid,
        "mtime": e.mtime,
        "target": None if e.target is None else show(e.target),
    }


@router.get(
    "/api/v1/restore/mounts/{mount_id}/files", response_model=FileListing, responses=errors(404)
)
def list_files(
    mount_id: str,
    st: HubDep,
    who: Operator,
    path: str = PathQ,
    partition: int | None = PartitionQ,
    offset: int = Query(default=0, ge=0, le=MAX_INT),
    limit: int = Query(default=1000, ge=1, le=10000),
    show_system: bool = Query(default=False, description="NTFS: also $ system files"),
    escaped: bool = EscapedQ,
) -> dict:
    """A directory, sorted by name, paged (``total`` entries in all). A name
    that is not UTF-8 is shown escaped (``escaped``: raw bytes as ``%XX``, ``%``
    as ``%25``); pass such a ``path`` back with ``escaped=true``."""
    fs, part = service.session_fs(st, who, mount_id, partition)
    page = fs.list_dir(
        part, fs_path(path, escaped), offset=offset, limit=limit, show_system=show_system
    )
    return {
        "path": shown(page.path),
        "escaped": has_raw_bytes(page.path),
        "partition": part,
        "entries": [_entry(e) for e in page.entries],
        "total": page.total,
        "offset": page.offset,
        "limit": limit,
    }


@router.get(
    "/api/v1/restore/mounts/{mount_id}/files/info", response_model=FileEntry, responses=errors(404)
)
def file_info(
    mount_id: str,
    st: HubDep,
    who: Operator,
    path: str = PathQ,
    partition: int | None = PartitionQ,
    escaped: bool = EscapedQ,
) -> dict:
    fs, part = service.session_fs(st, who, mount_id, partition)
    return _entry(fs.stat(part, fs_path(path, escaped)))


def _ranges(header: str | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=a-b`` range (a suffix ``-n`` too) -> (start, end inclusive);
    None: the whole file. 416 when it cannot be satisfied."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None  # not understood or several ranges: the whole file (RFC 9110 allows it)
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":  # the last n bytes
            n = int(last)
            if n <= 0 or size == 0:
                raise RangeNotSatisfiable(size)
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start < 0 or (last and end < start):
        return None  # not a valid range: ignored (RFC 9110 14.2), the whole file
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, min(end, size - 1)


class RangeNotSatisfiable(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


@router.head("/api/v1/restore/mounts/{mount_id}/download", include_in_schema=False)
@router.get(
    "/api/v1/restore/mounts/{mount_id}/download",
    responses={
        **errors(404),
        200: {"content": {"application/octet-stream": {}}, "description": "the file"},
        206: {"description": "the requested range"},
        416: {"description": "range not satisfiable"},
    },
    response_class=StreamingResponse,
)
def download(
    mount_id: str,
    request: Request,
    st: HubDep,
    who: Operator,
    path: str = PathQ,
    partition: int | None = PartitionQ,
    escaped: bool = EscapedQ,
) -> Response:
    """A file, streamed, with Content-Length, ETag and single-range requests
    (206). HEAD answers the same headers without reading the file."""
    fs, part = service.session_fs(st, who, mount_id, partition)
    entry = fs.stat(part, fs_path(path, escaped), follow=True)
    if entry.type != "file":
        raise NotAFile(f"{path} is a {entry.type}, not a file", path=path)
    etag = (
        '"'
        + hashlib.sha256(
            f"{mount_id}:{part}:{entry.path}:{entry.size}:{entry.mtime_ns}".encode(
                "utf-8", "surrogateescape"
            )
        ).hexdigest()[:32]
        + '"'
    )
    name = quote(shown(entry.name))
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Disposition": f"attachment; filename*=UTF-8''{name}",
    }
    if_range = request.headers.get("if-range")
    try:
        wanted = (
            None
            if if_range and if_range != etag
            else _ranges(request.headers.get("range"), entry.size)
        )
    except RangeNotSatisfiable as e:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{e.size}"})
    head = request.method == "HEAD"
    if wanted is None:
        headers["Content-Length"] = str(entry.size)
        if head:
            return Response(media_type="application/octet-stream", headers=headers)
        return StreamingResponse(
            _first_read(service.streaming(st, mount_id, fs.iter_file(part, entry.path))),
            media_type="application/octet-stream",
            headers=headers,
        )
    start, end = wanted
    headers["Content-Length"] = str(end - start + 1)
    headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
    if head:
        return Response(status_code=206, media_type="application/octet-stream", headers=headers)
    return StreamingResponse(
        _first_read(
            service.streaming(
                st, mount_id, fs.iter_file(part, entry.path, offset=start, length=end - start + 1)
            )
        ),
        status_code=206,
        media_type="application/octet-stream",
        headers=headers,
    )


def _first_read(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """The first piece read before the answer starts: a file the parser
    cannot read (corrupt, a looping chain, a limit hit) is an error answer
    (409 ``filesystem_corrupt`` / ``parser_limit``), not a 200 cut short. A
    failure further on can only end the stream early (Content-Length tells
    the client)."""
    first = next(pieces, None)
    if first is None:
        return iter(())
    return itertools.chain((first,), pieces)


@router.get(
    "/api/v1/restore/mounts/{mount_id}/download-directory",
    responses={
        **errors(404),
        200: {"content": {"application/zip": {}, "application/gzip": {}}, "description": "archive"},
    },
    response_class=StreamingResponse,
)
def download_directory(
    mount_id: str,
    st: HubDep,
    who: Operator,
    path: str = PathQ,
    partition: int | None = PartitionQ,
    format: Literal["zip", "tar.gz"] = "zip",
    escaped: bool = EscapedQ,
) -> Response:
    """A directory as a ZIP (ZIP64 when needed) or tar.gz, streamed as it is
    read; symlinks stored as links; special files are skipped and listed in
    SENDENSE-MANIFEST.txt. Names that are not UTF-8 keep their bytes in a
    tar.gz; a ZIP holds them escaped (listed in the manifest)."""
    fs, part = service.session_fs(st, who, mount_id, partition)
    root = fs.stat(part, fs_path(path, escaped), follow=True)
    if root.type != "dir":
        raise NotADirectory(f"{path} is a {root.type}, not a directory", path=path)
    base = shown(root.name) or "root"
    if format == "zip":
        body, media, name = (
            streams.zip_stream(fs, part, root.path),
            "application/zip",
            f"{base}.zip",
        )
    else:
        body, media, name = (
            streams.tar_gz_stream(fs, part, root.path),
            "application/gzip",
            f"{base}.tar.gz",
        )
    return StreamingResponse(
        _first_read(service.streaming(st, mount_id, body)),
        media_type=media,
        headers={"Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}"},
    )
