"""/api/v1/restores, /api/v1/backups/{backup_id}/export and
/api/v1/restore/mounts (file-level restore sessions): HTTP only."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from sendense.hub.backups.schemas import MAX_INT
from sendense.hub.deps import HubDep, Operator, Viewer
from sendense.hub.jobs.schemas import JobStarted
from sendense.hub.openapi import errors
from sendense.hub.restore import answers, service
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
from sendense.restore.fs.paths import has_raw_bytes, shown

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
        part, answers.fs_path(path, escaped), offset=offset, limit=limit, show_system=show_system
    )
    return {
        "path": shown(page.path),
        "escaped": has_raw_bytes(page.path),
        "partition": part,
        "entries": [answers.entry_view(e) for e in page.entries],
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
    return answers.entry_view(fs.stat(part, answers.fs_path(path, escaped)))


@router.head("/api/v1/restore/mounts/{mount_id}/download", include_in_schema=False)
@router.get(
    "/api/v1/restore/mounts/{mount_id}/download",
    responses={
        **errors(404),
        200: {"content": {"application/octet-stream": {}}, "description": "the file"},
        206: {"description": "the requested range, or ranges as multipart/byteranges"},
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
    """A file, streamed, with Content-Length, ETag and range requests (206;
    several ranges as multipart/byteranges, overlapping ones merged; 416).
    HEAD answers the same headers without reading the file."""
    return answers.file_response(
        st,
        who,
        mount_id,
        partition,
        path,
        escaped=escaped,
        method=request.method,
        range_header=request.headers.get("range"),
        if_range=request.headers.get("if-range"),
    )


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
    return answers.archive_response(
        st, who, mount_id, partition, path, escaped=escaped, format=format
    )
