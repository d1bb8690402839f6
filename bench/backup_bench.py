"""Backup benchmark: Sendense against the data-path ceilings of this machine.

Run by ``make bench`` (``.venv/bin/python bench/backup_bench.py``). One run:

1. builds a disk (default 4 GiB; ``--data-fraction`` of its 4 MiB regions
   random, the rest unallocated) and starts it in a qemu-storage-daemon "VM"
   with a guest-side NBD export (``guest0``);
2. measures, per round (``--repeat N`` rounds, interleaved so that noise hits
   every row alike; each round starts from the disk as built):

   - ``qemu-img convert`` of the VM's disk to QCOW2 on the same storage (its
     default cache mode for the output is ``unsafe``: nothing is flushed, the
     data is left in the page cache), and the same with ``-t writeback``
     (flushed at the end, as a Sendense restore point is);
   - one hop: ``qemu-img convert`` from the VM's NBD export to a QCOW2 file
     (reader and QCOW2 writer in one process);
   - ``nbdcopy -C 1 -R 8 --request-size=4194304`` from the VM's NBD export into
     a qemu-nbd QCOW2 target on TCP loopback (the two-hop ceiling), with the
     hub's cluster size, and with 1 MiB and 2 MiB clusters;
   - diagnostics: Sendense's `Mover` in this process (same source and target
     as nbdcopy), with and without the digest, and its plan pass alone; and
     the Mover on a 10% incremental's request pattern (scattered 64 KiB
     blocks) into qemu-nbd as the hub starts it, then into qemu-nbd serving
     a listening socket with TCP_NODELAY (qemu-nbd 7.2 leaves Nagle on);
   - the same nbdcopy into a target with the hub's qemu-nbd cache/aio modes
     (``--cache=none --aio=native`` where O_DIRECT works: engine/backup.py);
   - a Sendense full backup end to end through real hub and node processes
     (POST /api/v1/backups until GET /api/v1/jobs/{id} says completed), with
     the CPU seconds of each process (hub, its qemu-nbd target and qemu-img,
     node, worker, the VM's qsd source) and per GiB of data;
   - a pull full (issue 11; ``--no-pull`` skips it): the node restarted with
     ``SENDENSE_NODE_TRANSFER=pull``, the hub's qemu-img reads its frozen
     disk, then the node back to push;
   - Sendense incrementals after 1% and 10% of the 64 KiB blocks changed.

   ``--quick`` keeps only the rows the last line needs.

3. prints a table, writes everything (every sample, the per-phase timeline of
   each Sendense job) to ``bench/results/<UTC stamp>.json``, and prints as its
   last line ``key=value`` pairs, starting with ``full_ratio``,
   ``full_ratio_hub_target``, ``pull_full_vs_onehop`` (one hop's time / the
   pull full's), ``pull_full_ratio``, ``cpu_s_per_gib``,
   ``full_vs_convert``, ``inc1_time_ratio``, ``inc10_time_ratio`` and
   ``mover_rss_mib``. ``Bench.sendense(..., cut_at=0.4)`` kills the job's
   target qemu-nbd once at 40 % of its bytes (bench/topology_bench.py's
   ``resume_overhead``).

Caches are warm (the VM's disk fits in memory); ``sync`` runs before each
measurement so that no measurement pays for the previous one's dirty pages.
Every process and file it makes is removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the Cluster fixture (real hub + node processes)

import nbd  # noqa: E402

from fixtures.cluster import Cluster  # noqa: E402
from sendense.mover import digest as dg  # noqa: E402
from sendense.mover.copy import DEFAULT_REQUEST_SIZE, Mover, iter_plan  # noqa: E402
from sendense.qemu.nbd_server import QemuNbdServer, stop_pid  # noqa: E402
from sendense.qemu.qsd import QsdVm  # noqa: E402
from sendense.restore.disk import direct_io_ok  # noqa: E402
from sendense.settings import HubSettings, NodeSettings  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
REGION = 4 * MiB  # unit of the random data layout
BLOCK = 64 * 1024  # dirty bitmap granularity, digest block
TARGET = HubSettings()  # the target options the hub uses (its environment's)
HUB_CLUSTER = TARGET.cluster_size
VM_NAME = "benchvm"
POLL = 0.25  # long-poll timeout of GET /api/v1/jobs/{id}?wait= (s)
NBDCOPY = ["nbdcopy", "-C", "1", "-R", "8", "--request-size=4194304"]
# Processes of ours, found by their command line mentioning the work dir.
WATCHED = (
    b"qemu-nbd",
    b"qemu-storage-daemon",
    b"qemu-img",
    b"nbdcopy",
    b"sendense.node.worker",
    b"sendense.cli.main",
)


class BenchError(Exception):
    pass


def say(msg: str) -> None:
    print(f"# {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gibs(nbytes: float, seconds: float) -> float:
    return nbytes / GiB / seconds if seconds > 0 else 0.0


# --------------------------------------------------------------------------
# Samples and rows
# --------------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    logical: int  # bytes the measurement covers (the disk size)
    data: int  # bytes of data actually moved
    rss: int | None = None  # peak RSS of the copying process, bytes
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    key: str
    title: str
    kind: str  # "copy" (a whole disk), "incremental", or "scatter" (diagnostic)
    samples: list[Sample] = field(default_factory=list)

    def pick(self, stat: str) -> Sample:
        if not self.samples:
            raise BenchError(f"no sample for {self.key}")
        ordered = sorted(self.samples, key=lambda s: s.seconds)
        if stat == "best":
            return ordered[0]
        # median: the middle sample (the lower one of an even count), so that
        # its data/rss/extra belong to the same run as its time.
        return ordered[(len(ordered) - 1) // 2]

    def seconds(self, stat: str) -> float:
        if stat == "median" and len(self.samples) % 2 == 0 and self.samples:
            return statistics.median(s.seconds for s in self.samples)
        return self.pick(stat).seconds


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def vm_hwm(pid: int) -> int | None:
    """Peak RSS (bytes) of process ``pid`` since its exec (``VmHWM``).

    Not ``ru_maxrss``: that one keeps the RSS the process had before its exec,
    i.e. its parent's (a child of a 300 MiB Python reports 300 MiB).
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_times(pid: int) -> tuple[float, float]:
    """(user+system CPU seconds of ``pid``, of its reaped children); zeros if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def run_timed(argv: list[str], log: Path) -> tuple[float, int]:
    """Run ``argv`` to completion; its wall time and peak RSS (bytes, sampled)."""
    peak = 0
    done = threading.Event()

    def sample(pid: int) -> None:
        nonlocal peak
        while not done.wait(0.02):
            peak = max(peak, vm_hwm(pid) or 0)

    with open(log, "ab") as f:
        f.write(f"$ {' '.join(argv)}\n".encode())
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
        sampler.start()
        try:
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            done.set()
            sampler.join()
        seconds = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise BenchError(f"{argv[0]} exited with {rc}: {tail}")
    return seconds, peak


def run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited with {proc.returncode}: {proc.stderr}")
    return proc.stdout


def ours(root: Path) -> list[tuple[int, str]]:
    """Live processes started by this benchmark (their command line names ``root``)."""
    needle = str(root).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in cmdline and any(w in cmdline for w in WATCHED):
            found.append((int(entry), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def terminate(pids: list[int], timeout: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
        if not alive:
            return
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Target:
    """A fresh QCOW2 served by qemu-nbd on TCP loopback.

    As the hub does it (`QemuNbdServer`: writeback cache, 8 clients, discard),
    or, with ``nodelay``, from a listening socket this process made with
    TCP_NODELAY and handed over by socket activation (``LISTEN_FDS``): qemu-nbd
    7.2 does not set TCP_NODELAY on the connections it accepts, but accepted
    sockets inherit it from the listener.
    """

    def __init__(
        self,
        path: Path,
        size: int,
        cluster: int,
        logs: Path,
        *,
        nodelay: bool = False,
        io: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        opts = f"cluster_size={cluster}"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), str(size)])
        self.server: QemuNbdServer | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        if not nodelay:
            self.server = QemuNbdServer(
                str(path),
                export_name="bench",
                host="127.0.0.1",
                port=free_port(),
                log_path=str(logs / "qemu-nbd.log"),
                # The reference (nbdcopy's ceiling) runs qemu-nbd as shipped;
                # with the hub's modes (io) also with the hub's malloc settings.
                tune_malloc=io is not None,
                **(io or {}),
            )
            self.server.start()
            self.url = self.server.url
            return
        with socket.socket() as lsock:
            lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(16)
            fd = lsock.fileno()
            self.url = f"nbd://127.0.0.1:{lsock.getsockname()[1]}/bench"
            move = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "
            argv = ["sh", "-c", move + 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"', "sh"]
            argv += QemuNbdServer(str(path), export_name="bench", port=0).argv()
            # No --bind/--port with socket activation.
            argv = [a for a in argv if not a.startswith(("--bind=", "--port="))]
            with open(logs / "qemu-nbd.log", "ab") as log:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    pass_fds=(fd,),
                    start_new_session=True,
                )

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def hub_target_io(work: Path) -> dict[str, Any]:
    """The cache/aio modes the hub gives its targets here (engine/backup.py
    `_target_io`, with this run's settings and file system)."""
    cache, aio = TARGET.nbd_target_cache, TARGET.nbd_target_aio or None
    if cache == "auto":
        cache = "none" if direct_io_ok(work) else "writeback"
    if aio is None and cache in ("none", "directsync"):
        aio = "native"
    return {"cache": cache, "aio": aio}


@contextlib.contextmanager
def nbd_target(
    path: Path,
    size: int,
    cluster: int,
    logs: Path,
    *,
    nodelay: bool = False,
    io: dict[str, Any] | None = None,
) -> Iterator[Target]:
    target = Target(path, size, cluster, logs, nodelay=nodelay, io=io)
    try:
        yield target
    finally:
        target.stop()
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------
# The disk
# --------------------------------------------------------------------------


def build_disk(vm: QsdVm, work: Path, size: int, fraction: float, rng: random.Random) -> int:
    """The VM's disk: ``fraction`` of its 4 MiB regions random, the rest holes.

    Written as a sparse raw file (a few random 4 MiB buffers, every 64 KiB
    block stamped with its position so that no two blocks are equal), then
    ``qemu-img convert`` into the VM's QCOW2. Returns the bytes of data.
    """
    disk = vm.add_disk(size)
    raw = work / "build.raw"
    regions = size // REGION
    chosen = sorted(rng.sample(range(regions), round(regions * fraction)))
    pool = [os.urandom(REGION) for _ in range(4)]
    fd = os.open(raw, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for n, region in enumerate(chosen):
            buf = bytearray(pool[n % len(pool)])
            for off in range(0, REGION, BLOCK):
                buf[off : off + 16] = struct.pack("<QQ", region, off)
            os.pwrite(fd, buf, region * REGION)
    finally:
        os.close(fd)
    opts = f"cluster_size={BLOCK}"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", opts, str(raw), str(disk)])
    raw.unlink()
    return len(chosen) * REGION


def build_scatter(path: Path, size: int, fraction: float, rng: random.Random) -> Path:
    """A QCOW2 holding random data in ``fraction`` of its 64 KiB blocks, at
    random, the rest holes: a 10% incremental's request pattern as a full copy."""
    raw = path.with_suffix(".raw")
    pool = os.urandom(8 * MiB)
    fd = os.open(raw, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        nblocks = size // BLOCK
        for block in sorted(rng.sample(range(nblocks), max(1, round(nblocks * fraction)))):
            start = rng.randrange(0, len(pool) - BLOCK)
            piece = bytearray(pool[start : start + BLOCK])
            piece[:8] = struct.pack("<Q", block)
            os.pwrite(fd, piece, block * BLOCK)
    finally:
        os.close(fd)
    opts = f"cluster_size={BLOCK}"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", opts, str(raw), str(path)])
    raw.unlink()
    return path


def data_bytes(image: Path) -> int:
    """Allocated data of an image (``qemu-img map``), whatever its chain."""
    extents = json.loads(run(["qemu-img", "map", "-U", "--output=json", str(image)]))
    return sum(int(e["length"]) for e in extents if e.get("data"))


def guest_change(vm: QsdVm, size: int, fraction: float, rng: random.Random) -> int:
    """The guest rewrites ``fraction`` of the 64 KiB blocks, at random, with
    new random data; returns the bytes written."""
    nblocks = size // BLOCK
    picks = rng.sample(range(nblocks), max(1, round(nblocks * fraction)))
    pool = os.urandom(8 * MiB)
    stamp = rng.getrandbits(63)
    h = vm.guest(0)
    try:
        for block in picks:
            start = rng.randrange(0, len(pool) - BLOCK)
            piece = bytearray(pool[start : start + BLOCK])
            piece[:16] = struct.pack("<QQ", stamp, block)
            h.pwrite(piece, block * BLOCK)
        h.flush()
    finally:
        h.shutdown()
    return len(picks) * BLOCK


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True)
        self.size = int(args.size_gib * GiB) // REGION * REGION
        if self.size < REGION:
            raise BenchError("--size-gib is too small")
        self.rng = random.Random(args.seed)
        self.vm = QsdVm(work / "vm", VM_NAME)
        self.cluster = Cluster(work / "cluster")
        self.scatter_server: QemuNbdServer | None = None
        self.scatter_uri = ""
        self.rows: dict[str, Row] = {}
        self.jobs: list[dict[str, Any]] = []
        # The hub's qemu-nbd target options as run (read from its command line).
        self.target_options = ""
        self.data = 0

    # -- setup -------------------------------------------------------------

    def setup(self) -> None:
        t0 = time.monotonic()
        say(f"building a {self.size / GiB:g} GiB disk, {self.args.data_fraction:.0%} random data")
        self.data = build_disk(self.vm, self.work, self.size, self.args.data_fraction, self.rng)
        if self.args.repeat > 1:
            # Every round starts from this disk: the incrementals' scattered
            # writes fragment it, and a fragmented disk is another benchmark.
            shutil.copyfile(self.disk, self.golden)
        self.vm.start()
        if not self.args.quick:
            image = build_scatter(self.work / "scatter.qcow2", self.size, 0.10, self.rng)
            self.scatter_server = QemuNbdServer(
                str(image),
                export_name="scatter",
                socket_path=str(self.work / "scatter.sock"),
                read_only=True,
                log_path=str(self.logs / "scatter.log"),
            )
            self.scatter_server.start()
            self.scatter_uri = self.scatter_server.url
        say(f"disk built and VM started in {time.monotonic() - t0:.1f}s")
        (self.work / "cluster").mkdir()
        self.cluster.start_node()
        self.cluster.start_hub()
        reg = self.cluster.register(self.vm)
        disks = reg["vms"][0]["disks"]
        if len(disks) != 1 or disks[0]["capacity_bytes"] != self.size:
            raise BenchError(f"discovery found {disks}")
        say(f"hub {self.cluster.hub_url} and node {self.cluster.node_url} up, VM registered")

    @property
    def golden(self) -> Path:
        return self.work / "golden.qcow2"

    @property
    def disk(self) -> Path:
        return self.vm.disks[0]

    @property
    def guest_uri(self) -> str:
        return f"nbd+unix:///guest0?socket={self.vm.guest_socket}"

    def row(self, key: str, title: str, kind: str = "copy") -> Row:
        if key not in self.rows:
            self.rows[key] = Row(key, title, kind)
        return self.rows[key]

    def add(self, key: str, title: str, sample: Sample, kind: str = "copy") -> None:
        self.row(key, title, kind).samples.append(sample)
        line = f"{title}: {sample.seconds:.3f}s, {gibs(sample.logical, sample.seconds):.2f} GiB/s"
        if sample.rss:
            line += f", rss {sample.rss / MiB:.0f} MiB"
        say(line)

    # -- rows --------------------------------------------------------------

    def convert(self) -> None:
        out = self.work / "convert.qcow2"
        argv = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2"]
        argv += ["-o", f"cluster_size={HUB_CLUSTER}", str(self.disk), str(out)]
        try:
            os.sync()
            seconds, rss = run_timed(argv, self.logs / "convert.log")
            self.add(
                "convert",
                "qemu-img convert qcow2 -> qcow2 (same storage; no flush)",
                Sample(seconds, self.size, self.data, rss),
            )
        finally:
            out.unlink(missing_ok=True)

    def convert_durable(self) -> None:
        out = self.work / "convert-wb.qcow2"
        argv = ["qemu-img", "convert", "-U", "-t", "writeback", "-f", "qcow2", "-O", "qcow2"]
        argv += ["-o", f"cluster_size={HUB_CLUSTER}", str(self.disk), str(out)]
        try:
            os.sync()
            seconds, rss = run_timed(argv, self.logs / "convert.log")
            self.add(
                "convert_durable",
                "qemu-img convert -t writeback (flushed, as Sendense is)",
                Sample(seconds, self.size, self.data, rss),
            )
        finally:
            out.unlink(missing_ok=True)

    def one_hop(self) -> None:
        out = self.work / "onehop.qcow2"
        argv = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"]
        argv += ["-o", f"cluster_size={HUB_CLUSTER}", self.guest_uri, str(out)]
        try:
            os.sync()
            seconds, rss = run_timed(argv, self.logs / "onehop.log")
            self.add(
                "onehop",
                "qemu-img convert NBD export -> qcow2 (one hop)",
                Sample(seconds, self.size, self.data, rss),
            )
        finally:
            out.unlink(missing_ok=True)

    def nbdcopy(self, cluster: int, *, hub_io: bool = False) -> None:
        """nbdcopy into a qemu-nbd target (qemu's default cache mode), or with
        ``hub_io`` into one with the hub's target cache/aio modes (the same
        target as Sendense's full writes into, engine/backup.py)."""
        target = self.work / f"nbdcopy-{cluster}.qcow2"
        io = hub_target_io(self.work) if hub_io else None
        with nbd_target(target, self.size, cluster, self.logs, io=io) as server:
            os.sync()
            seconds, rss = run_timed(
                [*NBDCOPY, self.guest_uri, server.url], self.logs / "nbdcopy.log"
            )
            # qemu-nbd closes the image on SIGTERM (writes its metadata, flushes):
            # not in the ceiling, but the hub pays it, so it is recorded.
            t0 = time.perf_counter()
            server.stop()
            close = time.perf_counter() - t0
        key = "nbdcopy" if cluster == HUB_CLUSTER else f"nbdcopy_{cluster // 1024}k"
        title = f"nbdcopy NBD -> qemu-nbd qcow2, {cluster // 1024} KiB clusters"
        if cluster == HUB_CLUSTER:
            title += " (ceiling)"
        if hub_io:
            key += "_hub_io"
            title = f"nbdcopy -> qemu-nbd with the hub's target modes ({io})"
        self.add(key, title, Sample(seconds, self.size, self.data, rss, {"close_s": close}))

    def mover(self, with_digest: bool) -> None:
        """Sendense's Mover in this process: the data path without hub and node."""
        key, title = "mover", "Sendense Mover in-process, with digest (diagnostic)"
        if not with_digest:
            key, title = "mover_nodigest", "Sendense Mover in-process, no digest (diagnostic)"
        self._mover(self.guest_uri, key, title, "copy", with_digest=with_digest)

    def scatter(self, nodelay: bool) -> None:
        """The request pattern of a 10% incremental (scattered 64 KiB blocks),
        without hub, node or fleece: what the target's socket costs."""
        key, title = "scatter", "Mover, 10% scattered 64 KiB blocks -> qemu-nbd as hub"
        if nodelay:
            key, title = "scatter_nodelay", "same, qemu-nbd with a TCP_NODELAY listener"
        self._mover(self.scatter_uri, key, title, "scatter", with_digest=True, nodelay=nodelay)

    def _mover(
        self,
        source: str,
        key: str,
        title: str,
        kind: str,
        *,
        with_digest: bool,
        nodelay: bool = False,
    ) -> None:
        target = self.work / "mover.qcow2"
        hash_path = self.work / "mover.b3"
        with nbd_target(target, self.size, HUB_CLUSTER, self.logs, nodelay=nodelay) as server:
            src = nbd.NBD()
            src.add_meta_context("base:allocation")
            src.connect_uri(source)
            dst = nbd.NBD()
            dst.connect_uri(server.url)
            try:
                os.sync()
                t0 = time.perf_counter()
                plan = 0
                data_requests = 0
                for e in iter_plan(src, self.size, None):
                    if not e.zero:
                        plan += e.length
                        data_requests += -(-e.length // DEFAULT_REQUEST_SIZE)
                plan_s = time.perf_counter() - t0
                hashes = dg.BlockHashList(hash_path, self.size) if with_digest else None
                t0 = time.perf_counter()
                result = Mover(src, dst, self.size, hashes=hashes).run()
                seconds = time.perf_counter() - t0
            finally:
                for h in (src, dst):
                    with contextlib.suppress(Exception):
                        h.shutdown()
                hash_path.unlink(missing_ok=True)
        if result.data_bytes != plan:
            raise BenchError(f"mover moved {result.data_bytes} bytes, planned {plan}")
        extra = {"plan_s": plan_s, "requests": data_requests}
        self.add(key, title, Sample(seconds, self.size, result.data_bytes, None, extra), kind)

    def sendense(
        self,
        kind: str,
        key: str,
        title: str,
        transfer: str = "push",
        *,
        cut_at: float | None = None,
    ) -> Sample:
        """One Sendense backup through the API, timed to its end.

        ``cut_at``: once the job has moved this share of its bytes, its
        target's qemu-nbd is killed (SIGKILL) once: the connection drops, the
        hub serves the target again and the node's mover resumes (issue 11).
        """
        c = self.cluster
        assert c.hub is not None and c.node is not None and self.vm.pid is not None
        watched = {"hub": c.hub.pid, "node": c.node.pid, "vm": self.vm.pid}
        os.sync()
        cpu0 = {k: cpu_times(p) for k, p in watched.items()}
        self_cpu0 = time.process_time()
        wall0 = time.time()
        t0 = time.perf_counter()
        started = c.client.post(
            "/api/v1/backups",
            {"vm_name": VM_NAME, "repository_id": "default", "backup_type": kind},
        )
        post_s = time.perf_counter() - t0
        job_id = started["job_id"]
        job_dir = c.node_dir / "jobs" / job_id
        deadline = time.monotonic() + self.args.job_timeout
        worker_pid = 0
        hwm = 0
        worker_cpu = 0.0
        # The hub's qemu-nbd targets (pidfiles in run/): sampled, they are
        # reaped into the hub's children's CPU at the end with qemu-img's.
        target_cpu: dict[int, float] = {}
        cut: dict[str, Any] = {}
        while True:
            # Long-poll: answers the moment the job ends (no polling load on
            # the hub, which shares the 2 cores with the data path).
            job: dict[str, Any] = c.client.get(f"/api/v1/jobs/{job_id}", wait=POLL)
            if job["status"] in ("completed", "failed", "cancelled"):
                break
            if not worker_pid:
                with contextlib.suppress(OSError, ValueError):
                    worker_pid = int((job_dir / "pid").read_text())
            if worker_pid:
                hwm = max(hwm, vm_hwm(worker_pid) or 0)
                # Sampled: the worker may be gone (or a zombie) at the end.
                worker_cpu = max(worker_cpu, cpu_times(worker_pid)[0])
            for pidfile in (c.hub_dir / "run").glob("nbd-*.pid"):
                with contextlib.suppress(OSError, ValueError):
                    pid = int(pidfile.read_text())
                    target_cpu[pid] = max(target_cpu.get(pid, 0.0), cpu_times(pid)[0])
                    if not self.target_options:
                        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                        self.target_options = " ".join(
                            a for a in argv if a.startswith(("--cache=", "--aio=", "--tls-creds"))
                        )
            if (
                cut_at is not None
                and not cut
                and job["bytes_total"]
                and job["bytes_done"] >= cut_at * job["bytes_total"]
            ):
                cut = self.cut_target(job)
            if job.get("retry") or job["step"] == "retrying":
                cut.setdefault("retry_seen", job.get("retry") or job["step"])
            if time.monotonic() > deadline:
                raise BenchError(f"{kind} job {job_id} still {job['status']}")
        seconds = time.perf_counter() - t0
        wall1 = time.time()
        self_cpu = time.process_time() - self_cpu0
        cpu1 = {k: cpu_times(p) for k, p in watched.items()}
        children = cpu1["hub"][1] - cpu0["hub"][1]
        nbd_target = sum(target_cpu.values())
        cpu = {
            "hub": cpu1["hub"][0] - cpu0["hub"][0],
            # The hub's qemu-nbd targets (sampled, so a little low) and the
            # rest of its reaped children: qemu-img (check; convert in pull).
            "qemu_nbd_target": nbd_target,
            "qemu_img": max(0.0, children - nbd_target),
            "node": cpu1["node"][0] - cpu0["node"][0],
            "worker": worker_cpu,
            "vm_qsd_source": cpu1["vm"][0] - cpu0["vm"][0],
            "bench_polling": self_cpu,
        }
        if job["status"] != "completed":
            raise BenchError(f"{kind} backup {job['status']}: {job.get('error')}")
        if cut_at is not None and not cut:
            raise BenchError(f"{kind} backup ended before the cut at {cut_at:.0%}")
        status = json.loads((job_dir / "status.json").read_text())
        backups = [c.client.get(f"/api/v1/backups/{b}") for b in job["backups"]]
        if [b["backup_type"] for b in backups] != [kind]:
            raise BenchError(f"asked for a {kind} backup, got {backups}")
        b = backups[0]
        disk = next(iter(status["disks"].values()))
        if transfer == "pull" and not disk.get("pull_url"):
            raise BenchError(f"asked for a pull, the node pushed: {disk}")
        moved = int(disk.get("data_bytes") or 0)
        rss = int(status.get("mover_peak_rss_bytes") or 0)
        # Outside the timed span: what the hub's check of this file costs.
        t = time.perf_counter()
        run(["qemu-img", "check", "-U", "--output=json", b["file_path"]])
        check_s = time.perf_counter() - t
        phases = timeline(wall0, wall1, post_s, job_dir, c.root / "hub.log", job_id, status)
        record = {
            "row": key,
            "job_id": job_id,
            "backup_type": kind,
            "seconds": seconds,
            "post_s": post_s,
            "data_bytes": moved,
            "requests": disk.get("requests"),
            "mover_seconds": disk.get("seconds"),
            "mover_peak_rss_bytes": rss,
            "worker_vm_hwm_bytes": hwm,
            "size_on_disk": b["size_on_disk"],
            "file_path": b["file_path"],
            "qemu_img_check_s": check_s,
            "phases": phases,
            "cpu_seconds": cpu,
            "transfer": transfer,
            "cut": cut or None,
        }
        self.jobs.append(record)
        sample = Sample(
            seconds,
            self.size,
            moved,
            rss,
            {
                "size_on_disk": b["size_on_disk"],
                "job_id": job_id,
                "worker_hwm": hwm,
                "phases": phases,
                "cpu": cpu,
            },
        )
        self.add(key, title, sample, "incremental" if kind == "incremental" else "copy")
        say("  phases: " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
        say("  cpu seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()))
        return sample

    def cut_target(self, job: dict[str, Any]) -> dict[str, Any]:
        """Kill the job's first target qemu-nbd (SIGKILL): a dropped connection."""
        pidfile = self.cluster.hub_dir / "run" / f"nbd-{job['backups'][0]}.pid"
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGKILL)
        say(f"  cut: killed target qemu-nbd {pid} at {job['percent']}%")
        return {"pid": pid, "percent": job["percent"], "at": time.time()}

    @property
    def pull(self) -> bool:
        """Measure pull fulls: asked for, and this node knows the setting."""
        return self.args.pull and "transfer" in NodeSettings.model_fields

    def node_transfer(self, mode: str) -> None:
        """Restart the node with SENDENSE_NODE_TRANSFER=mode (push or pull)."""
        c = self.cluster
        c.kill("node", signal.SIGTERM)
        c.node_env = {**c.node_env, "SENDENSE_NODE_TRANSFER": mode}
        c.start_node()

    def changes(self, fraction: float) -> None:
        written = guest_change(self.vm, self.size, fraction, self.rng)
        say(f"guest rewrote {fraction:.0%} of the 64 KiB blocks ({written / MiB:.0f} MiB)")

    # -- the run -----------------------------------------------------------

    def round(self, n: int) -> None:
        say(f"round {n + 1}/{self.args.repeat}")
        if n > 0:
            # The previous rounds' restore points go (each round holds two
            # fulls and two incrementals, ~5 GiB: three rounds filled the
            # shared disk until the repository refused the next full).
            self.drop_restore_points()
            # The disk as built, again (the VM's bitmaps go with it: each round
            # starts with a full backup).
            self.vm.stop()
            shutil.copyfile(self.golden, self.disk)
            self.vm.start()
        self.data = data_bytes(self.disk)
        self.convert()
        if not self.args.quick:
            self.convert_durable()
        self.one_hop()
        self.nbdcopy(HUB_CLUSTER)
        self.nbdcopy(HUB_CLUSTER, hub_io=True)
        if not self.args.quick:
            for cluster in (1 * MiB, 2 * MiB):
                self.nbdcopy(cluster)
            self.mover(with_digest=True)
            self.mover(with_digest=False)
            self.scatter(nodelay=False)
            self.scatter(nodelay=True)
        full = self.sendense("full", "full", "Sendense full, API call to job completed")
        # Measured: it goes now, so that the next full finds room on a shared
        # disk (the repository asks for the disk's whole size free); the
        # incrementals below build on the next full.
        self.drop_restore_points()
        # The same full with its target's qemu-nbd killed once at 40 % of its
        # bytes: the hub serves it again, the mover resumes from its last
        # flushed position (issue 11; resume_overhead = this / the full).
        self.sendense("full", "resume_full", "Sendense full, target killed at 40 %", cut_at=0.4)
        if self.pull:
            self.node_transfer("pull")
            try:
                self.sendense("full", "pull_full", "Sendense full, pull (hub reads)", "pull")
            finally:
                self.node_transfer("push")
        self.changes(0.01)
        inc1 = self.sendense("incremental", "inc1", "Sendense incremental, 1% of blocks changed")
        self.changes(0.10)
        inc10 = self.sendense("incremental", "inc10", "Sendense incremental, 10% of blocks changed")
        for s in (inc1, inc10):
            s.extra["time_ratio"] = s.seconds / full.seconds
            s.extra["size_ratio"] = s.extra["size_on_disk"] / max(1, full.extra["size_on_disk"])

    def drop_restore_points(self) -> None:
        """Delete the VM's restore points through the API (fulls with their
        dependents)."""
        c = self.cluster
        page = c.client.get("/api/v1/backups", vm_name=VM_NAME, backup_type="full", limit=100)
        for b in page["backups"]:
            with contextlib.suppress(Exception):  # already gone with another's cascade
                c.client.request(
                    "DELETE", f"/api/v1/backups/{b['backup_id']}", params={"cascade": "true"}
                )

    def cleanup(self) -> None:
        """Stop everything this run started, in dependency order."""
        # Workers first (SIGTERM = cancel: they give the VM its state back).
        workers = [p for p, cmd in ours(self.work) if "sendense.node.worker" in cmd]
        terminate(workers, timeout=15)
        with contextlib.suppress(Exception):
            self.cluster.stop()
        for pidfile in (self.cluster.hub_dir / "run").glob("nbd-*.pid"):
            with contextlib.suppress(ValueError, OSError):
                stop_pid(int(pidfile.read_text().strip()))
        if self.scatter_server is not None:
            with contextlib.suppress(Exception):
                self.scatter_server.stop()
        with contextlib.suppress(Exception):
            self.vm.stop()
        left = ours(self.work)
        if left:
            say(f"stopping leftover processes: {left}")
            terminate([p for p, _ in left])


def timeline(
    wall0: float,
    wall1: float,
    post_s: float,
    job_dir: Path,
    hub_log: Path,
    job_id: str,
    status: dict[str, Any],
) -> dict[str, float]:
    """Where one job's time went, from the worker's and the hub's own records.

    Marks (wall clock): POST sent; job handed to a worker process (mtime of
    the job's pid file, which the node writes right after that, whether it
    spawned the worker then or had one started ahead); worker running
    (status.json ``started_at``: interpreter and imports done); VM frozen,
    disk copied, worker done (job.log); the hub's "status=..." log line
    (after qemu-nbd stop, qemu-img check, sidecar); the benchmark seeing
    "completed". ``mover_run`` (the worker's own figure for `Mover.run`:
    plan pass, copy, flush, digest) lies inside ``connect_and_copy``.
    """
    marks: dict[str, float] = {"post": wall0}
    with contextlib.suppress(OSError):
        marks["spawned"] = (job_dir / "pid").stat().st_mtime
    marks["running"] = datetime.fromisoformat(status["started_at"]).timestamp()
    mover_seconds = 0.0
    for d in status.get("disks", {}).values():
        mover_seconds += float(d.get("seconds") or 0)
    for line in _lines(job_dir / "job.log"):
        stamp, msg = _log_time(line)
        if stamp is None:
            continue
        if " frozen disks=" in msg:
            marks["frozen"] = stamp
        elif " data_bytes=" in msg and " seconds=" in msg:
            marks["copied"] = stamp
        elif " status=" in msg:
            marks["worker_done"] = stamp
    for line in _lines(hub_log):
        stamp, msg = _log_time(line)
        if stamp is not None and f"job={job_id} status=" in msg:
            marks["hub_done"] = stamp
    marks["seen"] = wall1
    out: dict[str, float] = {"post_roundtrip": post_s}
    names = {
        "spawned": "hub_prepare_and_handoff",
        "running": "worker_start",
        "frozen": "freeze",
        "copied": "connect_and_copy",
        "worker_done": "release",
        "hub_done": "hub_notice_and_finish",
        "seen": "commit_and_client_notice",
    }
    prev = "post"
    for mark, name in names.items():
        if mark in marks:
            out[name] = marks[mark] - marks[prev]
            prev = mark
    out["mover_run"] = mover_seconds
    return out


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _log_time(line: str) -> tuple[float | None, str]:
    """(epoch seconds, rest) of a ``%(asctime)s ...`` log line (local time)."""
    try:
        stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None, line
    return stamp, line[23:]


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def report(bench: Bench, stat: str) -> tuple[list[str], dict[str, Any], str]:
    rows = bench.rows
    full_s = rows["full"].seconds(stat)
    ceiling_s = rows["nbdcopy"].seconds(stat)
    convert_s = rows["convert"].seconds(stat)
    size = bench.size
    W = max(len(r.title) for r in rows.values())

    header = (
        f"{'measurement':<{W}} {'wall s':>8} {'logical':>8} {'data':>8} "
        f"{'/nbdcopy':>8} {'/convert':>8}  notes"
    )
    lines = [header, "-" * len(header)]
    table: list[dict[str, Any]] = []
    for row in rows.values():
        s = row.pick(stat)
        secs = row.seconds(stat)
        entry: dict[str, Any] = {
            "key": row.key,
            "title": row.title,
            "kind": row.kind,
            "seconds": secs,
            "logical_gibs": gibs(size, secs),
            "data_gibs": gibs(s.data, secs),
            "data_bytes": s.data,
            "peak_rss_bytes": s.rss,
            "samples": [
                {
                    "seconds": x.seconds,
                    "data_bytes": x.data,
                    "peak_rss_bytes": x.rss,
                    **{k: v for k, v in x.extra.items() if k != "phases"},
                }
                for x in row.samples
            ],
        }
        notes = []
        if row.kind == "scatter":
            reqs = int(s.extra.get("requests") or 0)
            entry["requests"] = reqs
            entry["requests_per_s"] = reqs / secs
            rel = f"{'':>8} {'':>8}"
            notes.append(f"{reqs} data requests, {reqs / secs:,.0f}/s")
        elif row.kind == "copy":
            entry["vs_nbdcopy"] = ceiling_s / secs
            entry["vs_convert"] = convert_s / secs
            rel = f"{entry['vs_nbdcopy']:>8.2f} {entry['vs_convert']:>8.2f}"
        else:
            entry["time_ratio_vs_full"] = secs / full_s
            entry["size_on_disk"] = s.extra.get("size_on_disk")
            entry["size_ratio_vs_full"] = s.extra.get("size_ratio")
            rel = f"{'':>8} {'':>8}"
            notes.append(f"{entry['time_ratio_vs_full']:.2f}x full time")
            notes.append(f"{s.data / MiB:.0f} MiB moved")
            if s.extra.get("size_ratio") is not None:
                notes.append(f"qcow2 {s.extra['size_on_disk'] / MiB:.0f} MiB")
                notes.append(f"{s.extra['size_ratio']:.1%} of full")
        if s.rss:
            notes.append(f"rss {s.rss / MiB:.0f} MiB")
        if s.extra.get("worker_hwm"):
            notes.append(f"worker VmHWM {s.extra['worker_hwm'] / MiB:.0f} MiB")
        if "close_s" in s.extra:
            notes.append(f"qemu-nbd close {s.extra['close_s']:.2f}s")
        if "plan_s" in s.extra:
            notes.append(f"plan pass alone {s.extra['plan_s']:.3f}s")
        if row.key == "full":
            notes.append(f"qcow2 {s.extra['size_on_disk'] / MiB:.0f} MiB")
        if len(row.samples) > 1:
            notes.append(f"{stat} of {len(row.samples)}")
        lines.append(
            f"{row.title:<{W}} {secs:>8.3f} {gibs(size, secs):>8.2f} {gibs(s.data, secs):>8.2f} "
            f"{rel}  {', '.join(notes)}"
        )
        table.append(entry)
    lines.append("(logical and data in GiB/s; /nbdcopy and /convert: throughput ratios)")

    # Median phases and CPU seconds of the Sendense jobs, per row.
    for key in ("full", "pull_full", "inc1", "inc10"):
        if key not in rows:
            continue
        for what in ("phases", "cpu"):
            runs = [x.extra[what] for x in rows[key].samples]
            med = {n: statistics.median(r.get(n, 0.0) for r in runs) for n in runs[0]}
            label = "phases (s)" if what == "phases" else "CPU seconds"
            lines.append(f"{key} {label}: " + ", ".join(f"{n} {v:.3f}" for n, v in med.items()))

    # CPU seconds per GiB of data moved, per process, of the median full.
    per_gib: dict[str, float] = {}
    for key in ("full", "pull_full"):
        if key in rows:
            s = rows[key].pick(stat)
            gib = max(s.data, 1) / GiB
            cpu = {n: v for n, v in s.extra["cpu"].items() if n != "bench_polling"}
            per_gib[key] = sum(cpu.values()) / gib
            lines.append(
                f"{key} CPU s/GiB: "
                + ", ".join(f"{n} {v / gib:.2f}" for n, v in cpu.items())
                + f"; total {per_gib[key]:.2f}"
            )
    lines.append(
        f"target options: {bench.target_options or '(not seen)'} cluster_size={HUB_CLUSTER}"
        f" (SENDENSE_NBD_TARGET_CACHE={TARGET.nbd_target_cache})"
    )

    jobs = [x for k in ("full", "inc1", "inc10") for x in rows[k].samples]
    rss = max((x.rss or 0) for x in jobs)
    hwm = max(int(x.extra.get("worker_hwm") or 0) for x in jobs)
    inc1 = rows["inc1"].pick(stat)
    inc10 = rows["inc10"].pick(stat)
    onehop_s = rows["onehop"].seconds(stat)
    same_target_s = rows["nbdcopy_hub_io"].seconds(stat) if "nbdcopy_hub_io" in rows else None
    summary: dict[str, Any] = {
        "full_ratio": ceiling_s / full_s,
        # The same ceiling into a target with the hub's cache/aio modes.
        "full_ratio_hub_target": same_target_s / full_s if same_target_s else None,
        "pull_full_vs_onehop": (
            onehop_s / rows["pull_full"].seconds(stat) if "pull_full" in rows else None
        ),
        "pull_full_ratio": (
            ceiling_s / rows["pull_full"].seconds(stat) if "pull_full" in rows else None
        ),
        "resume_overhead": (
            rows["resume_full"].seconds(stat) / full_s if "resume_full" in rows else None
        ),
        "cpu_s_per_gib": per_gib["full"],
        "pull_cpu_s_per_gib": per_gib.get("pull_full"),
        "full_vs_convert": convert_s / full_s,
        "inc1_time_ratio": rows["inc1"].seconds(stat) / full_s,
        "inc10_time_ratio": rows["inc10"].seconds(stat) / full_s,
        "mover_rss_mib": rss / MiB,
        "worker_hwm_mib": hwm / MiB,
        "full_vs_convert_durable": (
            rows["convert_durable"].seconds(stat) / full_s if "convert_durable" in rows else None
        ),
        "full_gibs": gibs(size, full_s),
        "nbdcopy_gibs": gibs(size, ceiling_s),
        "convert_gibs": gibs(size, convert_s),
        "onehop_gibs": gibs(size, rows["onehop"].seconds(stat)),
        "full_s": full_s,
        "inc1_s": rows["inc1"].seconds(stat),
        "inc10_s": rows["inc10"].seconds(stat),
        "inc1_size_ratio": inc1.extra.get("size_ratio"),
        "inc10_size_ratio": inc10.extra.get("size_ratio"),
    }
    fmt = {"mover_rss_mib": "{:.1f}", "worker_hwm_mib": "{:.1f}"}
    last = " ".join(
        f"{k}={fmt.get(k, '{:.3f}').format(v)}" for k, v in summary.items() if v is not None
    )
    return lines, {"rows": table, "summary": summary}, last


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "missing"
    return out.splitlines()[0] if out else "?"


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-gib", type=float, default=4.0, help="disk size (default 4)")
    p.add_argument(
        "--data-fraction", type=float, default=0.6, help="share of random data (default 0.6)"
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="rounds; each row reports --stat of them (default 1)"
    )
    p.add_argument("--stat", choices=("median", "best"), default="median")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="parent of the run's temporary directory (default /var/tmp: disk, not tmpfs)",
    )
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--job-timeout", type=float, default=600.0)
    p.add_argument(
        "--quick", action="store_true", help="skip the extra cluster-size and Mover rows"
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (for debugging)")
    p.add_argument(
        "--no-pull",
        dest="pull",
        action="store_false",
        help="skip the pull full (the node restarted with SENDENSE_NODE_TRANSFER=pull)",
    )
    args = p.parse_args(argv)
    if not 0 < args.data_fraction <= 1:
        p.error("--data-fraction must be in (0, 1]")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("qemu-img", "qemu-nbd", "qemu-storage-daemon", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (make system-packages)")
    parent = args.workdir or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sendense-bench-", dir=parent)).resolve()
    if os.stat(work).st_dev != os.stat(ROOT).st_dev:
        say(f"note: {work} is not on the repository's file system")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    stamp = datetime.now(UTC)
    load0 = list(os.getloadavg())
    say(f"work dir {work}; load average {load0[0]:.2f} on {os.cpu_count()} cpus")
    bench: Bench | None = None
    try:
        bench = Bench(args, work)
        bench.setup()
        for n in range(args.repeat):
            bench.round(n)
        lines, results, last = report(bench, args.stat)
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if bench is not None:
            bench.cleanup()
        left = ours(work)
        if left:
            terminate([p for p, _ in left])
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    results.update(
        {
            "started_at": stamp.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "params": {
                "target_options": bench.target_options,
                "size_bytes": bench.size,
                "data_fraction": args.data_fraction,
                "repeat": args.repeat,
                "stat": args.stat,
                "seed": args.seed,
                "workdir": str(parent),
                "hub_cluster_size": HUB_CLUSTER,
                "nbdcopy": NBDCOPY,
                "cache": "warm (sync before each measurement)",
            },
            "host": {
                "cpus": os.cpu_count(),
                "loadavg_start": load0,
                "loadavg_end": list(os.getloadavg()),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "qemu_img": tool_version(["qemu-img", "--version"]),
                "nbdcopy": tool_version(["nbdcopy", "--version"]),
            },
            "jobs": bench.jobs,
            "last_line": last,
        }
    )
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    for line in lines:
        print(line)
    print(f"results: {out}")
    print(last, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
