"""A copy that survives a dropped connection (issue 11), node side.

Real qemu-nbd processes: the target is a QCOW2 served over TCP with TLS-PSK,
as the hub serves it (nbd/psk.py key folder, nbds:// URL, the client's key
file); the source is a read-only export of a raw disk, as the VM's frozen
view. A rate-limited mover makes the copy last a few seconds; mid-copy the
target's (or the source's) qemu-nbd is killed with SIGKILL and, after a
while, served again on the same port (or socket), the same file and the
same key, as the hub re-serves a dead target (after ``qemu-img check -r
leaks``). What a user checks: the copy completes and reads back exactly as
the source (``qemu-img compare``), the digest is the source's, the retry was
reported and cleared; a target that never comes back fails with
``target_connection_lost`` once the deadline passes, and a cancel during the
backoff ends the copy at once; no qemu-nbd is left behind.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from fixtures.processes import processes_under
from pgserver import free_port
from sendense.core.errors import Cancelled, Error
from sendense.mover.copy import Mover, Retrying, connect_uri
from sendense.mover.digest import BlockHashList
from sendense.mover.verify import digest_of_image
from sendense.nbd import psk
from sendense.qemu import img
from sendense.qemu.nbd_server import QemuNbdServer

MiB = 1 << 20
SIZE = 160 * MiB + 4096  # not a multiple of the 64 KiB block
RATE = 40 * MiB  # bytes/s read: the copy of ~80 MiB of data lasts ~2 s


def make_source(path: Path, rng: random.Random) -> None:
    """Data in every other MiB (holes between), a short tail block."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for mib in range(0, SIZE // MiB, 2):
            f.seek(mib * MiB)
            f.write(rng.randbytes(MiB))
        f.seek(SIZE - 4096)
        f.write(rng.randbytes(4096))


class Relay:
    """A unix-socket relay in front of the source: `cut` drops the connections
    going through it while the server behind stays up (a dropped connection,
    not a stopped VM)."""

    def __init__(self, path: Path, upstream: Path) -> None:
        self.path, self.upstream = path, upstream
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        # Bytes a connection may carry from the server before it is cut
        # (None: no limit): a server that drops every connection early.
        self.limit: int | None = None
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.socket(socket.AF_UNIX)
            try:
                b.connect(str(self.upstream))
            except OSError:
                a.close()
                b.close()
                continue
            with self.lock:
                self.pairs.append((a, b))
            for x, y, limit in ((a, b, None), (b, a, self.limit)):
                threading.Thread(target=self._pump, args=(x, y, limit), daemon=True).start()

    @staticmethod
    def _pump(x: socket.socket, y: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := x.recv(1 << 20):
                y.sendall(data)
                sent += len(data)
                if limit is not None and sent > limit:
                    break
        except OSError:
            pass
        for sock in (x, y):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def cut(self) -> None:
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for a, b in pairs:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        self.cut()


class Ends:
    """The source and target servers of one copy, which a test can kill and
    serve again like the hub does."""

    def __init__(self, tmp: Path, *, backing: Path | None = None) -> None:
        self.tmp = tmp
        self.source = tmp / "src.raw"
        self.target = tmp / "dst.qcow2"
        if backing is None:
            img.create(str(self.target), SIZE)
        else:
            img.create(str(self.target), SIZE, backing=backing.name, backing_fmt="raw")
        self.port = free_port()
        self.keys = psk.make_server_dir(tmp / "tls", psk.new_key())
        self.src_server = self._src_server()
        self.dst_server = self._dst_server()
        self.src_server.start()
        self.dst_server.start()
        self.relay = Relay(tmp / "relay.sock", tmp / "src.sock")

    def _src_server(self) -> QemuNbdServer:
        return QemuNbdServer(
            str(self.source), fmt="raw", socket_path=str(self.tmp / "src.sock"), read_only=True
        )

    def _dst_server(self) -> QemuNbdServer:
        return QemuNbdServer(
            str(self.target),
            port=self.port,
            tls_psk_dir=str(self.keys),
            log_path=str(self.tmp / "dst.log"),
        )

    def open_source(self) -> nbd.NBD:
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(f"nbd+unix:///?socket={self.tmp / 'relay.sock'}")
        return h

    def open_target(self) -> nbd.NBD:
        h = nbd.NBD()
        psk.use_key_file(h, self.keys / psk.SERVER_FILE)
        connect_uri(h, self.dst_server.url, timeout=1.0)
        return h

    def kill(self, which: str) -> None:
        server = self.dst_server if which == "target" else self.src_server
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        server.stop()  # nothing left to stop; forgets the process

    def serve_again(self, which: str) -> None:
        if which == "target":
            img.repair_leaks(str(self.target))  # what the hub does first
            self.dst_server = self._dst_server()
            self.dst_server.start()
        else:
            Path(self.tmp / "src.sock").unlink(missing_ok=True)
            self.src_server = self._src_server()
            self.src_server.start()

    def stop(self) -> None:
        self.relay.close()
        self.src_server.stop()
        self.dst_server.stop()
        psk.remove_dir(self.keys)


@pytest.fixture
def ends(tmp_path: Path) -> Iterator[Ends]:
    make_source(tmp_path / "src.raw", random.Random(11))
    e = Ends(tmp_path)
    yield e
    e.stop()
    assert processes_under(tmp_path) == []


def make_mover(ends: Ends, hashes: BlockHashList | None, **kw: object) -> Mover:
    args: dict = dict(
        hashes=hashes,
        in_flight=8,
        request_size=MiB,
        max_rate=RATE,
        reconnect_source=ends.open_source,
        reconnect_target=ends.open_target,
        reconnect_deadline=30.0,
        flush_bytes=8 * MiB,
        flush_seconds=0.5,
        label="disk 2000",
    )
    args.update(kw)
    return Mover(ends.open_source(), ends.open_target(), SIZE, **args)


def when_copied(mover: Mover, fraction: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        p = mover.progress
        if p.bytes_total and p.bytes_done >= p.bytes_total * fraction:
            return
        assert time.monotonic() < deadline, "the copy did not get going"
        time.sleep(0.02)


def run_in_thread(mover: Mover) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def go() -> None:
        try:
            out["result"] = mover.run()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=go)
    t.start()
    return t, out


@pytest.mark.parametrize("connections", [1, 3])
def test_copy_survives_a_killed_target(ends: Ends, tmp_path: Path, connections: int) -> None:
    """Also with several connections to the target (it advertises multi-conn)."""
    retries: list[Retrying | None] = []
    hashes = BlockHashList(tmp_path / "h.x3", SIZE)
    mover = make_mover(ends, hashes, on_retry=retries.append, connections=connections)
    t, out = run_in_thread(mover)
    when_copied(mover, 0.4)
    ends.kill("target")
    # Down long enough for a few attempts (0.5 s, 1 s, 2 s backoff).
    time.sleep(1.2)
    assert retries and retries[-1] is not None
    assert retries[-1].end == "target" and retries[-1].attempt >= 2
    assert "target connection lost" in retries[-1].reason
    assert mover.mark > 0, "nothing was flushed before the drop"
    ends.serve_again("target")
    t.join(60)
    assert not t.is_alive()
    assert "error" not in out, out.get("error")
    result = out["result"]
    ends.stop()
    assert img.compare(str(ends.target), str(ends.source))
    assert result.digest == digest_of_image(str(ends.source), fmt="raw")
    assert mover.reconnects == 1
    assert len(mover.dsts) == connections
    assert retries[-1] is None  # cleared once copying again
    # Data counted once, whatever was copied twice.
    assert result.data_bytes == mover.progress.bytes_total
    assert img.check(str(ends.target))["check-errors"] == 0


def test_copy_survives_a_dropped_source_connection(ends: Ends, tmp_path: Path) -> None:
    retries: list[Retrying | None] = []
    hashes = BlockHashList(tmp_path / "h.x3", SIZE)
    mover = make_mover(ends, hashes, on_retry=retries.append)
    t, out = run_in_thread(mover)
    when_copied(mover, 0.4)
    ends.relay.cut()
    t.join(60)
    assert "error" not in out, out.get("error")
    assert mover.reconnects == 1
    assert [r.end for r in retries if r is not None] == ["source"]
    assert retries[-1] is None
    ends.stop()
    assert img.compare(str(ends.target), str(ends.source))
    assert out["result"].digest == digest_of_image(str(ends.source), fmt="raw")


def test_connections_that_keep_dropping_end_at_the_deadline(ends: Ends) -> None:
    """Reconnects that succeed but drop again before the copy gets any
    further are one streak: the deadline still ends it."""
    retries: list[Retrying | None] = []
    mover = make_mover(ends, None, reconnect_deadline=3.0, on_retry=retries.append)
    t, out = run_in_thread(mover)
    when_copied(mover, 0.3)
    ends.relay.limit = 256 << 10  # less than one 1 MiB read
    t0 = time.monotonic()
    ends.relay.cut()
    t.join(30)
    assert time.monotonic() - t0 < 10
    err = out.get("error")
    assert isinstance(err, Error) and err.code == "source_connection_lost", err
    assert mover.reconnects >= 2  # it did connect again, and lost it again
    attempts = [r.attempt for r in retries if r is not None]
    assert attempts == sorted(attempts)  # one streak, counted on
    mover.close()


def test_source_server_gone_fails_at_once(ends: Ends, tmp_path: Path) -> None:
    """A stopped VM takes its frozen view with it: no waiting for the deadline."""
    mover = make_mover(ends, None)
    t, out = run_in_thread(mover)
    when_copied(mover, 0.3)
    t0 = time.monotonic()
    ends.kill("source")
    ends.relay.close()  # the VM's socket: nobody listens on it any more
    t.join(30)
    assert time.monotonic() - t0 < 3
    err = out.get("error")
    assert isinstance(err, Error) and err.code == "source_lost", err
    assert "lost the connection to disk 2000 of the VM" in err.message
    mover.close()


def test_copy_survives_a_target_that_stops_answering(ends: Ends, tmp_path: Path) -> None:
    """A hung target (SIGSTOP: the connection stays, nothing answers) counts
    as dropped after stall_timeout; attempts that get no handshake time out."""
    retries: list[Retrying | None] = []
    mover = make_mover(ends, None, stall_timeout=1.0, on_retry=retries.append)
    t, out = run_in_thread(mover)
    when_copied(mover, 0.3)
    assert ends.dst_server.proc is not None
    pid = ends.dst_server.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 15
        while not any(r is not None and r.attempt >= 2 for r in retries):
            assert time.monotonic() < deadline, retries
            time.sleep(0.05)
    finally:
        os.kill(pid, signal.SIGCONT)
    t.join(60)
    assert "error" not in out, out.get("error")
    assert "no answer for 1 s" in next(r.reason for r in retries if r is not None)
    ends.stop()
    assert img.compare(str(ends.target), str(ends.source))


def test_incremental_survives_a_killed_target(tmp_path: Path) -> None:
    """A dirty-extent plan into a target with a backing file: zero runs are
    written too, and the resumed copy starts at the flushed mark."""
    rng = random.Random(12)
    base = tmp_path / "base.raw"
    make_source(base, rng)
    source = tmp_path / "src.raw"
    source.write_bytes(base.read_bytes())
    dirty: list[tuple[int, int]] = []
    with open(source, "r+b") as f:
        for mib in range(1, SIZE // MiB - 1, 3):
            f.seek(mib * MiB)
            # Some changed areas become zero, the others new data.
            f.write(bytes(MiB) if mib % 2 else rng.randbytes(MiB))
            dirty.append((mib * MiB, MiB))
    ends = Ends(tmp_path, backing=base)
    try:
        prev = tmp_path / "prev.x3"
        # The base's hash list, as the previous restore point's.
        with QemuNbdServer(str(base), fmt="raw", socket_path=str(tmp_path / "b.sock")) as b:
            h = nbd.NBD()
            h.add_meta_context("base:allocation")
            h.connect_uri(b.url)
            Mover(h, None, SIZE, hashes=BlockHashList(prev, SIZE)).run()
            h.shutdown()
        hashes = BlockHashList(tmp_path / "new.x3", SIZE, base=prev)
        mover = make_mover(
            ends, hashes, dirty_extents=dirty, target_is_zero=False, max_rate=10 * MiB
        )
        t, out = run_in_thread(mover)
        when_copied(mover, 0.4)
        ends.kill("target")
        time.sleep(0.3)
        ends.serve_again("target")
        t.join(60)
        assert "error" not in out, out.get("error")
        assert mover.reconnects == 1
        ends.stop()
        assert img.compare(str(ends.target), str(source))
        assert out["result"].digest == digest_of_image(str(source), fmt="raw")
    finally:
        ends.stop()


def sockets() -> int:
    """Sockets this process holds (the mover's connections among them)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def test_deadline_fails_naming_the_target(ends: Ends, tmp_path: Path) -> None:
    retries: list[Retrying | None] = []
    gc.collect()  # handles of earlier tests
    before = sockets()
    mover = make_mover(ends, None, reconnect_deadline=2.0, on_retry=retries.append)
    t, out = run_in_thread(mover)
    when_copied(mover, 0.3)
    ends.kill("target")
    t0 = time.monotonic()
    t.join(30)
    assert not t.is_alive()
    waited = time.monotonic() - t0
    err = out.get("error")
    assert isinstance(err, Error), err
    assert err.code == "target_connection_lost"
    assert "hub's NBD target of disk 2000" in err.message
    assert "2 s" in err.message
    assert 1.5 < waited < 6
    assert retries[-1] is not None and retries[-1].gave_up
    mover.close()
    del mover, t
    deadline = time.monotonic() + 5  # the relay's threads close their ends
    while gc.collect() is not None and sockets() > before:
        assert time.monotonic() < deadline, "connections left open"
        time.sleep(0.05)


def test_cancel_during_backoff(ends: Ends, tmp_path: Path) -> None:
    cancel = threading.Event()
    retries: list[Retrying | None] = []
    mover = make_mover(ends, None, cancel_event=cancel, on_retry=retries.append)
    t, out = run_in_thread(mover)
    when_copied(mover, 0.3)
    ends.kill("target")
    deadline = time.monotonic() + 10
    while not (retries and retries[-1] is not None and retries[-1].attempt >= 3):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Attempt 3 waits 2 s first: the cancel must not wait for it.
    t0 = time.monotonic()
    cancel.set()
    t.join(10)
    assert time.monotonic() - t0 < 0.5
    assert isinstance(out.get("error"), Cancelled)
    mover.close()


def test_first_connect_waits_for_a_target_being_served_again(ends: Ends, tmp_path: Path) -> None:
    """The target died before the node's first connect (soak finding 2): the
    worker tries again with the same backoff and deadline as after a drop,
    reports the retry, and connects once the hub serves the target again;
    a silent hub ends the wait early, and so does a cancel."""
    from sendense.node.worker import _first_connect
    from sendense.protocol.node import HUB_ASKED, WorkerJob

    ends.kill("target")
    job = WorkerJob.model_construct(
        job_dir=tmp_path, reconnect_deadline=30.0, hub_silence=0.0, nbd_tls_files={}
    )
    seen: list[Retrying | None] = []
    threading.Timer(1.2, ends.serve_again, args=("target",)).start()
    t0 = time.monotonic()
    h = _first_connect(ends.open_target, job, 2000, threading.Event(), seen.append)
    try:
        assert h.get_size() == SIZE
    finally:
        h.shutdown()
    assert 1.0 < time.monotonic() - t0 < 10
    retries = [r for r in seen if r is not None]
    assert retries and retries[0].attempt == 1 and retries[0].end == "target", seen
    assert seen[-1] is None  # cleared: "reconnected ... after N attempts"

    # The hub has been silent for longer than hub_silence: stop at once.
    ends.kill("target")
    (tmp_path / HUB_ASKED).touch()
    os.utime(tmp_path / HUB_ASKED, (time.time() - 100, time.time() - 100))
    silent = WorkerJob.model_construct(
        job_dir=tmp_path, reconnect_deadline=30.0, hub_silence=5.0, nbd_tls_files={}
    )
    with pytest.raises(Error) as e:
        _first_connect(ends.open_target, silent, 2000, threading.Event(), seen.append)
    assert e.value.code == "target_lost" and "SENDENSE_NODE_HUB_SILENCE" in e.value.message

    # A cancel during the backoff ends it at once.
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        _first_connect(ends.open_target, job, 2000, cancel, seen.append)
    assert time.monotonic() - t0 < 3
    ends.serve_again("target")  # the fixture stops it
