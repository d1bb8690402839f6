"""Load benchmark: two hubs on one PostgreSQL catalog, API traffic at a fixed
rate mixed with backups running through four nodes.

Run by ``make bench-load`` (``.venv/bin/python bench/load_bench.py``). One run:

1. starts a throw-away PostgreSQL server (tests/pgserver.py, as the test suite
   does; or ``--database-url``: a superuser URL of a server where a database
   is created and dropped again) with ``max_connections`` raised to
   ``--pg-max-connections`` (300: see docs/operations.md);
2. fills the catalog with bench/api_bench.py's bulk fill: ``--vms`` VMs
   (5,000) of 2 disks and ``--runs`` (10) backup runs, i.e. 50,000 jobs and
   100,000 restore points;
3. starts 4 node processes (``--nodes``; HTTPS with their own certificates,
   pinned by fingerprint, as tests/fixtures/cluster.py does), 2 hub processes
   (``--hubs``; each with its default API worker processes) on the one
   catalog and one repository, sharing the secret key and the admin token,
   and ``--backup-vms`` (20) qemu-storage-daemon VMs of one ``--vm-mib``
   (16) MiB disk, spread over the nodes (one qemu source per node);
4. for ``--seconds`` (300) at once:

   - API traffic from another process, open loop: a request every
     1/``--rate`` s (200/s) whatever the answers do, alternately to each hub,
     over a pool of keep-alive connections (a new one when none is idle).
     Latency counts from the request's scheduled time to the last byte of
     its answer, so a hub that falls behind shows it (no coordinated
     omission). The mix (weights in ``MIX``): job status, restore point
     details, VM details, lists of restore points (first page, filtered, of
     one VM), job lists (latest, running), chains, pages of 100 VMs and the
     list of all VMs;
   - ``--backup-vms`` backup loops, one per VM: write 1 MiB of random data
     into the VM, start a backup (``auto``: a full first, then incrementals)
     on one hub, wait for it with long-polls on the other hub, again. Nodes
     run at most SENDENSE_NODE_JOB_LIMIT jobs at a time (4 by default: 16 of
     the 20 run, the others wait queued);

5. stops starting backups at the end, waits for those running (at most
   ``--drain`` s, then cancels them), stops everything, and checks that no
   qemu-nbd, qsd, worker or other process of the run is left.

It prints a table per endpoint, writes ``bench/results/load-<UTC stamp>.json``
and as its last line::

  load_p99_ms= load_p50_ms= jobs_per_min= server_errors= rps= jobs_completed=
  jobs_failed= client_errors= leaked=

``server_errors`` counts the answers that are not the client's fault, from
the API traffic and the backup loops: 5xx, connections refused or reset, and
no answer within ``--timeout`` (30 s). ``client_errors`` counts 4xx.
``jobs_per_min``: backups completed during the ``--seconds`` window, per
minute. ``jobs_failed``: backups that ended failed or cancelled (their codes
are in the table and the JSON).

Everything runs on this machine: the hubs, nodes, VMs, PostgreSQL and the
clients share its cores (the output says how many, and the load average).

``--quick``: 60 s on a catalog of 500 VMs (10,000 restore points), same rate
and backup loops; about 2 minutes. The full run takes about 9 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))  # the Cluster fixture and the PostgreSQL server

import pgserver  # noqa: E402
from api_bench import HttpConnection, Size, fill_catalog, git_state, percentile  # noqa: E402
from fixtures.cluster import Cluster, port_range  # noqa: E402
from fixtures.processes import kill_all, processes_under  # noqa: E402
from pgserver import PgCluster, PgServer  # noqa: E402
from sendense.catalog.db import Database  # noqa: E402
from sendense.qemu.qsd import QsdVm  # noqa: E402
from sendense.secretbox import SecretBox  # noqa: E402

MiB = 1 << 20
END = ("completed", "failed", "cancelled")
NBD_PORTS_PER_HUB = 64
IDLE_REUSE = 2.0  # s: an idle keep-alive connection older than this is closed (uvicorn: 5 s)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------- API traffic

# name -> (weight, path from (rng, ids)). Weights are percent of the requests.
MIX: dict[str, tuple[int, Any]] = {
    "job_status": (25, lambda r, ids: f"/api/v1/jobs/{r.choice(ids['jobs'])}"),
    "backup_detail": (20, lambda r, ids: f"/api/v1/backups/{r.choice(ids['backups'])}"),
    "vm_detail": (8, lambda r, ids: f"/api/v1/vms/{r.choice(ids['vms'])}"),
    "backups_of_vm": (
        10,
        lambda r, ids: f"/api/v1/backups?vm_name={r.choice(ids['vms'])}&limit=100",
    ),
    "backups_list": (5, lambda r, ids: "/api/v1/backups?limit=100"),
    "backups_filtered": (
        3,
        lambda r, ids: "/api/v1/backups?status=completed&backup_type=incremental&limit=100",
    ),
    "jobs_list": (5, lambda r, ids: "/api/v1/jobs?limit=50"),
    "jobs_running": (6, lambda r, ids: "/api/v1/jobs?status=running&limit=50"),
    "chain": (15, lambda r, ids: f"/api/v1/backups/{r.choice(ids['vms'])}/chain"),
    # Every VM (8 MB for 5,000): what a large site's clients should not ask
    # often (docs/operations.md); they page (limit/offset, by name).
    "vms": (1, lambda r, ids: "/api/v1/vms"),
    "vms_page": (
        2,
        lambda r, ids: f"/api/v1/vms?limit=100&offset={r.randrange(0, len(ids['vms']), 100)}",
    ),
}


@dataclass
class Traffic:
    hubs: list[tuple[str, int]]
    token: str
    ids_path: str
    rate: float
    seconds: float
    timeout: float
    start_at: float  # time.time() of the first request
    seed: int
    weights: dict[str, int]


class Conn(HttpConnection):
    last_used = 0.0


async def _traffic(t: Traffic) -> dict[str, Any]:
    ids = json.loads(Path(t.ids_path).read_text())
    rng = random.Random(t.seed)
    names = [n for n in MIX if t.weights.get(n)]
    weights = [t.weights[n] for n in names]
    idle: list[list[Conn]] = [[] for _ in t.hubs]
    opened = [0] * len(t.hubs)
    records: list[tuple[str, int, float, str]] = []  # endpoint, hub, ms, outcome

    async def one(name: str, hub: int, path: str, scheduled: float) -> None:
        pool = idle[hub]
        now = time.monotonic()
        # Most recently used last: close the ones the hub may be closing.
        while pool and now - pool[0].last_used > IDLE_REUSE:
            pool.pop(0).close()
        if pool:
            conn = pool.pop()
        else:
            conn = Conn(*t.hubs[hub], t.token)
            opened[hub] += 1
        outcome = "ok"
        try:
            status, _ = await asyncio.wait_for(conn.get(path), t.timeout)
            outcome = "ok" if 200 <= status < 300 else str(status)
        except TimeoutError:
            outcome = "timeout"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            outcome = type(e).__name__
        ms = (time.monotonic() - scheduled) * 1000
        records.append((name, hub, ms, outcome))
        if outcome == "ok" or outcome[0] == "4":
            conn.last_used = time.monotonic()
            pool.append(conn)
        else:
            conn.close()

    delay = t.start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    t0 = time.monotonic()
    tasks: set[asyncio.Task[None]] = set()
    i = 0
    lag_max = 0.0
    while True:
        scheduled = t0 + i / t.rate
        if scheduled >= t0 + t.seconds:
            break
        wait = scheduled - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        else:
            lag_max = max(lag_max, -wait)
        name = rng.choices(names, weights)[0]
        task = asyncio.create_task(one(name, i % len(t.hubs), MIX[name][1](rng, ids), scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.wait(tasks, timeout=t.timeout + 5)
    for pool in idle:
        for conn in pool:
            conn.close()
    return {
        "records": records,
        "sent": i,
        "unfinished": i - len(records),
        "elapsed": time.monotonic() - t0,
        "connections_opened": opened,
        "send_lag_max_ms": round(lag_max * 1000, 1),
    }


def traffic_process(t: Traffic, results: mp.Queue[dict[str, Any]]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    results.put(asyncio.run(_traffic(t)))


# --------------------------------------------------------------------- backups


@dataclass
class BackupStats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    server_errors: Counter[str] = field(default_factory=Counter)
    client_errors: Counter[str] = field(default_factory=Counter)
    running: dict[str, int] = field(default_factory=dict)  # job id -> hub index
    start_ms: list[float] = field(default_factory=list)  # POST /backups answer times
    client_samples: list[str] = field(default_factory=list)  # the first 4xx answers
    server_samples: list[str] = field(default_factory=list)  # the first 5xx answers
    loop_errors: list[str] = field(default_factory=list)  # the bench's own failures

    def server(self, what: str) -> None:
        with self.lock:
            self.server_errors[what] += 1

    def client(self, what: str) -> None:
        with self.lock:
            self.client_errors[what] += 1


def _call(
    stats: BackupStats, c: httpx.Client, method: str, path: str, **kw: Any
) -> dict[str, Any] | None:
    """One API call of a backup loop; errors counted by whose fault they are."""
    try:
        r = c.request(method, path, **kw)
    except httpx.TimeoutException:
        stats.server(f"{method} timeout")
        return None
    except httpx.TransportError as e:
        stats.server(f"{method} {type(e).__name__}")
        return None
    if r.status_code >= 500:
        stats.server(f"{method} {r.status_code}")
        with stats.lock:
            if len(stats.server_samples) < 10:
                stats.server_samples.append(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return None
    if r.status_code >= 400:
        try:  # the one error shape: {"error": code, "message", "details"}
            code = str(r.json().get("error", ""))
        except (ValueError, AttributeError):
            code = ""
        stats.client(f"{method} {r.status_code} {code}".strip())
        with stats.lock:
            if len(stats.client_samples) < 10:
                stats.client_samples.append(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return None
    body: dict[str, Any] = r.json()
    return body


def backup_loop(*args: Any) -> None:
    """`_backup_loop`; a bench bug in it is reported, not a silently dead loop."""
    stats: BackupStats = args[3]
    try:
        _backup_loop(*args)
    except Exception as e:
        with stats.lock:
            stats.loop_errors.append(f"{args[0].name}: {type(e).__name__}: {e}")
        raise


def _backup_loop(
    vm: QsdVm,
    index: int,
    clients: list[httpx.Client],
    stats: BackupStats,
    deadline: float,
    stop: threading.Event,
    rng: random.Random,
    disk_bytes: int,
) -> None:
    """Write, back up on one hub, wait on the other; until ``deadline``."""
    k = index
    while time.monotonic() < deadline and not stop.is_set():
        h = vm.guest(0)
        try:
            offset = rng.randrange(0, disk_bytes - MiB, 65536)
            h.pwrite(rng.randbytes(MiB), offset)
            h.flush()
        finally:
            h.shutdown()
        start, watch = clients[k % len(clients)], clients[(k + 1) % len(clients)]
        k += 1
        t0 = time.monotonic()
        started = _call(
            stats,
            start,
            "POST",
            "/api/v1/backups",
            json={"vm_name": vm.name, "repository_id": "default", "backup_type": "auto"},
        )
        if started is None:
            stop.wait(1.0)
            continue
        job_id = started["job_id"]
        with stats.lock:
            stats.start_ms.append((time.monotonic() - t0) * 1000)
            stats.running[job_id] = (k - 1) % len(clients)
        job: dict[str, Any] | None = None
        while not stop.is_set():
            job = _call(stats, watch, "GET", f"/api/v1/jobs/{job_id}", params={"wait": 10})
            if job is None:
                stop.wait(1.0)
                continue
            if job["status"] in END:
                break
        with stats.lock:
            stats.running.pop(job_id, None)
            if job is not None and job["status"] in END:
                stats.jobs.append(
                    {
                        "job_id": job_id,
                        "vm": vm.name,
                        "status": job["status"],
                        "error_code": job.get("error_code"),
                        "error": (job.get("error_message") or "")[:300],
                        "type": job.get("backup_type") or job.get("requested_type"),
                        "started": t0,
                        "ended": time.monotonic(),
                    }
                )


# --------------------------------------------------------------------- run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vms", type=int, help="VMs in the catalog [5000; --quick 500]")
    p.add_argument("--runs", type=int, default=10, help="backup runs per catalog VM [10]")
    p.add_argument("--hubs", type=int, default=2, help="hub processes [2]")
    p.add_argument("--nodes", type=int, default=4, help="node processes [4]")
    p.add_argument("--backup-vms", type=int, default=20, help="concurrent backup loops [20]")
    p.add_argument("--vm-mib", type=int, default=16, help="disk size of each backup VM [16]")
    p.add_argument("--rate", type=float, default=200.0, help="API requests per second [200]")
    p.add_argument("--seconds", type=float, help="the measured window [300; --quick 60]")
    p.add_argument("--baseline", type=float, help="API alone first, s (0: none) [30; --quick 15]")
    p.add_argument(
        "--weights",
        default="",
        help="change the mix, e.g. vms=0,chain=5 (percent weights; names: " + ", ".join(MIX) + ")",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="client timeout, s [30]")
    p.add_argument(
        "--node-nice",
        type=int,
        default=0,
        help="CPU nice of the node processes (their workers inherit it) and the VMs: "
        "they stand for other hosts, which a deployment's hubs do not share cores with [0]",
    )
    p.add_argument("--drain", type=float, default=120.0, help="wait for running backups, s [120]")
    p.add_argument(
        "--hub-env",
        action="append",
        default=[],
        metavar="SENDENSE_X=V",
        help="a hub setting for both hubs (repeatable), e.g. SENDENSE_API_THREADS=8",
    )
    p.add_argument("--database-url", help="superuser URL of a PostgreSQL server to use")
    p.add_argument("--pg-max-connections", type=int, default=300)
    p.add_argument("--quick", action="store_true", help="60 s, 500 catalog VMs")
    p.add_argument("--workdir", type=Path, help="parent of the work directory [/var/tmp]")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--keep", action="store_true", help="keep the work directory (debugging)")
    args = p.parse_args(argv)
    args.vms = args.vms or (500 if args.quick else 5000)
    args.seconds = args.seconds or (60.0 if args.quick else 300.0)
    pairs = [item.partition("=") for item in args.hub_env]
    if any(not k.startswith("SENDENSE_") or not sep for k, sep, _ in pairs):
        p.error("--hub-env takes SENDENSE_NAME=value")
    args.hub_env = [(k, v) for k, _, v in pairs]
    weights = {name: w for name, (w, _) in MIX.items()}
    for item in filter(None, (x.strip() for x in args.weights.split(","))):
        name, _, value = item.partition("=")
        if name not in MIX or not value.isdigit():
            p.error(f"--weights: {item!r} is not name=integer with a name of the mix")
        weights[name] = int(value)
    if not any(weights.values()):
        p.error("--weights: every weight is 0")
    args.weights = weights
    if args.baseline is None:
        args.baseline = 15.0 if args.quick else 30.0
    if min(args.vms, args.runs, args.hubs, args.nodes, args.backup_vms) < 1:
        p.error("--vms, --runs, --hubs, --nodes, --backup-vms must be >= 1")
    if args.vm_mib < 4 or args.rate <= 0 or args.seconds <= 0:
        p.error("--vm-mib must be >= 4, --rate and --seconds > 0")
    return args


def start_postgres(args: argparse.Namespace) -> tuple[PgCluster, PgServer | None]:
    if args.database_url:
        return PgCluster(args.database_url), None
    # Two hubs x their API workers x a pool of 20 + 40 (catalog/db.py) can
    # want more than the default 100 (docs/operations.md).
    pgserver.SERVER_OPTIONS += f" -c max_connections={int(args.pg_max_connections)}"
    server = PgServer()
    server.start()
    return server, server


def hub_processes(pids: list[int]) -> list[int]:
    """The hubs and their API worker processes."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if int(stat.parent.name) in pids or ppid in pids:
            out.append(int(stat.parent.name))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def sample_connections(url: str, db_name: str, stop: threading.Event, out: list[int]) -> None:
    """Connections to the catalog database every 2 s (pg_stat_activity), on one connection."""
    db = Database(url)
    try:
        with db.engine.connect() as c:
            c = c.execution_options(isolation_level="AUTOCOMMIT")
            while not stop.wait(2.0):
                n = c.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (db_name,)
                ).scalar_one()
                out.append(int(n) - 1)  # not this one
    except Exception as e:  # a figure less, never a failed run
        say(f"connection sampler stopped: {e}")
    finally:
        db.dispose()


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat, idle and iowait left out)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def cpu_by_process(work: Path, db_name: str, clients: set[int]) -> dict[int, tuple[str, float]]:
    """This run's processes: pid -> (kind, CPU seconds with reaped children),
    from Linux /proc. Short-lived children (node workers, qemu-img) count in
    the process that reaped them."""
    needle, db = str(work).encode(), db_name.encode()
    out: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        if pid in clients:
            kind = "bench clients"
        elif db in cmd and cmd.startswith(b"postgres:"):
            kind = "postgresql"
        elif needle not in cmd:
            continue
        elif b"qemu-storage-daemon" in cmd:
            kind = "VMs (qsd)"
        elif b"qemu-nbd" in cmd:
            kind = "targets (qemu-nbd)"
        elif b"node" in cmd:
            kind = "nodes + workers"
        elif b"hub" in cmd:
            kind = "hubs"
        else:
            kind = "other of the run"
        ticks = sum(int(x) for x in fields[11:15])
        out[pid] = (kind, ticks / os.sysconf("SC_CLK_TCK"))
    return out


def cpu_split(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    split: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        split[kind] = split.get(kind, 0.0) + cpu - before.get(pid, (kind, 0.0))[1]
    return split


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parent = args.workdir or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sendense-load-bench-", dir=parent)).resolve()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    stamp = datetime.now(UTC)
    load0 = list(os.getloadavg())
    cpus = os.cpu_count() or 1
    say(f"work dir {work}; load average {load0[0]:.2f} on {cpus} cpus")
    size = Size(args.vms, 2, args.runs)
    pg: PgCluster | None = None
    pg_own: PgServer | None = None
    db_name = f"load_{uuid.uuid4().hex[:10]}"
    db_created = False
    slots: list[Cluster] = []
    vms: list[QsdVm] = []
    clients: list[httpx.Client] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []
    stats = BackupStats()
    traffic: dict[str, Any] = {}
    baseline: dict[str, Any] = {}
    info: dict[str, Any] = {}
    leaked: list[tuple[int, str]] = []
    window = (0.0, 0.0)
    cpu: dict[str, Any] = {}
    pg_conns: list[int] = []
    try:
        # ------------------------------------------------------------ catalog
        say("starting PostgreSQL" if not args.database_url else "PostgreSQL: given server")
        pg, pg_own = start_postgres(args)
        url = pg.create_database(db_name)
        db_created = True
        slots = [
            Cluster(work / f"slot{i}", url, hub_env=dict(args.hub_env))
            for i in range(max(args.hubs, args.nodes))
        ]
        for s in slots:
            s.root.mkdir(parents=True)
            s.nbd_first, s.nbd_last = port_range(NBD_PORTS_PER_HUB)
        hub0 = slots[0].hub_dir
        hub0.mkdir(parents=True)
        db = Database(url)
        db.upgrade()
        say(
            f"filling PostgreSQL: {size.vms} VMs, {size.jobs} jobs, {size.backups} backups "
            f"(max_connections {args.pg_max_connections if pg_own else 'as configured'})"
        )
        t0 = time.perf_counter()
        repo = hub0 / "repositories" / "default"
        repo.mkdir(parents=True, mode=0o700)
        catalog = fill_catalog(db, repo, SecretBox(hub0 / "secret.key"), size, args.seed)
        db.dispose()
        info["catalog"] = {**catalog.counts, "fill_seconds": round(time.perf_counter() - t0, 1)}
        say(f"filled in {info['catalog']['fill_seconds']}s: {catalog.counts}")
        ids_path = work / "ids.json"
        ids_path.write_text(
            json.dumps(
                {"vms": catalog.vm_names, "backups": catalog.backup_ids, "jobs": catalog.job_ids}
            )
        )

        # ------------------------------------------------------ nodes, hubs
        t0 = time.perf_counter()
        say("starting nodes and hubs")
        for s in slots[: args.nodes]:
            s.start_node()
            if args.node_nice and s.node is not None:
                os.setpriority(os.PRIO_PROCESS, s.node.pid, args.node_nice)
        slots[0].start_hub()
        for s in slots[1 : args.hubs]:
            # Hubs on one catalog share its secret key and (here) the admin token.
            s.hub_dir.mkdir(parents=True)
            for name in ("secret.key", "admin.token"):
                shutil.copy2(hub0 / name, s.hub_dir / name)
            s.start_hub()
        info["start_seconds"] = round(time.perf_counter() - t0, 1)
        token = slots[0].admin_token
        hubs = slots[: args.hubs]
        say(
            f"{args.nodes} nodes and {args.hubs} hubs up in {info['start_seconds']}s: "
            + ", ".join(h.hub_url for h in hubs)
        )

        # ------------------------------------------------------- VMs, sources
        for i in range(args.backup_vms):
            vm = QsdVm(work / "vms" / f"load-{i:02d}", f"load-{i:02d}")
            vm.add_disk(args.vm_mib * MiB)
            vm.start()
            vms.append(vm)
            if args.node_nice and vm.proc is not None:
                os.setpriority(os.PRIO_PROCESS, vm.proc.pid, args.node_nice)
            h = vm.guest(0)  # some data for the first full
            h.pwrite(random.Random(i).randbytes(args.vm_mib * MiB // 4), 0)
            h.flush()
            h.shutdown()
        c = slots[0].client
        for n, s in enumerate(slots[: args.nodes]):
            node = c.post("/api/v1/nodes", s.node_body(f"node{n}"))
            mine = vms[n :: args.nodes]
            src = c.post(
                "/api/v1/sources",
                {
                    "name": f"qemu{n}",
                    "node_id": node["node_id"],
                    "type": "qemu",
                    "config": {"vms": [{"name": v.name, "qmp_socket": v.qmp_socket} for v in mine]},
                },
            )
            c.post("/api/v1/vms/discover", {"source_id": src["source_id"]})
        say(f"{len(vms)} VMs of {args.vm_mib} MiB on {args.nodes} nodes")

        # ------------------------------------------------------------- load
        clients = [
            httpx.Client(
                base_url=h.hub_url,
                headers={"Authorization": f"Bearer {token}"},
                timeout=args.timeout,
                # Below the hub's keep-alive (uvicorn: 5 s, httpx's default
                # too): a request on a connection the hub is closing that
                # moment ends in a ReadError that is nobody's fault.
                limits=httpx.Limits(keepalive_expiry=IDLE_REUSE),
            )
            for h in hubs
        ]
        hub_pids = hub_processes([h.hub.pid for h in hubs if h.hub is not None])
        ctx = mp.get_context("spawn")
        results: mp.Queue[dict[str, Any]] = ctx.Queue()

        def traffic_for(seconds: float, seed: int) -> tuple[Any, float]:
            start_at = time.time() + 2.0
            t = Traffic(
                hubs=[("127.0.0.1", h.hub_port) for h in hubs],
                token=token,
                ids_path=str(ids_path),
                rate=args.rate,
                seconds=seconds,
                timeout=args.timeout,
                start_at=start_at,
                seed=seed,
                weights=args.weights,
            )
            gen = ctx.Process(target=traffic_process, args=(t, results), daemon=True)
            gen.start()
            return gen, start_at

        if args.baseline > 0:
            # The same traffic with no backup running: what the machine gives
            # the API alone (other processes on it included).
            say(f"baseline: {args.rate:g} requests/s for {args.baseline:g}s, no backups")
            hub_cpu0, busy0 = cpu_seconds(hub_pids), machine_cpu_seconds()
            gen, _ = traffic_for(args.baseline, args.seed + 1)
            baseline = results.get(timeout=args.baseline + args.timeout + 60)
            gen.join(timeout=10)
            cpu["baseline_hubs_s"] = round(cpu_seconds(hub_pids) - hub_cpu0, 1)
            cpu["baseline_busy_s"] = round(machine_cpu_seconds() - busy0, 1)
        gen, start_at = traffic_for(args.seconds, args.seed)
        time.sleep(max(0.0, start_at - time.time()))
        begin = time.monotonic()
        window = (begin, begin + args.seconds)
        cpu0 = {"hubs": cpu_seconds(hub_pids), "machine": machine_cpu_seconds()}
        procs0 = cpu_by_process(work, db_name, {os.getpid(), gen.pid or 0})
        for i, vm in enumerate(vms):
            th = threading.Thread(
                target=backup_loop,
                args=(
                    vm,
                    i,
                    clients,
                    stats,
                    window[1],
                    stop,
                    random.Random(args.seed + i),
                    args.vm_mib * MiB,
                ),
                name=f"backup-{vm.name}",
                daemon=True,
            )
            th.start()
            threads.append(th)
        say(f"load: {args.rate:g} requests/s on {args.hubs} hubs and {len(vms)} backup loops")
        sampler = threading.Thread(
            target=sample_connections, args=(url, db_name, stop, pg_conns), daemon=True
        )
        sampler.start()
        while time.monotonic() < window[1]:
            time.sleep(min(30.0, max(0.1, window[1] - time.monotonic())))
            done = sum(j["status"] == "completed" for j in stats.jobs)
            say(
                f"  {time.monotonic() - begin:5.0f}s: {done} backups completed, "
                f"{len(stats.running)} running or queued, load {os.getloadavg()[0]:.1f}"
            )
        cpu["hubs_s"] = round(cpu_seconds(hub_pids) - cpu0["hubs"], 1)
        split = cpu_split(procs0, cpu_by_process(work, db_name, {os.getpid(), gen.pid or 0}))
        busy = machine_cpu_seconds() - cpu0["machine"]
        split["not this run (other work on the machine)"] = busy - sum(split.values())
        cpu["window_cpu_s"] = round(args.seconds * cpus, 1)
        cpu["busy_s"] = round(busy, 1)
        cpu["by_kind_s"] = {k: round(v, 1) for k, v in sorted(split.items(), key=lambda x: -x[1])}
        traffic = results.get(timeout=args.timeout + 60)
        gen.join(timeout=10)
        # Backups still running: wait (bounded), then cancel.
        drain_end = time.monotonic() + args.drain
        while any(th.is_alive() for th in threads) and time.monotonic() < drain_end:
            time.sleep(0.5)
        if any(th.is_alive() for th in threads):
            with stats.lock:
                left = dict(stats.running)
            say(f"cancelling {len(left)} backups still running after {args.drain:g}s")
            info["cancelled_at_end"] = list(left)
            for job_id, hub in left.items():
                _call(stats, clients[hub], "POST", f"/api/v1/jobs/{job_id}/cancel")
            for th in threads:
                th.join(timeout=60)
        stop.set()
        for th in threads:
            th.join(timeout=15)
        info["hub_log_errors"] = {
            f"hub{i}": sum(
                1 for line in h.log("hub").splitlines() if " ERROR " in line or "Traceback" in line
            )
            for i, h in enumerate(hubs)
        }
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop.set()
        for cl in clients:
            cl.close()
        for s in slots:
            s.stop()
        for vm in vms:
            vm.stop()
        deadline = time.monotonic() + 15
        leaked = processes_under(work)
        while leaked and time.monotonic() < deadline:
            time.sleep(0.2)
            leaked = processes_under(work)
        kill_all(leaked)
        if pg is not None and db_created and pg_own is None:
            try:
                pg.drop_database(db_name)
            except Exception as e:  # never hide the first error
                say(f"could not drop database {db_name}: {e}")
        if pg_own is not None:
            pg_own.stop()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    # ----------------------------------------------------------------- figures
    records = traffic.get("records", [])
    all_ms = sorted(ms for _, _, ms, _ in records)
    base_records = baseline.get("records", [])
    base_ms = sorted(ms for _, _, ms, _ in base_records)
    base_p50, base_p99 = percentile(base_ms, 50), percentile(base_ms, 99)
    base_errors = Counter(o for _, _, _, o in base_records if o != "ok")
    base_server = sum(v for k, v in base_errors.items() if k[0] != "4")
    base_server += baseline.get("unfinished", 0)
    outcomes = Counter(o for _, _, _, o in records if o != "ok")
    api_server = sum(v for k, v in outcomes.items() if k[0] != "4")
    api_server += traffic.get("unfinished", 0)
    api_client = sum(v for k, v in outcomes.items() if k[0] == "4")
    server_errors = api_server + sum(stats.server_errors.values())
    client_errors = api_client + sum(stats.client_errors.values())
    in_window = [j for j in stats.jobs if window[0] <= j["ended"] <= window[1]]
    completed = sum(j["status"] == "completed" for j in in_window)
    failed = [j for j in stats.jobs if j["status"] != "completed"]
    jobs_per_min = completed / (args.seconds / 60)
    durations = sorted(j["ended"] - j["started"] for j in stats.jobs if j["status"] == "completed")
    rps = len(records) / traffic["elapsed"] if traffic.get("elapsed") else 0.0

    per: dict[str, dict[str, Any]] = {}
    for name in MIX:
        for hub in range(args.hubs):
            lat = sorted(ms for n, h, ms, _ in records if n == name and h == hub)
            errs = Counter(o for n, h, _, o in records if n == name and h == hub and o != "ok")
            per[f"{name}@hub{hub}"] = {
                "requests": len(lat),
                "p50_ms": round(percentile(lat, 50), 1),
                "p99_ms": round(percentile(lat, 99), 1),
                "max_ms": round(lat[-1], 1) if lat else float("nan"),
                "errors": dict(errs),
            }
    by_hub = {
        f"hub{h}": {
            "p50_ms": round(percentile(sorted(ms for _, x, ms, _ in records if x == h), 50), 1),
            "p99_ms": round(percentile(sorted(ms for _, x, ms, _ in records if x == h), 99), 1),
        }
        for h in range(args.hubs)
    }
    p50, p99 = percentile(all_ms, 50), percentile(all_ms, 99)
    last = (
        f"load_p99_ms={p99:.1f} load_p50_ms={p50:.1f} jobs_per_min={jobs_per_min:.1f} "
        f"server_errors={server_errors} rps={rps:.1f} jobs_completed={completed} "
        f"jobs_failed={len(failed)} client_errors={client_errors} leaked={len(leaked)} "
        f"base_p50_ms={base_p50:.1f} base_p99_ms={base_p99:.1f} base_server_errors={base_server} "
        f"pg_connections_max={max(pg_conns, default=0)}"
    )
    # What the figures are worth on this machine, said with them.
    notes = []
    other = cpu.get("by_kind_s", {}).get("not this run (other work on the machine)", 0.0)
    if cpu.get("window_cpu_s") and other > 0.25 * cpu["window_cpu_s"]:
        notes.append(
            f"other work on the machine used {other:.0f} of {cpu['window_cpu_s']:.0f} CPU-s in "
            "the window: the figures are this machine's, not the hubs' capacity"
        )
    timeouts = outcomes.get("timeout", 0)
    if records and timeouts > 0.01 * len(records):
        notes.append(
            f"{timeouts} requests had no answer within {args.timeout:g}s: the hubs fell behind "
            f"the fixed rate of {args.rate:g}/s and requests queued (open loop); try --rate "
            "lower to find the rate this machine sustains"
        )
    if args.hub_env:
        notes.append(f"hub settings changed: {dict(args.hub_env)}")
    if args.node_nice:
        notes.append(
            f"nodes, their workers and the VMs ran at nice {args.node_nice} "
            "(standing for other hosts; hubs, targets and PostgreSQL at 0)"
        )
    changed = {k: w for k, w in args.weights.items() if w != MIX[k][0]}
    if changed:
        notes.append(f"request mix changed from the default: {changed}")
    if args.quick or (args.vms, args.rate, args.backup_vms, args.nodes, args.hubs) != (
        5000,
        200.0,
        20,
        4,
        2,
    ):
        notes.append(
            "scaled down from the issue's numbers (5,000 VMs, 200 requests/s, 20 backups, "
            "4 nodes, 2 hubs)"
        )
    result = {
        "started_at": stamp.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "params": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("database_url",)
        },
        "mix_weights": args.weights,
        "host": {
            "cpus": cpus,
            "loadavg_start": load0,
            "loadavg_end": list(os.getloadavg()),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "note": "hubs, nodes, VMs, PostgreSQL and the clients share these cpus",
        },
        "git": git_state(),
        **info,
        "hub_cpu_seconds": cpu.get("hubs_s"),
        "cpu_in_window": cpu,
        "pg_connections": {
            "max": max(pg_conns, default=None),
            "median": sorted(pg_conns)[len(pg_conns) // 2] if pg_conns else None,
            "samples": len(pg_conns),
            "max_connections": args.pg_max_connections if args.database_url is None else None,
        },
        "api": {
            "sent": traffic.get("sent"),
            "answered": len(records),
            "unfinished": traffic.get("unfinished"),
            "rps": round(rps, 1),
            "p50_ms": round(p50, 1),
            "p99_ms": round(p99, 1),
            "errors": dict(outcomes),
            "connections_opened": traffic.get("connections_opened"),
            "send_lag_max_ms": traffic.get("send_lag_max_ms"),
            "by_hub": by_hub,
            "endpoints": per,
        },
        "baseline": {
            "seconds": args.baseline,
            "answered": len(base_records),
            "p50_ms": round(base_p50, 1),
            "p99_ms": round(base_p99, 1),
            "errors": dict(base_errors),
            "unfinished": baseline.get("unfinished"),
        },
        "backups": {
            "completed_in_window": completed,
            "ended": len(stats.jobs),
            "failed": [{k: j[k] for k in ("vm", "status", "error_code", "error")} for j in failed],
            "start_p50_ms": round(percentile(sorted(stats.start_ms), 50), 1),
            "start_p99_ms": round(percentile(sorted(stats.start_ms), 99), 1),
            "duration_p50_s": round(percentile(durations, 50), 1),
            "duration_max_s": round(durations[-1], 1) if durations else None,
            "server_errors": dict(stats.server_errors),
            "client_errors": dict(stats.client_errors),
            "client_error_samples": stats.client_samples,
            "server_error_samples": stats.server_samples,
            "loop_errors": stats.loop_errors,
        },
        "leaked": [f"{pid} {cmd}" for pid, cmd in leaked],
        "notes": notes,
        "last_line": last,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"load-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(
        f"catalog PostgreSQL: {info.get('catalog')}; {args.hubs} hubs, {args.nodes} nodes, "
        f"{args.backup_vms} backup loops ({args.vm_mib} MiB VMs); {args.rate:g} requests/s "
        f"for {args.seconds:g}s; everything shares {cpus} cpus "
        f"(load {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end)"
    )
    head = f"{'endpoint':<24} {'reqs':>6} {'p50':>8} {'p99':>8} {'max':>8}  errors"
    print(head)
    print("-" * len(head))
    for name, row in per.items():
        shown = ", ".join(f"{k} x{v}" for k, v in sorted(row["errors"].items())) or "0"
        print(
            f"{name:<24} {row['requests']:>6} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} "
            f"{row['max_ms']:>8.1f}  {shown}"
        )
    print(
        f"API: {len(records)} answers of {traffic.get('sent')} sent ({rps:.1f}/s), "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (from the scheduled send time); by hub {by_hub}; "
        f"send lag max {traffic.get('send_lag_max_ms')} ms; "
        f"connections {traffic.get('connections_opened')}"
    )
    if base_records:
        print(
            f"baseline (API alone, {args.baseline:g}s): p50 {base_p50:.1f} ms, "
            f"p99 {base_p99:.1f} ms, errors {dict(base_errors) or 0}; hub CPU "
            f"{cpu.get('baseline_hubs_s')} s ("
            f"{1000 * cpu.get('baseline_hubs_s', 0) / max(1, len(base_records)):.1f} ms per "
            f"request), machine busy {cpu.get('baseline_busy_s')} of "
            f"{args.baseline * cpus:.0f} CPU-s"
        )
    print(
        f"backups: {completed} completed in the window ({jobs_per_min:.1f}/min), "
        f"{len(failed)} failed or cancelled, duration p50 {percentile(durations, 50):.1f} s "
        f"(queue wait included); POST /backups answered in p50 "
        f"{percentile(sorted(stats.start_ms), 50):.0f} ms, p99 "
        f"{percentile(sorted(stats.start_ms), 99):.0f} ms; hub CPU {cpu.get('hubs_s')} s"
    )
    if pg_conns:
        print(
            f"PostgreSQL connections to the catalog: max {max(pg_conns)}, "
            f"median {sorted(pg_conns)[len(pg_conns) // 2]} (every 2 s)"
        )
    if cpu.get("by_kind_s"):
        shares = ", ".join(f"{k} {v:.0f}" for k, v in cpu["by_kind_s"].items())
        print(
            f"CPU seconds in the window ({cpu['window_cpu_s']:.0f} available, "
            f"{cpu['busy_s']:.0f} busy): {shares}"
        )
    for j in failed[:10]:
        print(f"  failed {j['vm']}: {j['status']} {j['error_code']}: {j['error']}")
    if stats.server_errors or stats.client_errors:
        print(
            f"backup loops: server {dict(stats.server_errors)} client {dict(stats.client_errors)}"
        )
    if leaked:
        print(f"LEFT BEHIND (killed): {leaked}")
    for note in notes:
        print(f"NOTE: {note}")
    print(f"results: {out}")
    print(last, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
