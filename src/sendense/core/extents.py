"""Extents: byte ranges of a disk with what we know about them.

An extent is ``(offset, length, zero)``: ``zero`` means the range reads as
zeroes and never needs its bytes moved (a target gets a write-zeroes, or
nothing at all when the target is a new, empty image).

Disk                        |------------- size ---------------|
base:allocation             |data|zero ......|data    |zero    |
qemu:dirty-bitmap:X         |clean    |dirty      |clean       |
copy plan (incremental)               |z |data|          (dirty ∩ allocation)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    zero: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


def merge(extents: Iterable[Extent], *, gap: int = 0) -> Iterator[Extent]:
    """Join touching extents of the same kind; data extents closer than ``gap``
    bytes are joined too (reading a small gap costs less than a request)."""
    cur: Extent | None = None
    for e in extents:
        if e.length <= 0:
            continue
        if cur is not None and e.zero == cur.zero:
            limit = cur.end + (0 if cur.zero else gap)
            if e.offset <= limit:
                cur = Extent(cur.offset, max(cur.end, e.end) - cur.offset, cur.zero)
                continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur


def align_out(e: Extent, block: int, size: int) -> Extent:
    """Grow an extent to ``block`` boundaries, clipped to the disk size."""
    start = e.offset - e.offset % block
    end = min(size, -(-e.end // block) * block)
    return Extent(start, end - start, e.zero)


def split(e: Extent, max_length: int) -> Iterator[Extent]:
    offset = e.offset
    while offset < e.end:
        length = min(max_length, e.end - offset)
        yield Extent(offset, length, e.zero)
        offset += length


def intersect(dirty: list[Extent], allocation: list[Extent]) -> Iterator[Extent]:
    """Ranges that are dirty, each tagged with the allocation's zero flag.

    ``dirty`` holds only dirty ranges (zero=False); ``allocation`` covers the
    same span without gaps. Both sorted.
    """
    j = 0
    for d in dirty:
        while j < len(allocation) and allocation[j].end <= d.offset:
            j += 1
        k = j
        while k < len(allocation) and allocation[k].offset < d.end:
            a = allocation[k]
            start = max(a.offset, d.offset)
            end = min(a.end, d.end)
            if end > start:
                yield Extent(start, end - start, a.zero)
            k += 1
