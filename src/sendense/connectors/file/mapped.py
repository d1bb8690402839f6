"""Reading a qcow2 image for the hash pass without going through NBD.

``qemu-img map --output=json`` says, for each range of the image, where its
bytes live: a host ``offset`` in the image at ``depth`` of the backing chain
(0 is the image itself), or that it reads as zeroes. Plain data clusters are
then read straight from the files (page-cache speed: about four times what
the NBD server gives here); what has no offset (a compressed cluster) is
read through the image server's NBD export::

    map   |d0 @327680 |d1 @917504 ....|zero .......|compressed|
    read  |pread(top) |pread(base) ...|(nothing)   |NBD pread |

Used only when every image of the chain is a qcow2 without encryption or
external data file, or a raw file (`direct_chain`): there the offsets are the
bytes as the guest sees them. The map is read as ``qemu-img`` writes it, one
entry per line, so memory stays flat whatever the image's fragmentation.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import nbd

from sendense.connectors.file.changes import READ_SIZE, WINDOW, block_runs_of
from sendense.core.errors import QemuImgError
from sendense.mover import digest as dg
from sendense.qemu import img

log = logging.getLogger(__name__)

B = dg.BLOCK_SIZE


@dataclass(frozen=True, slots=True)
class MapEntry:
    start: int
    length: int
    depth: int
    zero: bool
    offset: int | None  # host offset in the chain's image at `depth`, if plain data

    @property
    def end(self) -> int:
        return self.start + self.length


def direct_chain(path: str) -> list[str] | None:
    """The files of ``path``'s backing chain (depth order) when all of them
    can be read at ``qemu-img map``'s offsets; None otherwise."""
    try:
        chain: list[dict[str, Any]] = json.loads(
            img.run(["info", "-U", "--backing-chain", "--output=json", path])
        )
    except (QemuImgError, ValueError):
        return None
    files = []
    for entry in chain:
        fmt = entry.get("format")
        data = (entry.get("format-specific") or {}).get("data") or {}
        if fmt not in ("qcow2", "raw") or entry.get("encrypted") or data.get("data-file"):
            return None
        files.append(str(entry["filename"]))
    return files


def map_entries(path: str) -> Iterator[MapEntry]:
    """``qemu-img map`` of ``path``, streamed in order."""
    cmd = [img.QEMU_IMG, "map", "-U", "--output=json", path]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        for raw in proc.stdout:
            line = raw.strip().lstrip(b"[").rstrip(b"]").rstrip(b",")
            if not line:
                continue
            e = json.loads(line)
            yield MapEntry(
                start=int(e["start"]),
                length=int(e["length"]),
                depth=int(e.get("depth", 0)),
                zero=bool(e.get("zero")) or not e.get("present", True),
                offset=int(e["offset"]) if e.get("data") and "offset" in e else None,
            )
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    if rc != 0:
        raise QemuImgError(cmd, rc, stderr)


def mapped_chunks(
    path: str, size: int, files: list[str], h: nbd.NBD
) -> Iterator[tuple[int, int, memoryview | None]]:
    """The image in disk order as ``(offset, length, data)`` (``data`` None
    for zero blocks), as `changes.nbd_chunks` gives it, read per the map."""
    fds = [os.open(f, os.O_RDONLY | os.O_CLOEXEC) for f in files]
    try:
        entries = map_entries(path)
        pending: list[MapEntry] = []  # entries reaching into the next window
        buf = bytearray(READ_SIZE)
        window = 0
        done = False
        while window < size:
            end = min(window + WINDOW, size)
            # A block at the window's edge may need the next window's entries.
            need = min(-(-end // B) * B, size)
            current = [e for e in pending if e.end > window]
            while not done and (not current or current[-1].end < need):
                e = next(entries, None)
                if e is None:
                    done = True
                    break
                current.append(e)
            pending = current
            reached = min(current[-1].end, size) if current else size
            # Whole blocks covered by the entries read so far.
            end_block = dg.block_count(size) if reached >= size else reached // B
            first_block = window // B
            if end_block <= first_block:
                raise QemuImgError(["qemu-img", "map"], 0, "map ended before the image's end")
            extents = [
                (max(e.start, window), min(e.end, end_block * B) - max(e.start, window), e.zero)
                for e in current
                if e.end > window and e.start < end_block * B
            ]
            starts = [e.start for e in current]
            for first, n, zero in block_runs_of(extents, first_block, end_block, size):
                offset, stop = first * B, min((first + n) * B, size)
                if zero:
                    yield offset, stop - offset, None
                    continue
                while offset < stop:
                    length = min(READ_SIZE, stop - offset)
                    view = memoryview(buf)[:length]
                    _fill(view, offset, current, starts, fds, h)
                    yield offset, length, view
                    offset += length
            window = end_block * B
    finally:
        for fd in fds:
            os.close(fd)


def _fill(
    view: memoryview,
    offset: int,
    entries: list[MapEntry],
    starts: list[int],
    fds: list[int],
    h: nbd.NBD,
) -> None:
    """Read ``[offset, offset + len(view))`` into ``view`` from the map's entries."""
    end = offset + len(view)
    i = max(0, bisect.bisect_right(starts, offset) - 1)
    pos = offset
    while pos < end:
        if i >= len(entries) or entries[i].start > pos:
            raise QemuImgError(["qemu-img", "map"], 0, f"map has no entry for offset {pos}")
        e = entries[i]
        seg_end = min(e.end, end)
        part = view[pos - offset : seg_end - offset]
        if e.zero:
            part[:] = bytes(len(part))
        elif e.offset is not None:
            got = os.preadv(fds[e.depth], [part], e.offset + (pos - e.start))
            if got < len(part):  # past the end of a file: reads as zeroes
                part[got:] = bytes(len(part) - got)
        else:  # compressed (or otherwise not plain): through the server
            part[:] = h.pread(len(part), pos)
        pos = seg_end
        i += 1
