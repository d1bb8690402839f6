"""Two-host topology benchmark: hub and node on two "hosts" of this machine.

Run by ``make bench-topology`` (``.venv/bin/python bench/topology_bench.py``,
as root). The hub and the node run in two network namespaces,
``sendense-bench-hub`` (10.77.0.1/24) and ``sendense-bench-node``
(10.77.0.2/24), joined by a veth pair, each pinned to its own core with
``taskset`` (hub: core 0 with its qemu-nbd targets; node: core 1 with its
workers and the qemu-storage-daemon "VM"). The hub refuses plain HTTP to a
node beyond loopback, so the node serves HTTPS with its own certificate and
is registered with its fingerprint pinned (plain HTTP, allowed by
``SENDENSE_ALLOW_PLAIN_HTTP_NODES``, where the node has no HTTPS).

Profiles, each measured in one run:

- ``lan``: the veth pair as it is;
- ``wan``: 10 ms round trip and 1 Gbit/s. With ``tc netem`` where the kernel
  has it (``delay 5ms rate 1gbit`` on both ends). Kernels without netem
  (this project's machine: ``CONFIG_NET_SCH_NETEM`` and ``fq`` are not set)
  get ``tbf rate 1gbit`` on both ends and a delay line on the NBD path: a
  relay in the hub's namespace that forwards each NBD connection to its
  target and holds every piece of data 5 ms in each direction (NBD's request
  and reply each wait 5 ms, as on the wire). The hub <-> node HTTP calls
  are not delayed then (a few per job).

Per profile and round (``--rounds``, default 3; each round starts from the
disk as built; the order of TLS on and off alternates between rounds):

- ``nbdcopy`` of the VM's disk (its guest NBD export) from the node's side
  across the link into a qemu-nbd QCOW2 target on the hub's side (the
  ceiling); with TLS-PSK too where this libnbd can;
- a Sendense full backup, then a 10 % incremental (the guest rewrites 10 % of
  the 64 KiB blocks first), in each NBD mode (``--modes``): ``tls`` (the hub
  as shipped: TLS-PSK on every target) and ``plain``
  (``SENDENSE_NBD_TLS=false``, which exists for this comparison only); on
  request ``tls-aes``: the hub's TLS servers also refusing ChaCha20-Poly1305
  through GnuTLS's system-wide override (``GNUTLS_SYSTEM_PRIORITY_FILE``),
  which measured the hub before its own priority left ChaCha20 out (GnuTLS
  3.7.9 runs ChaCha20 at ~200 MB/s on one core here, AES-GCM at ~3 GB/s).
  The nbdcopy ceiling runs in the same modes, its target being the
  product's TLS qemu-nbd. Where the hub has no NBD TLS setting, only
  ``plain`` runs.

Issue 11: per round also a pull full (``--no-pull`` skips it: the node
restarted with ``SENDENSE_NODE_TRANSFER=pull``, the hub's ``qemu-img
convert`` reads its frozen disk; without netem the WAN's delay line covers
only the hub's ports, so a WAN pull is rate-shaped but not delayed), and per
profile ``--resume-rounds`` pairs of fulls, one with its target's qemu-nbd
killed at ``--cut-at`` of the bytes (the hub serves it again, the node's
mover resumes) and one without: ``resume_overhead`` (wall with the cut /
without; the WAN's when measured, else the LAN's).

On ``wan`` one more full and incremental per node setting in
``--tune-settings`` (two by default; none skips them) (``SENDENSE_NODE_IN_FLIGHT`` /
``SENDENSE_NODE_REQUEST_SIZE``): what more requests in flight or larger
requests buy across latency. The product's defaults are not changed.

Last line ``key=value``: ``lan_full_ratio`` (Sendense full with TLS as
shipped against plain nbdcopy, speed), ``lan_tls_cost`` (1 - speed with TLS
/ speed without, full), ``wan_full_ratio``, ``wan_inc10_time_ratio`` (10 %
incremental time / full time, TLS on), then the same per mode
(``*_tls_aes*``, ``*_plain``), nbdcopy's own TLS costs, seconds, and the
WAN tuning runs (``wan_inc10_s_if64_rs1m``: in flight 64, 1 MiB requests).
Everything goes to ``bench/results/topology-<UTC stamp>.json``. The figures
are medians of the rounds; the machine's other load shows in them (the
start and end load averages are in the JSON).

The namespaces are removed at the end (also after Ctrl-C, and at the start
of the next run if a crashed run left them). Uses backup_bench.py's disk
builder, change writer, Sendense job timing and process helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import nbd  # noqa: E402

import backup_bench as bb  # noqa: E402
from fixtures.cluster import Cluster  # noqa: E402
from sendense.cli.services import ServiceFailed, stop_service, wait_healthy  # noqa: E402
from sendense.nbd import psk  # noqa: E402
from sendense.protocol.node import DiskStatus  # noqa: E402
from sendense.qemu.nbd_server import QemuNbdServer  # noqa: E402
from sendense.qemu.qsd import QsdVm  # noqa: E402
from sendense.settings import HubSettings, NodeSettings  # noqa: E402

GiB, MiB = bb.GiB, bb.MiB
HUB_NS, NODE_NS = "sendense-bench-hub", "sendense-bench-node"
HUB_VETH, NODE_VETH = "sdbench-hub", "sdbench-node"
HUB_IP, NODE_IP = "10.77.0.1", "10.77.0.2"
HUB_CPU, NODE_CPU = 0, 1
HUB_PORT, NODE_PORT = 8082, 8081  # fresh namespaces: nothing else listens there
NBD_FIRST, NBD_LAST = 10100, 10107  # the hub's targets
CEILING_PORT = 10110  # the nbdcopy target
WAN_DELAY_S = 0.005  # one way
WAN_RATE = "1gbit"
PSK_USER = psk.USERNAME
NBD_TLS = "nbd_tls" in HubSettings.model_fields
NODE_TLS = "tls" in NodeSettings.model_fields
# The node's mover resumes after a dropped connection (issue 11): it reports
# ``retry`` while reconnecting.
RESUMES = "retry" in DiskStatus.model_fields
# The node can serve pulls (issue 11, SENDENSE_NODE_TRANSFER=pull).
PULLS = "transfer" in NodeSettings.model_fields
INNER_ENV = "SENDENSE_TOPOLOGY_INNER"


def say(msg: str) -> None:
    bb.say(msg)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise bb.BenchError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def in_ns(ns: str, cpu: int, argv: list[str]) -> list[str]:
    """``argv`` in namespace ``ns`` pinned to ``cpu`` (both exec: same pid)."""
    return ["ip", "netns", "exec", ns, "taskset", "-c", str(cpu), *argv]


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` (later threads inherit it)."""
    sh("taskset", "-a", "-p", "-c", str(cpu), str(pid))


# --------------------------------------------------------------------------
# The topology: namespaces, veth, shaping
# --------------------------------------------------------------------------


def namespaces() -> set[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def remove_topology() -> None:
    """Stop whatever still runs in our namespaces and remove them (idempotent)."""
    present = namespaces()
    for ns in (HUB_NS, NODE_NS):
        if ns not in present:
            continue
        pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
        pids = [p for p in pids if p != os.getpid()]
        if pids:
            say(f"stopping {len(pids)} processes left in {ns}")
            bb.terminate(pids, timeout=10)
        sh("ip", "netns", "del", ns, check=False)
    # A veth end left in the root namespace by a run killed half-way.
    sh("ip", "link", "del", HUB_VETH, check=False)


def make_topology() -> None:
    remove_topology()
    sh("ip", "netns", "add", HUB_NS)
    sh("ip", "netns", "add", NODE_NS)
    sh("ip", "link", "add", HUB_VETH, "type", "veth", "peer", "name", NODE_VETH)
    for ns, dev, ip in ((HUB_NS, HUB_VETH, HUB_IP), (NODE_NS, NODE_VETH, NODE_IP)):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def has_netem() -> bool:
    """Whether this kernel has netem (tried on a veth end, then removed)."""
    ok = sh("ip", "netns", "exec", HUB_NS, "tc", "qdisc", "add", "dev", HUB_VETH, "root",
            "netem", "delay", "1ms", check=False).returncode == 0  # fmt: skip
    sh("ip", "netns", "exec", HUB_NS, "tc", "qdisc", "del", "dev", HUB_VETH, "root", check=False)
    return ok


def shape(profile: str, netem: bool) -> str:
    """Shape both veth ends for ``profile``; a description of what was done."""
    for ns, dev in ((HUB_NS, HUB_VETH), (NODE_NS, NODE_VETH)):
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
    if profile == "lan":
        return "veth, no shaping"
    for ns, dev in ((HUB_NS, HUB_VETH), (NODE_NS, NODE_VETH)):
        if netem:
            qdisc = ["netem", "delay", f"{WAN_DELAY_S * 1000:g}ms", "rate", WAN_RATE]
            qdisc += ["limit", "100000"]
        else:
            # burst above veth's 64 KiB GSO packets; latency: queue room
            qdisc = ["tbf", "rate", WAN_RATE, "burst", "512kb", "latency", "200ms"]
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *qdisc)
    if netem:
        return f"netem delay {WAN_DELAY_S * 1000:g}ms rate {WAN_RATE} on both ends"
    return (
        f"tbf rate {WAN_RATE} on both ends + NBD delay relay "
        f"{WAN_DELAY_S * 1000:g} ms each way (no netem in this kernel)"
    )


# --------------------------------------------------------------------------
# The delay relay (WAN without netem): ``topology_bench.py relay ...``
# --------------------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Forward bytes, each piece ``delay`` seconds after it arrived, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def feed() -> None:
        while True:
            data = await reader.read(1 << 18)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                return

    feeder = asyncio.create_task(feed())
    try:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    finally:
        feeder.cancel()


async def _relay(listen: str, target: str, ports: list[int], delay: float) -> None:
    async def serve(port: int) -> asyncio.Server:
        async def handle(r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
            try:
                r2, w2 = await asyncio.open_connection(target, port)
            except OSError:
                w1.close()
                return
            for w in (w1, w2):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await asyncio.gather(_pipe(r1, w2, delay), _pipe(r2, w1, delay))
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                for w in (w1, w2):
                    w.close()

        return await asyncio.start_server(handle, listen, port, reuse_address=True)

    servers = [await serve(p) for p in ports]
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def relay_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="topology_bench.py relay")
    p.add_argument("--listen", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--ports", required=True, help="first-last")
    p.add_argument("--delay", type=float, required=True, help="seconds, each way")
    a = p.parse_args(argv)
    first, last = (int(x) for x in a.ports.split("-"))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_relay(a.listen, a.target, list(range(first, last + 1)), a.delay))
    return 0


class Relay:
    """The delay relay as a child process (in the hub's namespace, unpinned:
    it stands for the network, which is neither host's CPU)."""

    def __init__(self, logs: Path) -> None:
        argv = [sys.executable, __file__, "relay", "--listen", HUB_IP, "--target", "127.0.0.1"]
        argv += ["--ports", f"{NBD_FIRST}-{CEILING_PORT}", "--delay", str(WAN_DELAY_S)]
        self.log = open(logs / "relay.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            self.stop()
            raise bb.BenchError("the delay relay did not start (see relay.log)")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------
# Hub and node in their namespaces
# --------------------------------------------------------------------------


class TopologyCluster(Cluster):
    """`Cluster` with the hub and node in their namespaces, pinned."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.hub_port, self.node_port = HUB_PORT, NODE_PORT
        self.nbd_first, self.nbd_last = NBD_FIRST, NBD_LAST
        self.hub_extra: dict[str, str] = {}
        self.node_extra: dict[str, str] = {}

    @property
    def hub_url(self) -> str:
        return f"http://{HUB_IP}:{self.hub_port}"

    @property
    def node_url(self) -> str:
        scheme = "https" if getattr(self, "node_tls", False) else "http"
        return f"{scheme}://{NODE_IP}:{self.node_port}"

    def _spawn(self, ns: str, cpu: int, args: list[str], log: str, env: dict[str, str]) -> Any:
        argv = in_ns(ns, cpu, [sys.executable, "-m", "sendense.cli.main", *args])
        with open(self.root / log, "ab") as f:
            return subprocess.Popen(
                argv,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._spawn_env(env),
                start_new_session=True,
            )

    def start_hub(self) -> None:
        self.hub_dir.mkdir(parents=True, exist_ok=True)
        env = {
            "SENDENSE_NBD_PORT_FIRST": str(self.nbd_first),
            "SENDENSE_NBD_PORT_LAST": str(self.nbd_last),
            "SENDENSE_NBD_ADVERTISE_HOST": HUB_IP,
            "SENDENSE_NODE_TIMEOUT": str(self.node_timeout),
            # One core for this "host": one API process.
            "SENDENSE_API_WORKERS": "1",
            # Only where the node has no HTTPS (before issue 10's HTTPS part).
            "SENDENSE_ALLOW_PLAIN_HTTP_NODES": "true",
            **self.hub_env,
            **self.hub_extra,
        }
        args = ["hub", "serve", "--host", HUB_IP, "--port", str(self.hub_port)]
        args += ["--data-dir", str(self.hub_dir), "--log-level", "info"]
        self.hub = self._spawn(HUB_NS, HUB_CPU, args, "hub.log", env)
        wait_healthy(f"{self.hub_url}/api/v1/health", self.hub, self.root / "hub.log")
        deadline = time.monotonic() + 30
        while not (self.hub_dir / "admin.token").exists():
            if self.hub.poll() is not None or time.monotonic() > deadline:
                raise ServiceFailed("the hub answered but wrote no token: " + self.log("hub"))
            time.sleep(0.05)
        self._client = None

    def start_node(self) -> None:
        self.node_dir.mkdir(parents=True, exist_ok=True)
        args = ["node", "serve", "--host", NODE_IP, "--port", str(self.node_port)]
        args += ["--data-dir", str(self.node_dir)]
        env = {**self.node_env, **self.node_extra}
        self.node = self._spawn(NODE_NS, NODE_CPU, args, "node.log", env)
        wait_healthy(f"{self.node_url}/api/v1/health", self.node, self.root / "node.log")

    def restart_hub(self, env: dict[str, str]) -> None:
        stop_service(self.hub)
        self.hub_extra = env
        self.start_hub()

    def _spawn_env(self, env: dict[str, str]) -> dict[str, str]:
        """The environment of a child: ours with ``env`` (a "" value removes)."""
        merged = {**os.environ, **env}
        return {k: v for k, v in merged.items() if v != ""}

    def restart_node(self, env: dict[str, str]) -> None:
        stop_service(self.node)
        self.node_extra = env
        self.start_node()


class NodeVm(QsdVm):
    """The qsd "VM" on the node's host: in its namespace (the node finds the
    VM's NBD server among the sockets of its own namespace), on its core."""

    def argv(self) -> list[str]:
        return in_ns(NODE_NS, NODE_CPU, super().argv())


# --------------------------------------------------------------------------
# The ceiling: nbdcopy node side -> qemu-nbd hub side
# --------------------------------------------------------------------------


def ceiling_target(image: Path, host: str, psk_dir: Path | None, log: Path) -> QemuNbdServer:
    """qemu-nbd as the hub starts its targets (TLS-PSK as the hub sets it up,
    when ``psk_dir`` holds a ``keys.psk``)."""
    kw: dict[str, Any] = {"tls_psk_dir": str(psk_dir)} if psk_dir is not None else {}
    return QemuNbdServer(
        str(image), export_name="bench", host=host, port=CEILING_PORT, log_path=str(log), **kw
    )


def libnbd_has_tls() -> bool:
    try:
        return bool(nbd.NBD().supports_tls())
    except nbd.Error:
        return False


# --------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------


class TopologyBench(bb.Bench):
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        super().__init__(args, work)
        self.cluster = TopologyCluster(work / "cluster")
        self.vm = NodeVm(work / "vm", bb.VM_NAME)
        self.netem = has_netem()
        self.relay: Relay | None = None
        self.profile = "lan"
        self.shaping: dict[str, str] = {}
        self.modes = [m for m in args.modes if NBD_TLS or m == "plain"] or ["plain"]
        self.no_chacha = work / "gnutls-no-chacha.conf"
        self.mode = ""
        self.psk_dir = work / "psk"
        self.tune_rows: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def setup(self) -> None:
        t0 = time.monotonic()
        say(f"building a {self.size / GiB:g} GiB disk, {self.args.data_fraction:.0%} random data")
        self.data = bb.build_disk(self.vm, self.work, self.size, self.args.data_fraction, self.rng)
        shutil.copyfile(self.disk, self.golden)
        self.start_vm()
        self.psk_dir.mkdir(mode=0o700)
        psk.write_key_file(self.psk_dir / psk.SERVER_FILE, PSK_USER, psk.new_key())
        # GnuTLS's system-wide override (gnutls.org manual, "System-wide
        # configuration of the library"): a TLS server that refuses
        # ChaCha20-Poly1305 and so agrees on AES-GCM (see "tls-aes").
        self.no_chacha.write_text("[overrides]\ntls-disabled-cipher = CHACHA20-POLY1305\n")
        say(f"disk built and VM started in {time.monotonic() - t0:.1f}s")
        (self.work / "cluster").mkdir()
        c = self.cluster
        c.start_node()
        c.hub_extra = self.hub_env()
        c.start_hub()
        reg = c.register(self.vm)
        disks = reg["vms"][0]["disks"]
        if len(disks) != 1 or disks[0]["capacity_bytes"] != self.size:
            raise bb.BenchError(f"discovery found {disks}")
        say(f"hub {c.hub_url} (core {HUB_CPU}) and node {c.node_url} (core {NODE_CPU}) up")

    def start_vm(self) -> None:
        self.vm.start()

    def hub_env(self) -> dict[str, str]:
        # Behind the relay the targets listen on loopback and the relay on
        # the veth address the node is told.
        env = {"SENDENSE_NBD_BIND": "127.0.0.1" if self.relay else HUB_IP}
        if NBD_TLS:
            env["SENDENSE_NBD_TLS"] = "true" if self.mode != "plain" else "false"
        # The hub's qemu-nbd targets inherit it; "" removes it (restart_hub).
        env["GNUTLS_SYSTEM_PRIORITY_FILE"] = str(self.no_chacha) if self.mode == "tls-aes" else ""
        return env

    def set_profile(self, profile: str) -> None:
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
        self.profile = profile
        self.shaping[profile] = shape(profile, self.netem)
        if profile == "wan" and not self.netem:
            self.relay = Relay(self.logs)
        say(f"profile {profile}: {self.shaping[profile]}")

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        self.cluster.restart_hub(self.hub_env())

    @property
    def bind(self) -> str:
        return "127.0.0.1" if self.relay else HUB_IP

    def ceiling(self, mode: str) -> None:
        tls = mode != "plain"
        target = self.work / "ceiling.qcow2"
        opts = f"cluster_size={bb.HUB_CLUSTER}"
        bb.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(target), str(self.size)])
        server = ceiling_target(
            target, self.bind, self.psk_dir if tls else None, self.logs / "ceiling.log"
        )
        url = f"nbd://{HUB_IP}:{CEILING_PORT}/bench"
        if tls:
            # The TLS user name goes in the URI's user part (libnbd 1.14).
            url = f"nbds://{PSK_USER}@{HUB_IP}:{CEILING_PORT}/bench"
            url += f"?tls-psk-file={self.psk_dir / 'keys.psk'}"
        saved = os.environ.pop("GNUTLS_SYSTEM_PRIORITY_FILE", None)
        if mode == "tls-aes":
            os.environ["GNUTLS_SYSTEM_PRIORITY_FILE"] = str(self.no_chacha)
        try:
            try:
                server.start()
            finally:
                os.environ.pop("GNUTLS_SYSTEM_PRIORITY_FILE", None)
                if saved is not None:
                    os.environ["GNUTLS_SYSTEM_PRIORITY_FILE"] = saved
            assert server.pid is not None
            pin(server.pid, HUB_CPU)
            os.sync()
            argv = in_ns(NODE_NS, NODE_CPU, [*bb.NBDCOPY, self.guest_uri, url])
            seconds, rss = bb.run_timed(argv, self.logs / "nbdcopy.log")
            server.stop()
        finally:
            server.stop()
            target.unlink(missing_ok=True)
        key = f"{self.profile}_nbdcopy" + ("" if mode == "plain" else f"_{mode}")
        title = f"{self.profile}: nbdcopy node -> hub qemu-nbd" + (
            "" if mode == "plain" else f" ({mode})"
        )
        self.add(key, title, bb.Sample(seconds, self.size, self.data, rss))

    def backups(self, tag: str = "") -> tuple[bb.Sample, bb.Sample]:
        p, m = self.profile, self.mode
        full = self.sendense("full", f"{p}_full_{m}{tag}", f"{p}: Sendense full, NBD {m}{tag}")
        self.changes(0.10)
        inc = self.sendense(
            "incremental", f"{p}_inc10_{m}{tag}", f"{p}: Sendense 10% incremental, NBD {m}{tag}"
        )
        inc.extra["time_ratio"] = inc.seconds / full.seconds
        return full, inc

    def reset_vm(self) -> None:
        """The disk as built (its bitmaps with it: the next backup is a full)."""
        self.vm.stop()
        shutil.copyfile(self.golden, self.disk)
        self.start_vm()
        self.data = bb.data_bytes(self.disk)

    def profile_round(self, n: int) -> None:
        say(f"{self.profile} round {n + 1}/{self.args.rounds}")
        self.reset_vm()
        self.ceiling("plain")
        if libnbd_has_tls() and not self.args.no_tls_ceiling:
            for mode in self.modes:
                if mode != "plain":
                    self.ceiling(mode)
        modes = self.modes if n % 2 == 0 else list(reversed(self.modes))
        for mode in modes:
            self.reset_vm()
            self.set_mode(mode)
            self.backups()

    def tune(self) -> None:
        """WAN: more requests in flight / larger requests (node settings)."""
        mode = "tls-aes" if "tls-aes" in self.modes else self.modes[0]
        for setting in self.args.tune_settings:
            in_flight, request_size = (int(x) for x in setting.split(":"))
            say(f"wan tuning: in_flight={in_flight} request_size={request_size}")
            self.cluster.restart_node(
                {
                    "SENDENSE_NODE_IN_FLIGHT": str(in_flight),
                    "SENDENSE_NODE_REQUEST_SIZE": str(request_size),
                }
            )
            self.reset_vm()
            if self.mode != mode:
                self.set_mode(mode)
            tag = f" in_flight={in_flight} request={request_size // MiB}MiB"
            full, inc = self.backups(tag)
            self.tune_rows.append(
                {
                    "in_flight": in_flight,
                    "request_size": request_size,
                    "full_s": full.seconds,
                    "inc10_s": inc.seconds,
                }
            )
        self.cluster.restart_node({})

    def resume(self) -> None:
        """A full with one connection cut mid-copy against one without (TLS as
        shipped), alternating which goes first: the target's qemu-nbd is
        killed at ``--cut-at`` of the bytes, the hub serves it again and the
        node's mover resumes from its last flushed position (issue 11)."""
        mode = "tls" if "tls" in self.modes else self.modes[0]
        if self.mode != mode:
            self.set_mode(mode)
        p = self.profile
        for n in range(self.args.resume_rounds):
            order = [False, True] if n % 2 == 0 else [True, False]
            for cut in order:
                self.round_deadline_check()
                self.reset_vm()
                if cut:
                    self.sendense(
                        "full",
                        f"{p}_full_cut",
                        f"{p}: Sendense full, one cut at {self.args.cut_at:.0%}",
                        cut_at=self.args.cut_at,
                    )
                else:
                    self.sendense("full", f"{p}_full_uncut", f"{p}: Sendense full, no cut")

    def pull_round(self) -> None:
        """A full read by the hub (pull, issue 11): the node restarted with
        SENDENSE_NODE_TRANSFER=pull serves the frozen disk on its own address
        and the hub's ``qemu-img convert`` reads it; then back to push. On a
        kernel without netem the WAN's delay line only covers the hub's
        ports, so a WAN pull has the rate limit but not the 10 ms RTT."""
        mode = "tls" if "tls" in self.modes else self.modes[0]
        if self.mode != mode:
            self.set_mode(mode)
        self.reset_vm()
        self.cluster.restart_node(
            {
                **self.cluster.node_extra,
                "SENDENSE_NODE_TRANSFER": "pull",
                # Its pull exports on the node's own address (not loopback).
                "SENDENSE_NODE_PULL_BIND": NODE_IP,
            }
        )
        try:
            p = self.profile
            note = "" if p == "lan" or self.netem else " (no delay line)"
            self.sendense("full", f"{p}_pull_full", f"{p}: Sendense full, pull{note}", "pull")
        finally:
            extra = dict(self.cluster.node_extra)
            extra.pop("SENDENSE_NODE_TRANSFER", None)
            extra.pop("SENDENSE_NODE_PULL_BIND", None)
            self.cluster.restart_node(extra)

    def run_all(self) -> None:
        for profile in self.args.profiles:
            self.set_profile(profile)
            for n in range(self.args.rounds):
                self.round_deadline_check()
                self.profile_round(n)
                if self.args.pull and PULLS:
                    self.pull_round()
            if self.args.resume_rounds and RESUMES:
                self.resume()
            if profile == "wan" and self.args.tune_settings:
                self.tune()
        self.set_profile("lan")

    def round_deadline_check(self) -> None:
        if self.args.budget and time.monotonic() - self.t0 > self.args.budget:
            raise bb.BenchError(f"over the time budget ({self.args.budget:g}s)")

    def cleanup(self) -> None:
        if self.relay is not None:
            with contextlib.suppress(Exception):
                self.relay.stop()
        super().cleanup()


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def med(bench: TopologyBench, key: str) -> float | None:
    row = bench.rows.get(key)
    return row.seconds("median") if row and row.samples else None


def report(bench: TopologyBench) -> tuple[list[str], dict[str, Any], str]:
    size = bench.size
    lines = [f"{'measurement':<62} {'wall s':>8} {'GiB/s':>7} {'n':>3}  samples"]
    rows: list[dict[str, Any]] = []
    for row in bench.rows.values():
        secs = row.seconds("median")
        samples = [round(s.seconds, 3) for s in row.samples]
        lines.append(
            f"{row.title:<62} {secs:>8.3f} {bb.gibs(size, secs):>7.2f} {len(samples):>3}  {samples}"
        )
        rows.append(
            {
                "key": row.key,
                "title": row.title,
                "seconds": secs,
                "logical_gibs": bb.gibs(size, secs),
                "samples": [
                    {
                        "seconds": s.seconds,
                        "data_bytes": s.data,
                        **{k: v for k, v in s.extra.items() if k != "phases"},
                        "phases": s.extra.get("phases"),
                    }
                    for s in row.samples
                ],
            }
        )
    on = "tls" if "tls" in bench.modes else bench.modes[0]
    summary: dict[str, Any] = {}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def cost(fast: float | None, slow: float | None) -> float | None:
        """1 - speed with / speed without (from times)."""
        return 1 - fast / slow if fast and slow else None

    for p in ("lan", "wan"):
        full = med(bench, f"{p}_full_{on}")
        plain = med(bench, f"{p}_full_plain")
        aes = med(bench, f"{p}_full_tls-aes")
        ceiling = med(bench, f"{p}_nbdcopy")
        summary[f"{p}_full_ratio"] = ratio(ceiling, full)
        summary[f"{p}_tls_cost"] = cost(plain, full) if on != "plain" else None
        summary[f"{p}_inc10_time_ratio"] = ratio(med(bench, f"{p}_inc10_{on}"), full)
        summary[f"{p}_full_ratio_tls_aes"] = ratio(ceiling, aes)
        summary[f"{p}_tls_aes_cost"] = cost(plain, aes)
        summary[f"{p}_full_ratio_plain"] = ratio(ceiling, plain)
        summary[f"{p}_inc10_time_ratio_tls_aes"] = ratio(med(bench, f"{p}_inc10_tls-aes"), aes)
        summary[f"{p}_nbdcopy_tls_cost"] = cost(ceiling, med(bench, f"{p}_nbdcopy_tls"))
        summary[f"{p}_nbdcopy_tls_aes_cost"] = cost(ceiling, med(bench, f"{p}_nbdcopy_tls-aes"))
        summary[f"{p}_full_gibs"] = bb.gibs(size, full) if full else None
        summary[f"{p}_nbdcopy_gibs"] = bb.gibs(size, ceiling) if ceiling else None
        summary[f"{p}_full_s"] = full
        summary[f"{p}_full_plain_s"] = plain
        summary[f"{p}_full_tls_aes_s"] = aes
        summary[f"{p}_nbdcopy_s"] = ceiling
        summary[f"{p}_inc10_s"] = med(bench, f"{p}_inc10_{on}")
    # CPU seconds of a full on each host (medians): less sensitive to the
    # machine's other load than wall time. hub: the hub process and its
    # qemu-nbd / qemu-img children; node: worker, node process and the VM.
    for p in ("lan", "wan"):
        busiest = {}
        for m in bench.modes:
            full_row = bench.rows.get(f"{p}_full_{m}")
            if not full_row or not full_row.samples:
                continue
            cpus = [x.extra["cpu"] for x in full_row.samples]
            hub = statistics.median(c["hub"] + c["qemu_nbd_target"] + c["qemu_img"] for c in cpus)
            node = statistics.median(c["worker"] + c["node"] + c["vm_qsd_source"] for c in cpus)
            tag = m.replace("-", "_")
            summary[f"{p}_full_hub_cpu_s_{tag}"] = hub
            summary[f"{p}_full_node_cpu_s_{tag}"] = node
            busiest[m] = max(hub, node)
        if "plain" in busiest and on in busiest and on != "plain":
            # If the busier core bounds the copy: the throughput TLS costs.
            summary[f"{p}_tls_cpu_cost"] = 1 - busiest["plain"] / busiest[on]
    for p in ("lan", "wan"):
        # Pull fulls (issue 11): against the same round's push ceiling.
        summary[f"{p}_pull_full_ratio"] = ratio(
            med(bench, f"{p}_nbdcopy"), med(bench, f"{p}_pull_full")
        )
        summary[f"{p}_pull_full_s"] = med(bench, f"{p}_pull_full")
    for p in ("lan", "wan"):
        # Wall with one cut / wall without (issue 11: resume, not start over).
        summary[f"{p}_resume_overhead"] = ratio(
            med(bench, f"{p}_full_cut"), med(bench, f"{p}_full_uncut")
        )
    for t in bench.tune_rows:
        tag = f"if{t['in_flight']}_rs{t['request_size'] // MiB}m"
        summary[f"wan_full_s_{tag}"] = t["full_s"]
        summary[f"wan_inc10_s_{tag}"] = t["inc10_s"]
    order = [
        "lan_full_ratio",
        "lan_tls_cost",
        "wan_full_ratio",
        "wan_inc10_time_ratio",
        "lan_resume_overhead",
        "wan_resume_overhead",
    ]
    # The name for it: the WAN's where measured, else the LAN's.
    summary["resume_overhead"] = summary.get("wan_resume_overhead") or summary.get(
        "lan_resume_overhead"
    )
    order.insert(0, "resume_overhead")
    keys = order + [k for k in summary if k not in order]
    last = " ".join(
        f"{k}={summary[k]:.3f}" if summary.get(k) is not None else f"{k}=n/a"
        for k in keys
        if k in order or summary.get(k) is not None
    )
    last += f" nbd_tls={'yes' if NBD_TLS else 'absent'}"
    last += f" wan_delay={'netem' if bench.netem else 'relay'}"
    return lines, {"rows": rows, "summary": summary, "tuning": bench.tune_rows}, last


# --------------------------------------------------------------------------
# Main: the outer process makes the namespaces and re-runs itself inside the
# hub's (its HTTP calls then reach both hosts); the namespaces go at the end.
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-gib", type=float, default=1.0, help="disk size (default 1)")
    p.add_argument("--data-fraction", type=float, default=0.6)
    p.add_argument("--rounds", type=int, default=3, help="rounds per profile (default 3)")
    p.add_argument(
        "--profiles", nargs="+", choices=("lan", "wan"), default=["lan", "wan"], help="lan wan"
    )
    p.add_argument(
        "--tune-settings",
        nargs="*",
        default=["32:4194304", "64:1048576"],
        help="WAN extra runs, in_flight:request_size each (none: skip)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=("tls", "tls-aes", "plain"),
        default=["tls", "plain"],
        help="NBD modes: tls (the hub as shipped), plain (SENDENSE_NBD_TLS=false), "
        "tls-aes (ChaCha20 refused by GnuTLS's system override too: the same as tls "
        "since the hub's own priority leaves it out)",
    )
    p.add_argument("--no-tls-ceiling", action="store_true", help="skip nbdcopy over TLS-PSK")
    p.add_argument(
        "--resume-rounds",
        type=int,
        default=1,
        help="per profile: fulls with one connection cut and without (default 1 pair; 0 skips)",
    )
    p.add_argument(
        "--cut-at", type=float, default=0.4, help="share of the bytes moved at the cut (0.4)"
    )
    p.add_argument(
        "--no-pull",
        dest="pull",
        action="store_false",
        help="skip the pull full of each round (node with SENDENSE_NODE_TRANSFER=pull)",
    )
    p.add_argument("--budget", type=float, default=0, help="stop starting rounds after N s")
    p.add_argument("--workdir", type=Path, default=None, help="default /var/tmp")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--job-timeout", type=float, default=600.0)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    # What backup_bench.Bench reads.
    args.repeat, args.quick, args.stat = args.rounds, True, "median"
    return args


def outer(argv: list[str]) -> int:
    if os.geteuid() != 0:
        raise SystemExit("topology_bench needs root (ip netns, tc)")
    for tool in ("ip", "tc", "taskset", "qemu-img", "qemu-nbd", "qemu-storage-daemon", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (make system-packages)")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 cores (hub on core 0, node on core 1)")
    atexit.register(remove_topology)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        make_topology()
        inner = ["ip", "netns", "exec", HUB_NS, sys.executable, __file__, *argv]
        proc = subprocess.Popen(inner, env={**os.environ, INNER_ENV: "1"})
        try:
            return proc.wait()
        except KeyboardInterrupt:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()
    finally:
        remove_topology()


def inner(argv: list[str]) -> int:
    args = parse_args(argv)
    parent = args.workdir or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sendense-topology-", dir=parent)).resolve()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    stamp = datetime.now(UTC)
    load0 = list(os.getloadavg())
    say(f"work dir {work}; load average {load0[0]:.2f} on {os.cpu_count()} cpus")
    say(f"NBD TLS setting in the hub: {'yes' if NBD_TLS else 'no (one plain mode)'}")
    bench: TopologyBench | None = None
    try:
        bench = TopologyBench(args, work)
        bench.setup()
        bench.run_all()
        lines, results, last = report(bench)
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        # A second signal (a process group's kill, then the outer process
        # passing it on) must not cut the cleanup short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if bench is not None:
            bench.cleanup()
        left = bb.ours(work)
        if left:
            bb.terminate([p for p, _ in left])
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
                "size_bytes": bench.size,
                "data_fraction": args.data_fraction,
                "rounds": args.rounds,
                "profiles": args.profiles,
                "shaping": bench.shaping,
                "nbd_tls_setting": NBD_TLS,
                "node_https": NODE_TLS,
                "nbdcopy": bb.NBDCOPY,
                "hub_cpu": HUB_CPU,
                "node_cpu": NODE_CPU,
                "tune_settings": args.tune_settings,
            },
            "host": {
                "cpus": os.cpu_count(),
                "loadavg_start": load0,
                "loadavg_end": list(os.getloadavg()),
                "kernel": platform.release(),
                "qemu_img": bb.tool_version(["qemu-img", "--version"]),
                "nbdcopy": bb.tool_version(["nbdcopy", "--version"]),
            },
            "jobs": bench.jobs,
            "last_line": last,
        }
    )
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"topology-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    for line in lines:
        print(line)
    for p, how in bench.shaping.items():
        print(f"{p}: {how}")
    print(f"results: {out}")
    print(last, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["relay"]:
        return relay_main(argv[1:])
    if os.environ.get(INNER_ENV) == "1":
        return inner(argv)
    parse_args(argv)  # --help and errors before any namespace is made
    return outer(argv)


if __name__ == "__main__":
    sys.exit(main())
