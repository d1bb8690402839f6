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

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nbd

from sendense.core.errors import NbdError
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
        # Data wins over zero where a block is partly both.
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
        block = end_block


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
    src: nbd.NBD,
    size: int,
    previous: Path,
    marker: ChangeMarker,
    *,
    algorithm: str = dg.DEFAULT_ALGORITHM,
) -> ChangeSummary:
    """Hash every block of ``src`` (an NBD export of the image, with
    ``base:allocation``), compare with the list ``previous`` and mark the
    blocks that differ. The caller checked the list's size."""
    leaf, hash_size = leaf_of(algorithm)
    zero_hash = leaf(bytes(B))
    tail = size % B
    tail_zero_hash = leaf(bytes(tail)) if tail else zero_hash
    count = dg.block_count(size)
    summary = ChangeSummary(blocks=count)
    t0 = time.monotonic()
    fd = os.open(previous, os.O_RDONLY | os.O_CLOEXEC)
    try:

        def stored(first: int, n: int) -> bytes:
            return os.pread(fd, n * hash_size, first * hash_size)

        reads: deque[tuple[int, int, int, bytearray]] = deque()
        free: list[bytearray] = []

        def retire() -> None:
            cookie, first, length, buf = reads.popleft()
            while not src.aio_command_completed(cookie):
                src.poll(-1)
            mv = memoryview(buf)
            old = stored(first, -(-length // B))
            for k, pos in enumerate(range(0, length, B)):
                if leaf(mv[pos : min(pos + B, length)]) != old[k * hash_size : (k + 1) * hash_size]:
                    marker.add(first + k)
            summary.read_bytes += length
            free.append(buf)

        for first, n, zero in block_runs(src, size):
            if zero:
                while reads:  # keep the marks in disk order
                    retire()
                old = stored(first, n)
                for k in range(n):
                    want = tail_zero_hash if first + k == count - 1 else zero_hash
                    if old[k * hash_size : (k + 1) * hash_size] != want:
                        marker.add(first + k)
                continue
            offset = first * B
            end = min((first + n) * B, size)
            while offset < end:
                length = min(READ_SIZE, end - offset)
                buf = free.pop() if free else bytearray(READ_SIZE)
                view = memoryview(buf)[:length] if length < READ_SIZE else buf
                reads.append((src.aio_pread(view, offset), offset // B, length, buf))
                offset += length
                while len(reads) >= IN_FLIGHT:
                    retire()
        while reads:
            retire()
    finally:
        os.close(fd)
    marker.finish()
    summary.changed_blocks = marker.changed_blocks
    summary.seconds = time.monotonic() - t0
    return summary
