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

A dropped connection (issue 11) need not end the copy: with reconnect
callables and a deadline, the mover flushes the target at intervals, keeps
the flushed high-water mark (requests complete out of order: the mark only
passes requests that are all done, and a flush covers only what was answered
before it was sent), and after connecting again copies from the mark on
(`Mover`). Leaf hashes are written by position, so blocks copied twice are
hashed twice to the same value and the digest is unchanged.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import nbd

from sendense.core.errors import Cancelled, Error, NbdError
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
# Read buffers in flight at most, whatever in_flight says: what bounds the
# mover's memory (SENDENSE_NODE_WINDOW_BYTES; 64 requests of 4 MiB would be
# 256 MiB). 32 MiB is 8 requests of 4 MiB, the old default's window.
DEFAULT_WINDOW_BYTES = 32 << 20
# Resume (issue 11): the target is flushed every DEFAULT_FLUSH_BYTES written
# or DEFAULT_FLUSH_SECONDS, whichever comes first, so a drop costs at most
# that much copied again (the flush runs beside the copy: see
# docs/performance.md for its measured cost); a connection whose requests get
# no answer for DEFAULT_STALL_TIMEOUT seconds counts as dropped.
DEFAULT_FLUSH_BYTES = 256 << 20
DEFAULT_FLUSH_SECONDS = 5.0
DEFAULT_STALL_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 30.0
RECONNECT_FIRST_DELAY = 0.5
RECONNECT_MAX_DELAY = 10.0
# A source connection refused, or its export unknown: the frozen view is gone.
SOURCE_GONE = frozenset({"ENOENT", "ECONNREFUSED"})
# Rounds of a handle's I/O made at once after a wake-up (`Mover._poll`).
DRAIN_ROUNDS = 64
# Reads shorter than this are hashed in the copy loop, longer ones in the
# hashing thread beside their write. XXH3 of a 64 KiB block takes a few
# microseconds; handing it to the thread and collecting the result costs
# more (an incremental is mostly 64 KiB requests). Measured:
# docs/performance.md, "The push full's CPU".
HASH_INLINE_BELOW = 1 << 20
# libnbd zeroes a read buffer before every read unless told not to
# (nbd_set_pread_initialize): the mover never looks at a buffer whose read
# failed, so that memset of every byte copied (4 % of the worker) is skipped.
PREAD_INITIALIZE = False

_T = TypeVar("_T")


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
    h: nbd.NBD,
    size: int,
    dirty_context: str | None,
    dirty_extents: DirtyExtents | None = None,
    start: int = 0,
) -> Iterator[Extent]:
    """The extents to move, in offset order, from ``start`` (a block
    boundary, where a resumed copy starts again) to the end."""
    offset = start
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


@dataclass
class Retrying:
    """A reconnect streak in progress (`Mover.on_retry`)."""

    end: str  # "source" or "target": which connection dropped
    reason: str
    attempt: int  # 1-based: the attempt about to be made
    since: float  # time.time() of the first failure of the streak
    deadline: float  # time.time() when the mover gives up
    gave_up: bool = False  # the deadline passed: the copy fails now

    def as_dict(self) -> dict[str, str | int]:
        return {
            "reason": self.reason,
            "attempt": self.attempt,
            "since": _iso(self.since),
            "deadline": _iso(self.deadline),
        }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


class ConnectionLost(Error):
    """A connection dropped and could not be made again within the deadline."""


class _Dropped(Exception):
    """Inside the copy loop: a connection is gone (or stalled)."""

    def __init__(self, end: str, detail: str) -> None:
        super().__init__(detail)
        self.end = end
        self.detail = detail


@dataclass
class _Slot:
    """A request of the plan, in plan order: the flushed high-water mark only
    moves over slots that are done (requests complete out of order)."""

    end: int
    data: int = 0
    zero: int = 0
    done: bool = False


class _BufferPool:
    """Read buffers by size class (powers of two from one 64 KiB block up to
    the request size): a 64 KiB extent does not pin a 4 MiB buffer, so the
    byte window, not the request count, bounds memory. A buffer is reused as
    it is (a memoryview of its first bytes, no copy); at most ``keep`` bytes
    of free buffers are kept, the rest goes back to the allocator."""

    def __init__(self, largest: int, keep: int) -> None:
        self.classes = []
        c = dg.BLOCK_SIZE
        while c < largest:
            self.classes.append(c)
            c *= 2
        self.classes.append(largest)
        self.free: dict[int, list[bytearray]] = {c: [] for c in self.classes}
        self.kept = 0
        self.keep = keep

    def size_for(self, length: int) -> int:
        return self.classes[bisect.bisect_left(self.classes, length)]

    def get(self, length: int) -> bytearray:
        size = self.size_for(length)
        free = self.free[size]
        if free:
            self.kept -= size
            return free.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        size = len(buf)
        if size in self.free and self.kept + size <= self.keep:
            self.free[size].append(buf)
            self.kept += size

    def clear(self) -> None:
        for free in self.free.values():
            free.clear()
        self.kept = 0


class Mover:
    """Copies one disk. Create, then `run()`; `cancel()` from another thread.

    Surviving a dropped connection (issue 11): given ``reconnect_source`` and
    (with a target) ``reconnect_target``, callables that return a new
    connected handle, the mover flushes the target every ``flush_bytes`` or
    ``flush_seconds`` and keeps the flushed high-water mark (`mark`): every
    extent of the plan below it is written and flushed. When a connection
    drops (the handle is dead, or no request completed for
    ``stall_timeout`` seconds), both ends are connected again (backoff from
    0.5 s doubling to 10 s, ``on_retry`` told of each attempt, a cancel
    honoured while waiting) and the copy starts again at the mark: writing
    a block again is idempotent, and its leaf hash lands at the same place in
    the block hash list, so the digest is the same as without the drop.
    Past ``reconnect_deadline`` seconds the copy fails with
    ``target_connection_lost`` / ``source_connection_lost``.
    """

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
        window_bytes: int | None = None,
        connections: int = 1,
        on_progress: Callable[[Progress], None] | None = None,
        cancel_event: threading.Event | None = None,
        max_rate: float | None = None,
        reconnect_source: Callable[[], nbd.NBD] | None = None,
        reconnect_target: Callable[[], nbd.NBD] | None = None,
        reconnect_deadline: float = 0.0,
        flush_bytes: int = DEFAULT_FLUSH_BYTES,
        flush_seconds: float = DEFAULT_FLUSH_SECONDS,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        on_retry: Callable[[Retrying | None], None] | None = None,
        abandoned: Callable[[], str | None] | None = None,
        label: str = "the disk",
    ) -> None:
        self.src = _reader(src)
        self.dsts: list[nbd.NBD] = [dst] if dst is not None else []
        self.size = size
        self.dirty_context = dirty_context
        # Changed areas the source's connector knows itself (VMware CBT).
        self.dirty_extents = DirtyExtents(dirty_extents) if dirty_extents is not None else None
        self.target_is_zero = target_is_zero
        self.hashes = hashes
        # dst None: only hash what would be copied (no writes).
        self.finish_hashes = finish_hashes
        # Requests in flight at most, and bytes in flight at most (the read
        # buffers): see DEFAULT_WINDOW_BYTES.
        self.in_flight = in_flight
        limit = min(_max_request(src), _max_request(dst) if dst is not None else 32 << 20)
        self.request_size = max(
            dg.BLOCK_SIZE, min(request_size, limit) // dg.BLOCK_SIZE * dg.BLOCK_SIZE
        )
        self.window_bytes = max(
            self.request_size,
            window_bytes if window_bytes is not None else DEFAULT_WINDOW_BYTES,
        )
        self.connections = max(1, connections)
        self.on_progress = on_progress
        self.cancel_event = cancel_event or threading.Event()
        self.progress = Progress()
        self.requests = 0
        # Bandwidth limit in bytes/s of data read (None: as fast as possible).
        self.max_rate = max_rate
        self._issued = 0
        self.reconnect_source = reconnect_source
        self.reconnect_target = reconnect_target
        self.reconnect_deadline = reconnect_deadline
        self.flush_bytes = flush_bytes
        self.flush_seconds = flush_seconds
        self.stall_timeout = stall_timeout
        self.on_retry = on_retry
        # Asked between reconnect attempts: a reason when nobody waits for
        # this copy any more (the hub gave the job up), so that a worker does
        # not hold the VM's frozen view for the whole deadline for nothing.
        self.abandoned = abandoned
        self.label = label
        # The flushed high-water mark and the counters at it.
        self.mark = 0
        self._at_mark = (0, 0)  # data bytes, zero bytes
        self.flushes = 0
        self.reconnects = 0
        # The last reconnect: (since, attempts, mark then), see _reconnect.
        self._streak: tuple[float, int, int] | None = None
        self._pool = _BufferPool(self.request_size, self.window_bytes)

    @property
    def dst(self) -> nbd.NBD | None:
        return self.dsts[0] if self.dsts else None

    def cancel(self) -> None:
        self.cancel_event.set()

    def close(self) -> None:
        """Shut the mover's connections (the current ones, after reconnects)."""
        for h in [self.src, *self.dsts]:
            with contextlib.suppress(Exception):
                h.shutdown()

    def plan_total(self) -> int:
        total = 0
        for e in iter_plan(self.src, self.size, self.dirty_context, self.dirty_extents):
            if not e.zero:
                total += e.length
        return total

    def run(self) -> CopyResult:
        t0 = time.monotonic()
        self.progress.bytes_total = self._resumable(self.plan_total)
        self.progress.started = time.monotonic()
        self._report(force=True)
        # Hashing runs beside the loop, overlapping the write it belongs to
        # (the hash functions release the GIL; the loop waits in poll without it).
        hasher = ThreadPoolExecutor(1, "mover-hash") if self.hashes is not None else None
        try:
            try:
                self._open_more_targets()
                self._resumable(lambda: self._copy(hasher))
            finally:
                if hasher is not None:
                    hasher.shutdown(wait=True)
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

    # -- connections -------------------------------------------------------

    @property
    def resumable(self) -> bool:
        return (
            self.reconnect_deadline > 0
            and self.reconnect_source is not None
            and (not self.dsts or self.reconnect_target is not None)
        )

    def _open_more_targets(self) -> None:
        """Several connections to the target when it says they see the same
        data (NBD multi-conn: a flush on one covers writes made on all)."""
        if self.connections <= 1 or len(self.dsts) != 1 or self.reconnect_target is None:
            return
        if not self.dsts[0].can_multi_conn():
            log.info("target does not advertise multi-conn: one connection")
            return
        while len(self.dsts) < self.connections:
            self.dsts.append(self.reconnect_target())

    def _dropped(self, e: Exception) -> _Dropped | None:
        """Which end an error came from, when its connection is gone."""
        if isinstance(e, _Dropped):
            return e
        if _gone(self.src):
            return _Dropped("source", str(e))
        if any(_gone(h) for h in self.dsts):
            return _Dropped("target", str(e))
        return None

    def _resumable(self, step: Callable[[], _T]) -> _T:
        """Run ``step``; on a dropped connection, connect again and repeat it."""
        while True:
            try:
                return step()
            except (nbd.Error, _Dropped) as e:
                drop = self._dropped(e)
                if drop is None:
                    raise
                if not self.resumable:
                    if isinstance(e, _Dropped):  # a stall without resume: as before
                        raise nbd.Error(f"{drop.end} stalled: {drop.detail}") from None
                    raise
                self._reconnect(drop)

    def _reconnect(self, drop: _Dropped) -> None:
        what = "the VM's export" if drop.end == "source" else "the hub's NBD target"
        # A connection that drops again before the copy got any further
        # continues the same streak: a target that takes connections and
        # loses them at once must not keep the copy going forever.
        if self._streak is not None and self.mark <= self._streak[2]:
            since, attempt, _ = self._streak
        else:
            since, attempt = time.time(), 0
        deadline = since + self.reconnect_deadline
        reason = f"{drop.end} connection lost: {drop.detail}"
        log.warning("%s: %s; reconnecting (mark %d)", self.label, reason, self.mark)
        count = len(self.dsts)
        for h in [self.src, *self.dsts]:
            _sever(h)
        self.close()
        delay = min(RECONNECT_FIRST_DELAY * 2**attempt, RECONNECT_MAX_DELAY)
        last = drop.detail
        while True:
            if attempt and time.time() >= deadline:
                if self.on_retry is not None:
                    self.on_retry(Retrying(drop.end, reason, attempt, since, deadline, True))
                raise ConnectionLost(
                    f"lost the connection to {what} of {self.label} and could not copy on "
                    f"within {self.reconnect_deadline:g} s ({attempt} attempts; "
                    f"SENDENSE_NODE_RECONNECT_DEADLINE): {last}",
                    code=f"{drop.end}_connection_lost",
                )
            given_up = self.abandoned() if attempt and self.abandoned is not None else None
            if given_up:
                if self.on_retry is not None:
                    self.on_retry(Retrying(drop.end, reason, attempt, since, deadline, True))
                raise ConnectionLost(
                    f"lost the connection to {what} of {self.label} and stopped reconnecting "
                    f"after {attempt} attempts: {given_up}; last error: {last}",
                    code=f"{drop.end}_lost",
                )
            attempt += 1
            if self.on_retry is not None:
                self.on_retry(Retrying(drop.end, reason, attempt, since, deadline))
            wait = min(delay, max(0.0, deadline - time.time()))
            if self.cancel_event.wait(wait):
                raise Cancelled("copy cancelled while reconnecting")
            try:
                assert self.reconnect_source is not None
                try:
                    src = self.reconnect_source()
                except nbd.Error as e:
                    if e.errno in SOURCE_GONE:
                        # The frozen view lives in the server's process (the
                        # VM's QEMU, the node's nbdkit or qemu-nbd): without
                        # it, or without its export, it is gone for good.
                        if self.on_retry is not None:
                            self.on_retry(
                                Retrying(drop.end, reason, attempt, since, deadline, True)
                            )
                        raise ConnectionLost(
                            f"lost the connection to {self.label} of the VM during the copy "
                            f"and its export is gone (did the VM's QEMU process stop?): {e}",
                            code="source_lost",
                        ) from None
                    raise
                dsts: list[nbd.NBD] = []
                try:
                    for _ in range(count):
                        assert self.reconnect_target is not None
                        dsts.append(self.reconnect_target())
                        if dsts[0].get_size() != self.size:
                            raise nbd.Error(f"target is {dsts[0].get_size()} bytes now")
                except BaseException:
                    for h in [src, *dsts]:
                        with contextlib.suppress(Exception):
                            h.shutdown()
                    raise
            except nbd.Error as e:
                last = str(e)
                log.info("%s: reconnect attempt %d failed: %s", self.label, attempt, e)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            self.src, self.dsts = _reader(src), dsts
            self.reconnects += 1
            self._streak = (since, attempt, self.mark)
            # Back to the last flushed position: what came after may be lost.
            data, zero = self._at_mark
            self.progress.data_bytes = self.progress.bytes_done = data
            self.progress.zero_bytes = zero
            self._issued = min(self._issued, data)
            self._pool.clear()
            log.warning(
                "%s: reconnected to %s after %d attempts; copying again from %d",
                self.label,
                drop.end,
                attempt,
                self.mark,
            )
            if self.on_retry is not None:
                self.on_retry(None)
            return

    # -- the copy ----------------------------------------------------------

    def _copy(self, hasher: ThreadPoolExecutor | None) -> None:
        """One pass from the mark to the end; raises on a drop (`_resumable`)."""
        src, dsts = self.src, self.dsts
        pool = self._pool
        hashes = self.hashes
        work = self._requests(self.mark)
        slots: deque[_Slot] = deque()
        reads: deque[tuple[int, Extent, bytearray, _Slot]] = deque()
        # Per target connection, in issue order.
        writes: list[deque[tuple[int, Extent, bytearray | None, Future[bytes] | None, _Slot]]] = [
            deque() for _ in dsts
        ]
        n_writes = 0
        bytes_out = 0  # read buffers in flight
        written, at_written = self.mark, self._at_mark
        flushing: tuple[int, int, tuple[int, int]] | None = None
        # Bytes written since the last flush, not positions: an incremental's
        # extents are far apart and a flush of little data is wasted.
        last_flush_at, last_flush_sent = time.monotonic(), self._sent(self._at_mark)
        last_event = time.monotonic()
        rr = 0
        exhausted = False
        pending: Extent | None = None
        while True:
            throttled = False
            while not exhausted and len(reads) + n_writes < self.in_flight:
                if self.cancel_event.is_set():
                    exhausted = True
                    break
                if self.max_rate and self._issued > self.max_rate * (
                    time.monotonic() - self.progress.started
                ):
                    throttled = True
                    break
                e = pending or next(work, None)
                pending = None
                if e is None:
                    exhausted = True
                    break
                if (
                    not e.zero
                    and bytes_out
                    and bytes_out + pool.size_for(e.length) > self.window_bytes
                ):
                    pending = e  # the window is full: wait for a read to come back
                    break
                self.requests += 1
                slot = _Slot(e.end)
                slots.append(slot)
                if e.zero:
                    if hashes is not None:
                        hashes.set_zero(e.offset, e.length)
                    if self.target_is_zero or not dsts:
                        # A new image already reads as zeroes: nothing to send.
                        self._done(e, slot)
                        continue
                    rr = (rr + 1) % len(dsts)
                    cookie = dsts[rr].aio_zero(e.length, e.offset)
                    writes[rr].append((cookie, e, None, None, slot))
                    n_writes += 1
                else:
                    buf = pool.get(e.length)
                    view = memoryview(buf)[: e.length] if e.length < len(buf) else buf
                    cookie = src.aio_pread(view, e.offset)
                    self._issued += e.length
                    bytes_out += len(buf)
                    reads.append((cookie, e, buf, slot))
            busy = bool(reads or n_writes or flushing)
            if not busy:
                if throttled:
                    time.sleep(0.01)
                    continue
                break
            if self._poll(src, dsts, 10 if throttled else 1000):
                last_event = time.monotonic()
            elif (
                self.resumable
                and (reads or n_writes)
                and time.monotonic() - last_event > self.stall_timeout
            ):
                # (A flush alone may take long: the target writes back its cache.)
                end = "source" if reads else "target"
                raise _Dropped(end, f"no answer for {self.stall_timeout:g} s")
            # Retire completed reads in order: the write goes out first, the
            # hash of the same (read-only) buffer is computed meanwhile.
            while reads and src.aio_command_completed(reads[0][0]):
                _, e, buf, slot = reads.popleft()
                view = memoryview(buf)[: e.length] if e.length < len(buf) else buf
                if not dsts:
                    if hashes is not None:
                        hashes.set_run(
                            e.offset // dg.BLOCK_SIZE, hashes.hash_blocks(view, e.length)
                        )
                    pool.put(buf)
                    bytes_out -= len(buf)
                    self._done(e, slot)
                    continue
                rr = (rr + 1) % len(dsts)
                cookie = dsts[rr].aio_pwrite(view, e.offset)
                fut = None
                if hasher is not None and hashes is not None:
                    if e.length < HASH_INLINE_BELOW:
                        # Cheaper here than a hand-off to the hashing thread
                        # and back (a queue, a wake-up and the GIL twice).
                        hashes.set_run(
                            e.offset // dg.BLOCK_SIZE, hashes.hash_blocks(view, e.length)
                        )
                    else:
                        fut = hasher.submit(hashes.hash_blocks, view, e.length)
                writes[rr].append((cookie, e, buf, fut, slot))
                n_writes += 1
            for i, h in enumerate(dsts):
                queue = writes[i]
                while queue and h.aio_command_completed(queue[0][0]):
                    _, e, wbuf, fut, slot = queue.popleft()
                    n_writes -= 1
                    if fut is not None and hashes is not None:
                        hashes.set_run(e.offset // dg.BLOCK_SIZE, fut.result())
                    if wbuf is not None:
                        pool.put(wbuf)
                        bytes_out -= len(wbuf)
                    self._done(e, slot)
            # The written mark: every slot before it is done.
            while slots and slots[0].done:
                slot = slots.popleft()
                written = slot.end
                at_written = (at_written[0] + slot.data, at_written[1] + slot.zero)
            if not dsts:
                self.mark, self._at_mark = written, at_written
            else:
                if flushing is not None and dsts[0].aio_command_completed(flushing[0]):
                    self.mark, self._at_mark = flushing[1], flushing[2]
                    flushing = None
                now = time.monotonic()
                if (
                    flushing is None
                    and written > self.mark
                    and (
                        self._sent(at_written) - last_flush_sent >= self.flush_bytes
                        or now - last_flush_at >= self.flush_seconds
                    )
                    and self.resumable
                ):
                    # A flush covers every write answered before it was sent
                    # (NBD spec), on every connection when the target says
                    # multi-conn (the only case where there are several).
                    flushing = (dsts[0].aio_flush(), written, at_written)
                    self.flushes += 1
                    last_flush_at, last_flush_sent = now, self._sent(at_written)
            self._report()
        if self.cancel_event.is_set():
            raise Cancelled("copy cancelled")
        if dsts:
            dsts[0].flush()
            self.flushes += 1
        self.mark, self._at_mark = self.size, at_written

    def _sent(self, counters: tuple[int, int]) -> int:
        """Bytes sent to the target by the requests counted in ``counters``."""
        data, zero = counters
        return data if self.target_is_zero else data + zero

    def _done(self, e: Extent, slot: _Slot) -> None:
        slot.done = True
        if e.zero:
            slot.zero = e.length
            self.progress.zero_bytes += e.length
        else:
            slot.data = e.length
            self.progress.data_bytes += e.length
            self.progress.bytes_done += e.length

    def _requests(self, start: int = 0) -> Iterator[Extent]:
        for e in iter_plan(self.src, self.size, self.dirty_context, self.dirty_extents, start):
            if e.zero:
                yield e
            else:
                yield from split(e, self.request_size)

    @staticmethod
    def _poll(src: nbd.NBD, dsts: list[nbd.NBD], timeout_ms: int) -> bool:
        """Wait until a handle can make progress (libnbd(3), "Integrating
        with a main loop"); False when nothing happened in ``timeout_ms``."""
        poller = select.poll()
        handles = {}
        for h in (src, *dsts):
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
        ready = poller.poll(timeout_ms)
        for fd, revents in ready:
            h = handles[fd]
            if revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
                h.aio_notify_read()
            elif revents & select.POLLOUT:
                h.aio_notify_write()
            # Go on with this handle while its socket lets it (nbd_poll with
            # a zero timeout: poll(2) and the notify in C, 0 once it would
            # block). libnbd 1.14 stops after every partial send or receive
            # and waits for the next notify; through TLS a send is one
            # record of 16 KiB, so a 4 MiB write took 256 trips through
            # this Python loop (65,000 per GiB: a third of the worker's
            # CPU). DRAIN_ROUNDS bounds the rounds so that the other handle
            # is served too.
            for _ in range(DRAIN_ROUNDS):
                if h.poll(0) <= 0:
                    break
        return bool(ready)


def connect_uri(h: nbd.NBD, url: str, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
    """``h.connect_uri(url)``, but failing after ``timeout`` seconds: a server
    that accepts but never answers (a hung host, a stopped process) would
    otherwise hold a reconnect attempt forever. Raises `nbd.Error`."""
    h.aio_connect_uri(url)
    deadline = time.monotonic() + timeout
    while h.aio_is_connecting():
        left = deadline - time.monotonic()
        if left <= 0:
            _sever(h)
            raise nbd.Error(f"no NBD handshake within {timeout:g} s", errno.ETIMEDOUT)
        d = h.aio_get_direction()
        events = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | (
            select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0
        )
        poller = select.poll()
        poller.register(h.aio_get_fd(), events)
        for _, revents in poller.poll(min(left, 0.5) * 1000):
            if revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
                h.aio_notify_read()
            elif revents & select.POLLOUT:
                h.aio_notify_write()
    if not h.aio_is_ready():
        raise nbd.Error("NBD connection failed", errno.ECONNRESET)


def _reader(h: nbd.NBD) -> nbd.NBD:
    """The source handle, its read buffers not zeroed first (`PREAD_INITIALIZE`)."""
    if not PREAD_INITIALIZE:
        with contextlib.suppress(AttributeError, nbd.Error):  # libnbd < 1.14
            h.set_pread_initialize(False)
    return h


def _sever(h: nbd.NBD) -> None:
    """Cut a handle's connection under it, so that shutting it down cannot
    wait on a server that stopped answering (the handle then sees EOF)."""
    with contextlib.suppress(Exception):
        fd = h.aio_get_fd()
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)


def _gone(h: nbd.NBD) -> bool:
    try:
        return bool(h.aio_is_dead() or h.aio_is_closed())
    except nbd.Error:
        return True


def _max_request(h: nbd.NBD) -> int:
    try:
        size = int(h.get_block_size(nbd.SIZE_MAXIMUM))
    except nbd.Error:
        size = 0
    return size if size > 0 else 32 << 20
