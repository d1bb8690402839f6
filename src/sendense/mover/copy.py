"""The data mover: copy the extents that matter from one NBD export to another.

Source and target are libnbd handles, already connected. The source must have
negotiated ``base:allocation`` and, for an incremental, the dirty bitmap
context ``qemu:dirty-bitmap:<name>`` (NBD spec, "Metadata querying").

The copy runs in two passes over the disk, window by window, so memory stays
flat whatever the disk size:

1. plan: ``NBD_CMD_BLOCK_STATUS`` over the whole disk, only summing what will
   move (the total for progress);
2. copy: the same queries again, then for each extent a read + write (data)
   or a write-zeroes (zero, incremental only: a full backup's target is a new
   image that already reads as zeroes), with up to ``in_flight`` requests
   outstanding across both handles, driven by one poll loop.

Extents are grown to 64 KiB blocks (the digest's block, also the dirty bitmap
granularity Sendense creates) so that every block the mover touches is read
whole and its hash can be patched into the block hash list (see `digest`).

The cancel flag is checked between requests; on cancel the requests in
flight drain and `Cancelled` is raised.
"""

from __future__ import annotations

import bisect
import logging
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import nbd

from sendense.core.errors import Cancelled, NbdError
from sendense.core.extents import Extent, align_out, intersect, merge, split
from sendense.mover import digest as dg

log = logging.getLogger(__name__)

ALLOCATION = "base:allocation"
DIRTY_PREFIX = "qemu:dirty-bitmap:"
# base:allocation flags (NBD spec): bit 0 hole, bit 1 reads as zero.
STATE_ZERO = 2
# qemu:dirty-bitmap flags: bit 0 set means dirty.
STATE_DIRTY = 1

WINDOW = 1 << 30  # block status is asked for 1 GiB at a time
DEFAULT_REQUEST_SIZE = 4 << 20
DEFAULT_IN_FLIGHT = 8


@dataclass
class Progress:
    bytes_total: int = 0
    bytes_done: int = 0
    zero_bytes: int = 0
    data_bytes: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.bytes_done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        rate = self.rate
        if rate <= 0:
            return None
        return (self.bytes_total - self.bytes_done) / rate

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "data_bytes": self.data_bytes,
            "zero_bytes": self.zero_bytes,
            "rate": round(self.rate),
            "eta": None if self.eta is None else round(self.eta, 1),
        }


@dataclass
class CopyResult:
    size: int
    data_bytes: int
    zero_bytes: int
    requests: int
    seconds: float
    digest: str | None


def _block_status(
    h: nbd.NBD,
    offset: int,
    length: int,
    dirty_context: str | None,
    dirty_extents: DirtyExtents | None = None,
) -> tuple[list[Extent], list[Extent]]:
    """One block status query: (allocation extents, dirty extents).

    For a full copy (no dirty context) everything in the window is dirty.
    The server may answer for less than asked; the answer is clipped to the
    shortest context so both lists cover the same span. ``dirty_extents``,
    when given, are the dirty extents instead of ``dirty_context``'s answer.
    """
    got: dict[str, list[int]] = {}

    def cb(metacontext: str, off: int, entries: list[int], err: object) -> int:
        got[metacontext] = list(entries)
        return 0

    h.block_status(length, offset, cb)
    spans: list[int] = []
    out: dict[str, list[Extent]] = {}
    for ctx, entries in got.items():
        extents = []
        pos = offset
        for i in range(0, len(entries), 2):
            ln, flags = entries[i], entries[i + 1]
            ln = min(ln, offset + length - pos)
            if ln <= 0:
                break
            if ctx == ALLOCATION:
                extents.append(Extent(pos, ln, bool(flags & STATE_ZERO)))
            elif flags & STATE_DIRTY:
                extents.append(Extent(pos, ln))
            pos += ln
        spans.append(pos)
        out[ctx] = extents
    if ALLOCATION not in out:
        raise NbdError("source did not answer base:allocation")
    end = min(spans)
    alloc = [_clip(e, end) for e in out[ALLOCATION] if e.offset < end]
    if dirty_extents is not None:
        dirty = dirty_extents.within(offset, end)
    elif dirty_context is None:
        dirty = [Extent(offset, end - offset)]
    else:
        if dirty_context not in out:
            raise NbdError(f"source did not answer {dirty_context}")
        dirty = [_clip(e, end) for e in out[dirty_context] if e.offset < end]
    return alloc, dirty


class DirtyExtents:
    """Dirty areas given as a list (sorted, non-overlapping ``(offset, length)``
    pairs) rather than read from a meta context."""

    def __init__(self, extents: Sequence[tuple[int, int]]) -> None:
        self.extents = [Extent(o, n) for o, n in extents if n > 0]
        self.ends = [e.end for e in self.extents]

    def within(self, offset: int, end: int) -> list[Extent]:
        out = []
        for e in self.extents[bisect.bisect_right(self.ends, offset) :]:
            if e.offset >= end:
                break
            start, stop = max(e.offset, offset), min(e.end, end)
            out.append(Extent(start, stop - start))
        return out


def _clip(e: Extent, end: int) -> Extent:
    return e if e.end <= end else Extent(e.offset, end - e.offset, e.zero)


def _blockify(extents: list[Extent], size: int) -> Iterator[Extent]:
    """Shrink zero extents to whole blocks; what is cut off becomes data.

    Input covers block-aligned dirty ranges without gaps inside a range.
    """
    B = dg.BLOCK_SIZE
    out = []
    for e in extents:
        if not e.zero:
            out.append(e)
            continue
        start = -(-e.offset // B) * B
        end = e.end if e.end == size else e.end // B * B
        if end <= start:
            out.append(Extent(e.offset, e.length))
            continue
        if start > e.offset:
            out.append(Extent(e.offset, start - e.offset))
        out.append(Extent(start, end - start, True))
        if e.end > end:
            out.append(Extent(end, e.end - end))
    return merge(out)


def plan_window(
    h: nbd.NBD,
    offset: int,
    length: int,
    size: int,
    dirty_context: str | None,
    dirty_extents: DirtyExtents | None = None,
) -> tuple[list[Extent], int]:
    """Extents to move in ``[offset, offset+length)``; returns them and how far
    the answer reached (the server may answer less than asked)."""
    alloc, dirty = _block_status(h, offset, length, dirty_context, dirty_extents)
    reached = alloc[-1].end if alloc else offset + length
    dirty = list(merge(align_out(d, dg.BLOCK_SIZE, size) for d in dirty))
    # Alignment may reach past what block status answered: ask again for the tail.
    need_end = max([reached, *(d.end for d in dirty)])
    while reached < need_end:
        more, _ = _block_status(h, reached, need_end - reached, None)
        alloc.extend(more)
        reached = more[-1].end
    return list(_blockify(list(intersect(dirty, alloc)), size)), reached


def iter_plan(
    h: nbd.NBD, size: int, dirty_context: str | None, dirty_extents: DirtyExtents | None = None
) -> Iterator[Extent]:
    offset = 0
    while offset < size:
        extents, reached = plan_window(
            h, offset, min(WINDOW, size - offset), size, dirty_context, dirty_extents
        )
        for e in extents:
            # A block grown by alignment may already have been planned by the
            # previous window.
            if e.end <= offset:
                continue
            if e.offset < offset:
                e = Extent(offset, e.end - offset, e.zero)
            yield e
        offset = max(reached, extents[-1].end if extents else reached)


class Mover:
    """Copies one disk. Create, then `run()`; `cancel()` from another thread."""

    def __init__(
        self,
        src: nbd.NBD,
        dst: nbd.NBD | None,
        size: int,
        *,
        dirty_context: str | None = None,
        dirty_extents: Sequence[tuple[int, int]] | None = None,
        target_is_zero: bool = True,
        hashes: dg.BlockHashList | None = None,
        finish_hashes: bool = True,
        in_flight: int = DEFAULT_IN_FLIGHT,
        request_size: int = DEFAULT_REQUEST_SIZE,
        on_progress: Callable[[Progress], None] | None = None,
        cancel_event: threading.Event | None = None,
        max_rate: float | None = None,
    ) -> None:
        self.src = src
        self.dst = dst
        self.size = size
        self.dirty_context = dirty_context
        # Changed areas the source's connector knows itself (VMware CBT).
        self.dirty_extents = DirtyExtents(dirty_extents) if dirty_extents is not None else None
        self.target_is_zero = target_is_zero
        self.hashes = hashes
        # dst None: only hash what would be copied (no writes).
        self.finish_hashes = finish_hashes
        self.in_flight = in_flight
        limit = min(_max_request(src), _max_request(dst) if dst is not None else 32 << 20)
        self.request_size = max(
            dg.BLOCK_SIZE, min(request_size, limit) // dg.BLOCK_SIZE * dg.BLOCK_SIZE
        )
        self.on_progress = on_progress
        self.cancel_event = cancel_event or threading.Event()
        self.progress = Progress()
        self.requests = 0
        # Bandwidth limit in bytes/s of data read (None: as fast as possible).
        self.max_rate = max_rate
        self._issued = 0

    def cancel(self) -> None:
        self.cancel_event.set()

    def plan_total(self) -> int:
        total = 0
        for e in iter_plan(self.src, self.size, self.dirty_context, self.dirty_extents):
            if not e.zero:
                total += e.length
        return total

    def run(self) -> CopyResult:
        t0 = time.monotonic()
        self.progress.bytes_total = self.plan_total()
        self.progress.started = time.monotonic()
        self._report(force=True)
        try:
            self._copy()
            if self.dst is not None:
                self.dst.flush()
        except BaseException:
            if self.hashes is not None and self.finish_hashes:
                self.hashes.abort()
            raise
        digest = None
        if self.hashes is not None and self.finish_hashes:
            digest = self.hashes.finish()
        self._report(force=True)
        return CopyResult(
            size=self.size,
            data_bytes=self.progress.data_bytes,
            zero_bytes=self.progress.zero_bytes,
            requests=self.requests,
            seconds=time.monotonic() - t0,
            digest=digest,
        )

    _last_report = 0.0

    def _report(self, force: bool = False) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        if force or now - self._last_report >= 0.2:
            self._last_report = now
            self.on_progress(self.progress)

    def _copy(self) -> None:
        src, dst = self.src, self.dst
        work = self._requests()
        free: list[bytearray] = []
        reads: deque[tuple[int, Extent, bytearray]] = deque()
        writes: deque[tuple[int, Extent, bytearray | None, Future[bytes] | None]] = deque()
        # Hashing runs beside the loop, overlapping the write it belongs to
        # (the hash functions release the GIL; the loop waits in poll without it).
        hasher = ThreadPoolExecutor(1, "mover-hash") if self.hashes is not None else None
        exhausted = False
        try:
            self._loop(src, dst, work, free, reads, writes, hasher, exhausted)
        finally:
            if hasher is not None:
                hasher.shutdown(wait=True)
        if self.cancel_event.is_set():
            raise Cancelled("copy cancelled")

    def _loop(
        self,
        src: nbd.NBD,
        dst: nbd.NBD | None,
        work: Iterator[Extent],
        free: list[bytearray],
        reads: deque[tuple[int, Extent, bytearray]],
        writes: deque[tuple[int, Extent, bytearray | None, Future[bytes] | None]],
        hasher: ThreadPoolExecutor | None,
        exhausted: bool,
    ) -> None:
        while True:
            throttled = False
            while not exhausted and len(reads) + len(writes) < self.in_flight:
                if self.cancel_event.is_set():
                    exhausted = True
                    break
                if self.max_rate and self._issued > self.max_rate * (
                    time.monotonic() - self.progress.started
                ):
                    throttled = True
                    break
                e = next(work, None)
                if e is None:
                    exhausted = True
                    break
                self.requests += 1
                if e.zero:
                    if self.hashes is not None:
                        self.hashes.set_zero(e.offset, e.length)
                    if self.target_is_zero or dst is None:
                        # A new image already reads as zeroes: nothing to send.
                        self._done(e)
                        continue
                    cookie = dst.aio_zero(e.length, e.offset)
                    writes.append((cookie, e, None, None))
                else:
                    buf = free.pop() if free else bytearray(self.request_size)
                    view = memoryview(buf)[: e.length] if e.length < len(buf) else buf
                    cookie = src.aio_pread(view, e.offset)
                    self._issued += e.length
                    reads.append((cookie, e, buf))
            if not reads and not writes:
                if throttled:
                    time.sleep(0.01)
                    continue
                break
            self._poll(10 if throttled else 1000)
            # Retire completed reads in order: the write goes out first, the
            # hash of the same (read-only) buffer is computed meanwhile.
            while reads and src.aio_command_completed(reads[0][0]):
                _, e, buf = reads.popleft()
                view = memoryview(buf)[: e.length] if e.length < len(buf) else buf
                if dst is None:
                    if self.hashes is not None:
                        self.hashes.set_run(
                            e.offset // dg.BLOCK_SIZE, self.hashes.hash_blocks(view, e.length)
                        )
                    free.append(buf)
                    self._done(e)
                    continue
                cookie = dst.aio_pwrite(view, e.offset)
                fut = None
                if hasher is not None and self.hashes is not None:
                    fut = hasher.submit(self.hashes.hash_blocks, view, e.length)
                writes.append((cookie, e, buf, fut))
            while writes and dst is not None and dst.aio_command_completed(writes[0][0]):
                _, e, wbuf, fut = writes.popleft()
                if fut is not None and self.hashes is not None:
                    self.hashes.set_run(e.offset // dg.BLOCK_SIZE, fut.result())
                if wbuf is not None:
                    free.append(wbuf)
                self._done(e)
            self._report()

    def _done(self, e: Extent) -> None:
        if e.zero:
            self.progress.zero_bytes += e.length
        else:
            self.progress.data_bytes += e.length
            self.progress.bytes_done += e.length

    def _requests(self) -> Iterator[Extent]:
        for e in iter_plan(self.src, self.size, self.dirty_context, self.dirty_extents):
            if e.zero:
                yield e
            else:
                yield from split(e, self.request_size)

    def _poll(self, timeout_ms: int) -> None:
        """Wait until a handle can make progress (libnbd(3), "Integrating
        with a main loop")."""
        poller = select.poll()
        handles = {}
        for h in (self.src, self.dst):
            if h is None:
                continue
            d = h.aio_get_direction()
            events = 0
            if d & nbd.AIO_DIRECTION_READ:
                events |= select.POLLIN
            if d & nbd.AIO_DIRECTION_WRITE:
                events |= select.POLLOUT
            if events:
                fd = h.aio_get_fd()
                poller.register(fd, events)
                handles[fd] = h
        for fd, revents in poller.poll(timeout_ms):
            h = handles[fd]
            if revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
                h.aio_notify_read()
            elif revents & select.POLLOUT:
                h.aio_notify_write()


def _max_request(h: nbd.NBD) -> int:
    try:
        size = int(h.get_block_size(nbd.SIZE_MAXIMUM))
    except nbd.Error:
        size = 0
    return size if size > 0 else 32 << 20
