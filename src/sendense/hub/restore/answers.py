"""What restore sessions answer, shared by the API (router.py) and the web
console: entries as shown (names that are not UTF-8 escaped), files with
ETag, ranges and HEAD, directory archives. Every file or archive answer
reads its first piece before it starts (an unreadable file is an error
answer, not a 200 cut short) and keeps the session alive while it streams."""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import Iterator
from typing import Any, Literal
from urllib.parse import quote

from fastapi import Response
from fastapi.responses import StreamingResponse

from sendense.core.access import Principal
from sendense.core.errors import NotADirectory, NotAFile
from sendense.hub.restore import service, streams
from sendense.hub.state import HubState
from sendense.restore.fs.models import FsEntry
from sendense.restore.fs.paths import escape, has_raw_bytes, shown, unescape


def fs_path(path: str, escaped: bool) -> str:
    """The path as the filesystem worker takes it (raw bytes of a name that
    is not UTF-8 as surrogates, see restore/fs/paths.py)."""
    return unescape(path) if escaped else path


def entry_view(e: FsEntry) -> dict[str, Any]:
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


MAX_RANGES = 32  # more ranges in one request are ignored (the whole file is sent)


def _ranges(header: str | None, size: int) -> list[tuple[int, int]] | None:
    """The ``bytes=`` ranges of a Range header -> [(start, end inclusive)];
    None: the whole file (no header, one not understood or not valid, more
    than MAX_RANGES). Ranges past the end are dropped; none left is 416.
    Overlapping ranges are merged (RFC 9110 allows coalescing); otherwise
    they keep the order asked."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes":
        return None
    specs = [p.strip() for p in spec.split(",") if p.strip()]
    if not specs or len(specs) > MAX_RANGES:
        return None
    out: list[tuple[int, int]] = []
    for one in specs:
        first, dash, last = one.partition("-")
        if not dash:
            return None
        try:
            if first == "":  # the last n bytes
                n = int(last)
                if n < 0:
                    return None
                if n > 0 and size > 0:
                    out.append((max(0, size - n), size - 1))
                continue
            start = int(first)
            end = int(last) if last else size - 1
        except ValueError:
            return None
        if start < 0 or (last and end < start):
            return None  # not a valid range: the header is ignored (RFC 9110 14.2)
        if start < size:
            out.append((start, min(end, size - 1)))
    if not out:
        raise RangeNotSatisfiable(size)
    ordered = sorted(out)
    if any(b[0] <= a[1] + 1 for a, b in itertools.pairwise(ordered)):
        merged = [ordered[0]]
        for start, end in ordered[1:]:
            if start <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        out = merged
    return out


class RangeNotSatisfiable(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


def file_response(
    st: HubState,
    who: Principal,
    mount_id: str,
    partition: int | None,
    path: str,
    *,
    escaped: bool = False,
    method: str = "GET",
    range_header: str | None = None,
    if_range: str | None = None,
) -> Response:
    """A file of a session: 200 whole, 206 one range or several
    (multipart/byteranges), 416; HEAD: the headers only."""
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
    try:
        wanted = None if if_range and if_range != etag else _ranges(range_header, entry.size)
    except RangeNotSatisfiable as e:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{e.size}"})
    head = method == "HEAD"
    if wanted is None:
        headers["Content-Length"] = str(entry.size)
        if head:
            return Response(media_type="application/octet-stream", headers=headers)
        return StreamingResponse(
            streams.first_read(service.streaming(st, mount_id, fs.iter_file(part, entry.path))),
            media_type="application/octet-stream",
            headers=headers,
        )
    if len(wanted) == 1:
        ((start, end),) = wanted
        headers["Content-Length"] = str(end - start + 1)
        headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        if head:
            return Response(status_code=206, media_type="application/octet-stream", headers=headers)
        return StreamingResponse(
            streams.first_read(
                service.streaming(
                    st,
                    mount_id,
                    fs.iter_file(part, entry.path, offset=start, length=end - start + 1),
                )
            ),
            status_code=206,
            media_type="application/octet-stream",
            headers=headers,
        )
    # several ranges: multipart/byteranges, its length known before it starts
    boundary = secrets.token_hex(16)
    heads = [
        (
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {start}-{end}/{entry.size}\r\n\r\n"
        ).encode()
        for start, end in wanted
    ]
    tail = f"--{boundary}--\r\n".encode()
    length = sum(
        len(h) + (end - start + 1) + 2 for h, (start, end) in zip(heads, wanted, strict=True)
    )
    headers["Content-Length"] = str(length + len(tail))
    media = f"multipart/byteranges; boundary={boundary}"
    if head:
        return Response(status_code=206, media_type=media, headers=headers)
    first_start, first_end = wanted[0]
    first_part = streams.first_read(
        fs.iter_file(part, entry.path, offset=first_start, length=first_end - first_start + 1)
    )

    def parts() -> Iterator[bytes]:
        for n, (h, (start, end)) in enumerate(zip(heads, wanted, strict=True)):
            yield h
            if n == 0:
                yield from first_part
            else:
                yield from fs.iter_file(part, entry.path, offset=start, length=end - start + 1)
            yield b"\r\n"
        yield tail

    return StreamingResponse(
        service.streaming(st, mount_id, parts()),
        status_code=206,
        media_type=media,
        headers=headers,
    )


def archive_response(
    st: HubState,
    who: Principal,
    mount_id: str,
    partition: int | None,
    path: str,
    *,
    escaped: bool = False,
    format: Literal["zip", "tar.gz"] = "zip",
) -> Response:
    """A directory of a session as a streamed ZIP or tar.gz."""
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
        streams.first_read(service.streaming(st, mount_id, body)),
        media_type=media,
        headers={"Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}"},
    )
