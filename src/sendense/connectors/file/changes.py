"""Which blocks of an image changed since the previous restore point.

A plain image has no change tracking of its own. The node keeps, per disk
and restore point, the digest's block hash list (`mover.digest`: one leaf
hash per 64 KiB block, the file ``<node data>/blockhash/<vm>/<disk key>/
<change id>.<algorithm>``, written by the worker when the copy ends). An
incremental reads the image once, hashes every block the same way and
compares with the list of the previous change id::

    image        |blk0|blk1|blk2|blk3|hole ...........|blk9|
    new hashes   | a  | b' | c  | d' | Z   Z   Z   Z   | j  |   Z: a zero block's
    stored list  | a  | b  | c  | d  | Z   Z   Z   e   | j  |      constant hash
    changed            ^^^^      ^^^^              ^^^^

Holes (``base:allocation`` says "reads as zero") are not read: their hash is
the constant of a zero block. Each run of changed blocks is written as
zeroes into a ``null-co`` node whose dirty bitmap (64 KiB granularity) then
holds exactly the changed blocks; the image's export carries that bitmap as
``qemu:dirty-bitmap:<name>``, so the mover copies them like a QEMU
incremental, and patches their hashes into a copy of the same list.

The lists are keyed by change id and the hub stores a change id only for a
backup that completed: a failed or cancelled backup leaves a list nobody
asks for, never a wrong one under a name in use.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import nbd

from sendense.core.errors import Cancelled, NbdError
from sendense.mover import digest as dg

log = logging.getLogger(__name__)

B = dg.BLOCK_SIZE
WINDOW = 1 << 30  # block status asked 1 GiB at a time
READ_SIZE = 4 << 20  # one read request: 64 blocks
IN_FLIGHT = 4
ZERO_IN_FLIGHT = 64
STATE_ZERO = 2  # base:allocation: bit 1, reads as zero (NBD spec)


@dataclass
class ChangeSummary:
    blocks: int = 0
    changed_blocks: int = 0
    read_bytes: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Bytes of the image covered per second (holes are not read)."""
        return self.blocks * B / self.seconds if self.seconds > 0 else 0.0


def leaf_of(algorithm: str) -> tuple[Callable[[dg.Buffer], bytes], int]:
    """The digest's leaf hash and its size (`mover.digest`, the same table)."""
    return dg._LEAVES[algorithm]


def _allocation(h: nbd.NBD, offset: int, length: int) -> list[tuple[int, int, bool]]:
    """``(offset, length, zero)`` from one ``base:allocation`` query, clipped to the ask."""
    extents: list[tuple[int, int, bool]] = []

    def cb(ctx: str, off: int, entries: list[int], err: object) -> int:
        if ctx == "base:allocation":
            pos = off
            for i in range(0, len(entries), 2):
                size = min(entries[i], offset + length - pos)
                if size <= 0:
                    break
                extents.append((pos, size, bool(entries[i + 1] & STATE_ZERO)))
                pos += size
        return 0

    h.block_status(length, offset, cb)
    return extents


def block_runs(h: nbd.NBD, size: int) -> Iterator[tuple[int, int, bool]]:
    """``(first block, count, zero)`` covering the image in order; a block is
    zero only when ``base:allocation`` says all of it reads as zeroes."""
    count = dg.block_count(size)
    block = 0
    while block < count:
        offset = block * B
        want = min(WINDOW, size - offset)
        extents = _allocation(h, offset, want)
        if not extents:
            raise NbdError("the image server did not answer base:allocation")
        reached = extents[-1][0] + extents[-1][1]
        # Whole blocks answered for (all of them at the image's end).
        end_block = count if reached >= size else reached // B
        if end_block <= block:  # less than a block answered: take it as data
            end_block = block + 1
        yield from block_runs_of(extents, block, end_block, size)
        block = end_block


def block_runs_of(
    extents: list[tuple[int, int, bool]], block: int, end_block: int, size: int
) -> Iterator[tuple[int, int, bool]]:
    """Runs of whole blocks in ``[block, end_block)`` from byte extents: a
    block is zero only when zero extents cover all of it (data wins)."""
    count = dg.block_count(size)
    runs: list[tuple[int, int, bool]] = []
    for off, length, zero in extents:
        first = off // B
        last = -(-(off + length) // B)
        if zero:
            first = -(-off // B)
            last = (off + length) // B if off + length < size else count
        first, last = max(first, block), min(last, end_block)
        if last > first:
            runs.append((first, last, zero))
    is_zero = bytearray(end_block - block)
    for first, last, zero in runs:
        if zero:
            is_zero[first - block : last - block] = b"\1" * (last - first)
    for first, last, zero in runs:
        if not zero:
            is_zero[first - block : last - block] = bytes(last - first)
    i = 0
    while i < len(is_zero):
        j = i
        while j < len(is_zero) and is_zero[j] == is_zero[i]:
            j += 1
        yield block + i, j - i, bool(is_zero[i])
        i = j


def nbd_chunks(h: nbd.NBD, size: int) -> Iterator[tuple[int, int, memoryview | None]]:
    """The image in disk order as ``(offset, length, data)``, ``data`` None for
    a run of zero blocks, read from an NBD export with ``base:allocation``,
    ``IN_FLIGHT`` reads at a time. A buffer is reused once the next chunk is
    asked for."""
    reads: deque[tuple[int, int, int, bytearray]] = deque()
    free: list[bytearray] = []

    def retire() -> tuple[int, int, memoryview]:
        cookie, offset, length, buf = reads.popleft()
        while not h.aio_command_completed(cookie):
            h.poll(-1)
        return offset, length, memoryview(buf)[:length]

    for first, n, zero in block_runs(h, size):
        offset = first * B
        end = min((first + n) * B, size)
        if zero:
            while reads:
                off, length, view = retire()
                yield off, length, view
                free.append(view.obj)  # type: ignore[arg-type]
            yield offset, end - offset, None
            continue
        while offset < end:
            length = min(READ_SIZE, end - offset)
            buf = free.pop() if free else bytearray(READ_SIZE)
            target = memoryview(buf)[:length] if length < READ_SIZE else buf
            reads.append((h.aio_pread(target, offset), offset, length, buf))
            offset += length
            while len(reads) >= IN_FLIGHT:
                off, length_done, view = retire()
                yield off, length_done, view
                free.append(view.obj)  # type: ignore[arg-type]
    while reads:
        off, length, view = retire()
        yield off, length, view


def file_chunks(path: str, size: int) -> Iterator[tuple[int, int, memoryview | None]]:
    """The same from a raw image read directly (``SEEK_DATA``/``SEEK_HOLE``
    skip a sparse file's holes; a block device is all data). About three times
    the rate of reading through the NBD server (measured: 2.9 against
    1.0 GiB/s from the page cache): the server still holds the image's lock
    meanwhile, and a raw image reads the same either way."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(READ_SIZE)
        for first, n, zero in _file_runs(fd, size):
            offset = first * B
            end = min((first + n) * B, size)
            if zero:
                yield offset, end - offset, None
                continue
            while offset < end:
                length = min(READ_SIZE, end - offset)
                view = memoryview(buf)[:length]
                got = os.preadv(fd, [view], offset)
                if got < length:  # a file shorter than its size: reads as zeroes
                    view[got:] = bytes(length - got)
                yield offset, length, view
                offset += length
    finally:
        os.close(fd)


def _file_runs(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    extents: list[tuple[int, int, bool]] = []
    pos = 0
    try:
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: only a hole from pos to the end
                    raise
                data = size
            data = min(data, size)
            if data > pos:
                extents.append((pos, data - pos, True))
            if data >= size:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            extents.append((data, hole - data, False))
            pos = hole
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        extents = [(0, size, False)]  # no hole information: all data
    yield from block_runs_of(extents, 0, dg.block_count(size), size)


class Marks(Protocol):
    """Where `find_changes` puts the changed blocks (in disk order)."""

    changed_blocks: int

    def add(self, block: int) -> None: ...

    def finish(self) -> None: ...


class CountMarker:
    """Counts changed blocks and keeps nothing: for measuring the hash pass."""

    def __init__(self) -> None:
        self.changed_blocks = 0

    def add(self, block: int) -> None:
        self.changed_blocks += 1

    def finish(self) -> None:
        pass


class ChangeMarker:
    """Writes zeroes over runs of changed blocks into a writable export of
    the bitmap's ``null-co`` node, a bounded number in flight."""

    def __init__(self, h: nbd.NBD, size: int) -> None:
        self.h = h
        self.size = size
        self.pending: deque[int] = deque()
        self.run_start = -1
        self.run_end = -1
        self.changed_blocks = 0

    def add(self, block: int) -> None:
        self.changed_blocks += 1
        if block == self.run_end:
            self.run_end += 1
            return
        self._emit()
        self.run_start, self.run_end = block, block + 1

    def _emit(self) -> None:
        if self.run_start < 0:
            return
        offset = self.run_start * B
        end = min(self.run_end * B, self.size)
        while offset < end:
            length = min(end - offset, WINDOW)
            self.pending.append(self.h.aio_zero(length, offset))
            offset += length
            while len(self.pending) >= ZERO_IN_FLIGHT:
                self._retire_one()
        self.run_start = self.run_end = -1

    def _retire_one(self) -> None:
        cookie = self.pending[0]
        while not self.h.aio_command_completed(cookie):
            self.h.poll(-1)
        self.pending.popleft()

    def finish(self) -> None:
        self._emit()
        while self.pending:
            self._retire_one()
        self.h.flush()


def find_changes(
    chunks: Iterator[tuple[int, int, memoryview | None]],
    size: int,
    previous: Path,
    marker: Marks,
    *,
    algorithm: str = dg.DEFAULT_ALGORITHM,
    cancel: threading.Event | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ChangeSummary:
    """Hash every block of the image (``chunks``: `nbd_chunks` or
    `file_chunks`), compare with the list ``previous`` and mark the blocks
    that differ. The caller checked the list's size.

    ``cancel`` is checked between chunks (`Cancelled`); ``on_progress(done,
    size)`` gets the bytes covered so far, at most every half second."""
    leaf, hash_size = leaf_of(algorithm)
    zero_hash = leaf(bytes(B))
    tail = size % B
    tail_zero_hash = leaf(bytes(tail)) if tail else zero_hash
    count = dg.block_count(size)
    summary = ChangeSummary(blocks=count)
    t0 = time.monotonic()
    fd = os.open(previous, os.O_RDONLY | os.O_CLOEXEC)
    last_report = t0
    try:
        for offset, length, data in chunks:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled while hashing the image")
            if on_progress is not None and time.monotonic() - last_report >= 0.5:
                last_report = time.monotonic()
                on_progress(offset, size)
            first = offset // B
            n = -(-length // B)
            old = os.pread(fd, n * hash_size, first * hash_size)
            if data is None:
                for k in range(n):
                    want = tail_zero_hash if first + k == count - 1 else zero_hash
                    if old[k * hash_size : (k + 1) * hash_size] != want:
                        marker.add(first + k)
                continue
            for k, pos in enumerate(range(0, length, B)):
                if (
                    leaf(data[pos : min(pos + B, length)])
                    != old[k * hash_size : (k + 1) * hash_size]
                ):
                    marker.add(first + k)
            summary.read_bytes += length
    finally:
        os.close(fd)
    marker.finish()
    summary.changed_blocks = marker.changed_blocks
    summary.seconds = time.monotonic() - t0
    return summary
