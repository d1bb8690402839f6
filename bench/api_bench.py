"""API-at-scale benchmark: the hub's read API on a catalog the size of a site.

Run by ``make bench-api`` (``.venv/bin/python bench/api_bench.py``). One run:

1. fills a fresh catalog (SQLite in the work directory, or ``--database-url``
   for an empty PostgreSQL database; schema from the Alembic migrations via
   ``Database.upgrade()``) with bulk inserts of the ORM models: one node, one
   source, ``--vms`` VMs (default 1,000) of ``--disks-per-vm`` disks (2), the
   ``default`` repository, and ``--runs`` backup runs (50): one job per VM per
   run (50,000 jobs) and one restore point per disk per job (100,000 backups).
   Each disk's chain is a full, then incrementals whose ``parent_id`` is the
   newest completed point before them; about 93 % of the runs completed,
   5 % failed and 2 % were cancelled (the first run of a VM always completed);
2. starts a real hub process on it (``sendense hub serve``, default settings,
   log level INFO as deployed);
3. from another process (asyncio, a minimal HTTP/1.1 client, keep-alive, one
   connection per client) measures each endpoint below for ``--seconds`` (30), first with one
   client sending one request at a time, then with ``--clients`` (50)
   concurrent clients; ids and names
   are drawn at random for every request:

   ==================  ====================================================
   backup_detail       GET /api/v1/backups/{backup_id}
   job_status          GET /api/v1/jobs/{job_id}
   vm_detail           GET /api/v1/vms/{vm}
   backups_list        GET /api/v1/backups?limit=100
   backups_filtered    GET /api/v1/backups?status=completed&backup_type=incremental&limit=100
   backups_offset      GET /api/v1/backups?limit=100&offset={half the backups}
   backups_of_vm       GET /api/v1/backups?vm_name={vm}&limit=100
   jobs_list           GET /api/v1/jobs?limit=50
   jobs_running        GET /api/v1/jobs?status=running&limit=50
   chain               GET /api/v1/backups/{vm}/chain
   vms                 GET /api/v1/vms
   ==================  ====================================================

4. prints a table, writes the figures to ``bench/results/api-<UTC stamp>.json``
   and prints as its last line::

     c1_detail_p99_ms= c1_list_p99_ms= c1_vms_p99_ms= c50_detail_p99_ms=
     c50_job_p99_ms= c50_list_p99_ms= c50_chain_p99_ms= c50_vms_p99_ms=
     errors= rps=

   ``c1_detail`` is the worst of backup_detail, vm_detail and job_status with
   one client; ``c1_list`` the worst of the six lists and the chain (SPEC 9
   gives them the same one-client target); ``c50_list`` the worst of the six
   lists with 50 clients. ``errors`` counts every request of every phase answered non-2xx or
   not answered (exception, or no answer within ``--timeout``, 60 s); ``rps``
   is the requests answered per second over all the 50-client phases.

Latencies are from the client's send to the last byte of the body, failed
requests included (a timeout counts as its timeout). A phase stops sending at
``--seconds`` and waits for the requests in flight (at most ``--timeout``),
so a run lasts at most ``2 x 9 x (seconds + timeout)`` plus the fill. The
``vms`` endpoint runs last: a hub still working on requests its clients gave
up on slows every phase after it (the table flags phases with timeouts).

The machine's cores are shared by the hub and the clients (on 2 cores the
clients' own CPU is part of the latency): the output says how many
cores there were and how much CPU the hub used per request.

Targets (SPEC 9): one client p99 < 10 ms for details and job status and
< 25 ms for lists of 100, chains and /vms with 1,000 VMs; 50 clients p99
< 100 ms for details and job status and < 200 ms for every list, chain and
/vms, with zero errors.

``--quick`` runs 3 s per endpoint on a catalog of 100 VMs (10,000 backups).
``--one-client`` skips the 50-client phases. ``--compare-with SRC`` (PostgreSQL
only) starts a second hub on the same catalog running the code in ``SRC``
(another checkout's ``src/``) and, instead of the phases, measures the hub CPU
per request of both with batches alternated between them: a before/after
ratio that holds on a busy machine.
The hub, the client processes and the work directory (SQLite file, hub data
dir) are removed at the end, also on error or Ctrl-C; on PostgreSQL the rows
are deleted again (the database must be empty at the start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import delete, func, insert, select, text

from sendense.catalog.db import Database, normalize_url, sqlite_url
from sendense.catalog.models import Backup, BackupJob, Node, Repository, Source, Vm, VmDisk
from sendense.cli.services import free_port, start_service, stop_service, wait_healthy
from sendense.secretbox import SecretBox
from sendense.storage.layout import backup_path

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
BATCH = 5000  # rows per executemany
CLIENT_PROCESSES = 1  # asyncio clients: one process keeps up (see HttpConnection)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------- catalog


@dataclass
class Size:
    vms: int
    disks_per_vm: int
    runs: int

    @property
    def jobs(self) -> int:
        return self.vms * self.runs

    @property
    def backups(self) -> int:
        return self.vms * self.disks_per_vm * self.runs


@dataclass
class Catalog:
    """What the clients draw from: every VM name, backup id and job id."""

    vm_names: list[str]
    backup_ids: list[str]
    job_ids: list[str]
    counts: dict[str, int] = field(default_factory=dict)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _batches(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), BATCH):
        yield rows[start : start + BATCH]


def fill_catalog(
    db: Database, repo_path: Path, secrets: SecretBox, size: Size, seed: int
) -> Catalog:
    """Insert a site's worth of rows (see the module docstring) in one transaction.

    Rows go in as dicts through ``insert(Model)`` (executemany per batch):
    the models' column types (UTC datetimes, JSON) apply, the ORM's unit of
    work does not, which keeps 150,000 rows well under a minute.
    """
    rng = random.Random(seed)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    node_id, source_id = _uuid(rng), _uuid(rng)
    repo_id = "default"
    vms: list[dict[str, Any]] = []
    disks: list[dict[str, Any]] = []
    for i in range(size.vms):
        vm_id = _uuid(rng)
        vms.append(
            {
                "id": vm_id,
                "name": f"vm-{i:05d}",
                "source_id": source_id,
                "path": f"/run/sendense/qmp/vm-{i:05d}.sock",
                "discovered_at": start - timedelta(days=1),
                "tags": {"env": rng.choice(["prod", "prod", "test"]), "team": f"t{i % 20}"},
            }
        )
        for d in range(size.disks_per_vm):
            capacity = rng.choice([20, 40, 100, 200]) * GiB
            disks.append(
                {
                    "id": _uuid(rng),
                    "vm_id": vm_id,
                    "disk_index": d,
                    "disk_key": 2000 + d,
                    "label": f"virtio-disk{d}",
                    "capacity_bytes": capacity,
                    "size_gb": capacity / GiB,
                    "path": f"/var/lib/vms/vm-{i:05d}/disk{d}.qcow2",
                    "node_name": f"drive-virtio-disk{d}",
                }
            )
    disks_of: dict[str, list[dict[str, Any]]] = {}
    for d in disks:
        disks_of.setdefault(d["vm_id"], []).append(d)

    jobs: list[dict[str, Any]] = []
    backups: list[dict[str, Any]] = []
    # Newest completed point of each disk: the parent of the next one.
    last: dict[str, dict[str, Any]] = {}
    for run in range(size.runs):
        for n, vm in enumerate(vms):
            # One run a day; a run's jobs a minute apart (1,000 VMs: 17 hours).
            at = start + timedelta(days=run, minutes=n, microseconds=rng.randrange(1_000_000))
            roll = rng.random()
            status = "completed" if run == 0 or roll < 0.93 else "failed"
            if status == "failed" and roll > 0.98:
                status = "cancelled"
            job_id = _uuid(rng)
            seconds = rng.uniform(20, 900)
            progress: dict[str, Any] = {}
            for d in disks_of[vm["id"]]:
                parent = last.get(d["id"])
                btype = "incremental" if parent else "full"
                total = d["capacity_bytes"]
                data = (
                    total // rng.randint(2, 4) if parent is None else total // rng.randint(30, 300)
                )
                done = data if status == "completed" else data // rng.randint(2, 10)
                digest = f"x3-64k:{rng.getrandbits(256):064x}" if status == "completed" else None
                change_id = _uuid(rng) if status == "completed" else None
                progress[str(d["disk_key"])] = {
                    "disk_key": d["disk_key"],
                    "status": status,
                    "mode": btype,
                    "bytes_done": done,
                    "bytes_total": data,
                    "data_bytes": done,
                    "zero_bytes": total - data,
                    "rate": int(done / seconds),
                    "eta": 0.0,
                    "requests": done // (4 << 20) + 1,
                    "seconds": round(seconds, 3),
                    "fallback_reason": None,
                    "change_id": change_id,
                    "digest": digest,
                }
                row = {
                    "id": _uuid(rng),
                    "job_id": job_id,
                    "vm_id": vm["id"],
                    "vm_disk_id": d["id"],
                    "disk_index": d["disk_index"],
                    "disk_key": d["disk_key"],
                    "repository_id": repo_id,
                    "parent_id": parent["id"] if parent else None,
                    "backup_type": btype,
                    "status": status,
                    "file_path": str(backup_path(repo_path, vm["name"], d["disk_key"], at, btype)),
                    "nbd_export_name": f"sendense-{job_id[:8]}-{d['disk_key']}",
                    "nbd_port": None,
                    "nbd_pid": None,
                    "total_bytes": total,
                    "bytes_transferred": done,
                    "size_on_disk": done + (done >> 12) if status == "completed" else 0,
                    "change_id": change_id,
                    "previous_change_id": parent["change_id"] if parent else None,
                    "digest": digest,
                    "error": None if status == "completed" else _error(status),
                    "tags": {},
                    "created_at": at,
                    "started_at": at + timedelta(seconds=1),
                    "finished_at": at + timedelta(seconds=seconds),
                    "immutable_until": None,
                    "synthetic": False,
                    "verify_status": None,
                    "verified_at": None,
                    "verify_error": None,
                }
                backups.append(row)
                if status == "completed":
                    last[d["id"]] = row
            jobs.append(
                {
                    "id": job_id,
                    "kind": "backup",
                    "vm_id": vm["id"],
                    "repository_id": repo_id,
                    "node_id": node_id,
                    "status": status,
                    "step": status,
                    "requested_type": "auto",
                    "progress": progress,
                    "tags": {},
                    "messages": {},
                    "error_code": None if status == "completed" else f"{status}",
                    "error_message": None if status == "completed" else _error(status),
                    "created_by": "admin",
                    "created_at": at,
                    "started_at": at + timedelta(seconds=1),
                    "finished_at": at + timedelta(seconds=seconds),
                    "timeout_at": at + timedelta(hours=4),
                    "owner": None,
                    "lease_until": None,
                    "cancel_requested_at": None,
                    "params": {},
                    "result": {},
                }
            )

    with db.session() as s:
        s.execute(
            insert(Node),
            [
                {
                    "id": node_id,
                    "name": "node-bench",
                    # Nothing listens there: the hub's health prober fails fast.
                    "url": "http://127.0.0.1:9",
                    "token_encrypted": secrets.encrypt("bench-node-token"),
                    "created_at": start - timedelta(days=2),
                }
            ],
        )
        s.execute(
            insert(Source),
            [
                {
                    "id": source_id,
                    "name": "qemu-bench",
                    "node_id": node_id,
                    "type": "qemu",
                    "config": {},
                    "created_at": start - timedelta(days=2),
                }
            ],
        )
        s.execute(
            insert(Repository),
            [
                {
                    "id": repo_id,
                    "name": "default",
                    "type": "local",
                    "path": str(repo_path),
                    "immutable": False,
                    "retention_days": 0,
                    "config": {},
                    "created_at": start - timedelta(days=2),
                }
            ],
        )
        for model, rows in ((Vm, vms), (VmDisk, disks), (BackupJob, jobs), (Backup, backups)):
            for batch in _batches(rows):
                s.execute(insert(model), batch)
    if db.url.get_backend_name() == "postgresql":
        # An established PostgreSQL catalog has statistics (autovacuum); a
        # SQLite one has none (the hub never runs ANALYZE), so SQLite stays as is.
        with db.engine.connect() as c:
            c.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    counts = {
        "vms": len(vms),
        "disks": len(disks),
        "jobs": len(jobs),
        "backups": len(backups),
        "backups_completed": sum(b["status"] == "completed" for b in backups),
    }
    return Catalog(
        [v["name"] for v in vms], [b["id"] for b in backups], [j["id"] for j in jobs], counts
    )


def _error(status: str) -> str:
    if status == "cancelled":
        return "cancelled by admin"
    return "node: NBD read failed at offset 21474836480: Connection reset by peer"


FILLED = (Backup, BackupJob, VmDisk, Vm, Source, Node, Repository)


def catalog_is_empty(db: Database) -> bool:
    with db.session() as s:
        return all(s.scalar(select(func.count()).select_from(m)) == 0 for m in FILLED)


def empty_catalog(db: Database) -> None:
    """Delete the rows of a run (PostgreSQL: the database outlives the run)."""
    with db.engine.begin() as c:
        for table in ("backup_holds", "audit_log", "api_tokens"):
            c.execute(text(f"DELETE FROM {table}"))
        c.execute(text("UPDATE backups SET parent_id = NULL"))
        for model in FILLED:
            c.execute(delete(model))


# --------------------------------------------------------------------- clients


@dataclass(frozen=True)
class Endpoint:
    name: str
    group: str  # detail, job, list, chain, vms
    shown: str  # the path as the table shows it
    path: Callable[[random.Random, dict[str, Any]], str]


ENDPOINTS = [
    Endpoint(
        "backup_detail",
        "detail",
        "/backups/{id}",
        lambda rng, ids: f"/api/v1/backups/{rng.choice(ids['backups'])}",
    ),
    Endpoint(
        "job_status",
        "job",
        "/jobs/{id}",
        lambda rng, ids: f"/api/v1/jobs/{rng.choice(ids['jobs'])}",
    ),
    Endpoint(
        "vm_detail",
        "detail",
        "/vms/{vm}",
        lambda rng, ids: f"/api/v1/vms/{rng.choice(ids['vms'])}",
    ),
    Endpoint(
        "backups_list",
        "list",
        "/backups?limit=100",
        lambda rng, ids: "/api/v1/backups?limit=100",
    ),
    Endpoint(
        "backups_filtered",
        "list",
        "/backups?status=completed&backup_type=incremental&limit=100",
        lambda rng, ids: "/api/v1/backups?status=completed&backup_type=incremental&limit=100",
    ),
    Endpoint(
        "backups_offset",
        "list",
        "/backups?limit=100&offset={n/2}",
        lambda rng, ids: f"/api/v1/backups?limit=100&offset={len(ids['backups']) // 2}",
    ),
    Endpoint(
        "backups_of_vm",
        "list",
        "/backups?vm_name={vm}&limit=100",
        lambda rng, ids: f"/api/v1/backups?vm_name={rng.choice(ids['vms'])}&limit=100",
    ),
    Endpoint(
        "jobs_list",
        "list",
        "/jobs?limit=50",
        lambda rng, ids: "/api/v1/jobs?limit=50",
    ),
    Endpoint(
        "jobs_running",
        "list",
        "/jobs?status=running&limit=50",
        lambda rng, ids: "/api/v1/jobs?status=running&limit=50",
    ),
    Endpoint(
        "chain",
        "chain",
        "/backups/{vm}/chain",
        lambda rng, ids: f"/api/v1/backups/{rng.choice(ids['vms'])}/chain",
    ),
    # Last: the slowest, and a hub still busy with abandoned requests slows
    # whatever runs after it.
    Endpoint("vms", "vms", "/vms", lambda rng, ids: "/api/v1/vms"),
]
BY_NAME = {e.name: e for e in ENDPOINTS}

# SPEC 9 targets (p99, ms) by group: one client, 50 clients.
TARGETS = {
    "detail": (10.0, 100.0),
    "job": (10.0, 100.0),
    "list": (25.0, 200.0),
    "chain": (25.0, 200.0),
    "vms": (25.0, 200.0),
}


@dataclass
class Task:
    endpoint: str
    clients: int
    seconds: float
    timeout: float
    start_at: float  # time.time() at which every client starts
    seed: int


class HttpConnection:
    """One keep-alive HTTP/1.1 connection, the least client work per request.

    The hub and the clients share the machine's cores (2 here): httpx in
    25 threads per process spent about as much CPU per request as the hub
    and queued on its GIL, so the clients' own latency showed up in the
    hub's figures. This reads the status line, the headers and a body of
    ``Content-Length`` (or chunked) bytes, and nothing else.
    """

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port = host, port
        self.head = f"Host: {host}:{port}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, int]:
        """GET ``path``: (status, body bytes). Reconnects once if the hub closed it."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\n" + self.head)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked, close = 0, False, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        if chunked:
            length = 0
            while size := int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
                await self.reader.readexactly(size + 2)
                length += size
            await self.reader.readuntil(b"\r\n")
        else:
            await self.reader.readexactly(length)
        if close:
            self.close()
        return status, length

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _client(
    host: str, port: int, token: str, ids: dict[str, Any], task: Task, seed: int
) -> tuple[list[float], Counter[str], float]:
    """One client: one request at a time on its own connection until the deadline."""
    rng = random.Random(seed)
    endpoint = BY_NAME[task.endpoint]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    conn = HttpConnection(host, port, token)
    delay = task.start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    deadline = task.start_at + task.seconds
    try:
        while time.time() < deadline:
            path = endpoint.path(rng, ids)
            t0 = time.perf_counter()
            try:
                status, _ = await asyncio.wait_for(conn.get(path), task.timeout)
                if not 200 <= status < 300:
                    errors[str(status)] += 1
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,
            ) as e:
                errors[type(e).__name__] += 1
                conn.close()
            except TimeoutError:
                errors["timeout"] += 1
                conn.close()
            latencies.append((time.perf_counter() - t0) * 1000)
    finally:
        conn.close()
    return latencies, errors, time.time()


def run_task(base_url: str, token: str, ids: dict[str, Any], task: Task) -> dict[str, Any]:
    """``task.clients`` clients, each one request at a time, for ``task.seconds``."""
    url = httpx.URL(base_url)
    host, port = url.host, url.port or 80

    async def all_clients() -> list[tuple[list[float], Counter[str], float]]:
        return await asyncio.gather(
            *(
                _client(host, port, token, ids, task, task.seed * 1000 + i)
                for i in range(task.clients)
            )
        )

    outs = asyncio.run(all_clients())
    errors: Counter[str] = Counter()
    for _, e, _ in outs:
        errors.update(e)
    return {
        "latencies": [x for lat, _, _ in outs for x in lat],
        "errors": dict(errors),
        "end": max(end for _, _, end in outs),
    }


def client_process(
    tasks: mp.Queue[Task | None],
    results: mp.Queue[dict[str, Any]],
    base_url: str,
    token: str,
    ids_path: str,
) -> None:
    """A client process: runs the tasks it is given until it gets None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    ids = json.loads(Path(ids_path).read_text())
    results.put({"ready": True})
    while (task := tasks.get()) is not None:
        results.put(run_task(base_url, token, ids, task))


class Clients:
    """Client processes apart from the hub and from this one."""

    def __init__(self, base_url: str, token: str, ids_path: Path) -> None:
        ctx = mp.get_context("spawn")
        self.results: mp.Queue[dict[str, Any]] = ctx.Queue()
        self.queues: list[mp.Queue[Task | None]] = []
        self.procs: list[Any] = []
        for _ in range(CLIENT_PROCESSES):
            q: mp.Queue[Task | None] = ctx.Queue()
            p = ctx.Process(
                target=client_process,
                args=(q, self.results, base_url, token, str(ids_path)),
                daemon=True,
            )
            p.start()
            self.queues.append(q)
            self.procs.append(p)
        for _ in self.procs:
            self._get(120)

    def _get(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.results.get(timeout=1)
            except queue.Empty as e:
                dead = [p.pid for p in self.procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"client process(es) {dead} died") from e
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no answer from the clients in {timeout:.0f}s") from e

    def run(self, endpoint: str, clients: int, seconds: float, timeout: float, seed: int) -> Any:
        """``clients`` clients on ``endpoint``; latencies and errors of all of them."""
        split = [clients] if clients == 1 else _split(clients, len(self.queues))
        start_at = time.time() + 0.5
        for i, n in enumerate(split):
            self.queues[i].put(Task(endpoint, n, seconds, timeout, start_at, seed * 10 + i))
        parts = [self._get(seconds + timeout + 120) for _ in split]
        errors: Counter[str] = Counter()
        for p in parts:
            errors.update(p["errors"])
        latencies = sorted(x for p in parts for x in p["latencies"])
        return latencies, dict(errors), max(p["end"] for p in parts) - start_at

    def stop(self) -> None:
        for q in self.queues:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# --------------------------------------------------------------------- figures


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest rank: the smallest sample with at least ``q`` of them at or below."""
    if not sorted_ms:
        return float("nan")
    rank = max(1, -(-len(sorted_ms) * q // 100))
    return sorted_ms[int(rank) - 1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU so far of a process and its children (the hub's API
    worker processes), from Linux /proc."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class Phase:
    endpoint: str
    clients: int
    requests: int
    errors: dict[str, int]
    elapsed: float
    p50: float
    p90: float
    p99: float
    max: float
    mean: float
    hub_cpu_s: float
    load1: float = float("nan")  # load average at the end of the phase

    @property
    def target(self) -> float:
        one, many = TARGETS[BY_NAME[self.endpoint].group]
        return one if self.clients == 1 else many

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def ok(self) -> bool:
        return self.p99 < self.target and self.error_count == 0

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0


def phase_of(
    endpoint: str, clients: int, latencies: list[float], errors: dict[str, int], elapsed: float
) -> Phase:
    return Phase(
        endpoint=endpoint,
        clients=clients,
        requests=len(latencies),
        errors=errors,
        elapsed=elapsed,
        p50=percentile(latencies, 50),
        p90=percentile(latencies, 90),
        p99=percentile(latencies, 99),
        max=latencies[-1] if latencies else float("nan"),
        mean=sum(latencies) / len(latencies) if latencies else float("nan"),
        hub_cpu_s=float("nan"),
    )


def worst(phases: list[Phase], clients: int, groups: tuple[str, ...]) -> float:
    values = [p.p99 for p in phases if p.clients == clients and BY_NAME[p.endpoint].group in groups]
    return max(values) if values else float("nan")


def last_line(phases: list[Phase], many: int) -> str:
    c50 = [p for p in phases if p.clients == many]
    answered = sum(p.requests - p.error_count for p in c50)
    rps = answered / sum(p.elapsed for p in c50) if c50 else 0.0
    pairs = {
        "c1_detail_p99_ms": worst(phases, 1, ("detail", "job")),
        "c1_list_p99_ms": worst(phases, 1, ("list", "chain")),
        "c1_vms_p99_ms": worst(phases, 1, ("vms",)),
        "c50_detail_p99_ms": worst(phases, many, ("detail",)),
        "c50_job_p99_ms": worst(phases, many, ("job",)),
        "c50_list_p99_ms": worst(phases, many, ("list",)),
        "c50_chain_p99_ms": worst(phases, many, ("chain",)),
        "c50_vms_p99_ms": worst(phases, many, ("vms",)),
    }
    text_ = " ".join(f"{k}={v:.1f}" for k, v in pairs.items())
    errors = sum(p.error_count for p in phases)
    return f"{text_} errors={errors} rps={rps:.1f}"


def table(phases: list[Phase], timeout: float) -> list[str]:
    head = (
        f"{'endpoint':<17} {'clients':>7} {'reqs':>7} {'errors':>7} {'rps':>8} "
        f"{'p50':>9} {'p90':>9} {'p99':>9} {'max':>9} {'cpu/req':>8} {'load':>5} {'target':>7}  ok"
    )
    lines = [head, "-" * len(head)]
    for p in phases:
        cpu = p.hub_cpu_s / p.requests * 1000 if p.requests else float("nan")
        err = f"{p.error_count}" if p.error_count else "0"
        lines.append(
            f"{p.endpoint:<17} {p.clients:>7} {p.requests:>7} {err:>7} {p.rps:>8.1f} "
            f"{p.p50:>9.1f} {p.p90:>9.1f} {p.p99:>9.1f} {p.max:>9.1f} {cpu:>8.1f} {p.load1:>5.1f} "
            f"{p.target:>7.0f}  {'yes' if p.ok else 'NO'}"
        )
    lines.append(
        "(ms; cpu/req: hub CPU ms per request, all its threads; load: 1-minute load "
        "average at the end of the phase, other processes included)"
    )
    for p in phases:
        if p.errors:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(p.errors.items()))
            lines.append(f"errors {p.endpoint} x{p.clients}: {kinds}")
    if any("ReadTimeout" in p.errors for p in phases):
        lines.append(
            f"note: requests timed out ({timeout:.0f}s); the hub kept working on them, "
            "which slows the phases after them"
        )
    return lines


# --------------------------------------------------------------------- A/B


COMPARE_ROUNDS = 8  # batches per hub and endpoint, alternating
COMPARE_BATCH = 100  # requests per batch


def compare_cpu(
    hubs: dict[str, tuple[subprocess.Popen[bytes], int]],
    token: str,
    ids: dict[str, Any],
    endpoints: list[str],
    seed: int,
) -> dict[str, dict[str, float]]:
    """Hub CPU ms per request of each endpoint on two hubs of one catalog
    (``--compare-with``): one client sends batches of `COMPARE_BATCH`
    requests to each hub in turn, `COMPARE_ROUNDS` times (the order flips
    every round), so that the machine's other work weighs on both alike; a
    ratio is meaningful on a busy machine where two runs one after the
    other are not. Each hub runs one API process (``SENDENSE_API_WORKERS=1``)."""

    async def run() -> dict[str, dict[str, float]]:
        conns = {name: HttpConnection("127.0.0.1", port, token) for name, (_, port) in hubs.items()}

        async def batch(name: str, endpoint: str, rng: random.Random, count: int) -> float:
            conn, pid = conns[name], hubs[name][0].pid
            cpu0 = cpu_seconds(pid)
            for _ in range(count):
                path = BY_NAME[endpoint].path(rng, ids)
                try:
                    status, _ = await conn.get(path)
                except (asyncio.IncompleteReadError, ConnectionError):
                    conn.close()  # the hub closed the idle keep-alive connection
                    status, _ = await conn.get(path)
                if status != 200:
                    raise RuntimeError(f"{name} hub answered {status} to {path}")
            return cpu_seconds(pid) - cpu0

        out: dict[str, dict[str, float]] = {}
        try:
            for endpoint in endpoints:
                for name in hubs:
                    await batch(name, endpoint, random.Random(seed), 20)  # warm
                total = dict.fromkeys(hubs, 0.0)
                for r in range(COMPARE_ROUNDS):
                    for name in list(hubs)[:: 1 if r % 2 == 0 else -1]:
                        total[name] += await batch(
                            name, endpoint, random.Random(seed + r), COMPARE_BATCH
                        )
                n = COMPARE_ROUNDS * COMPARE_BATCH
                out[endpoint] = {k: round(v / n * 1000, 3) for k, v in total.items()}
                say(f"{endpoint:<17} hub CPU ms per request: {out[endpoint]}")
        finally:
            for conn in conns.values():
                conn.close()
        return out

    return asyncio.run(run())


def compare_table(result: dict[str, dict[str, float]], other: Path) -> list[str]:
    lines = [
        f"hub CPU ms per request, one client: this tree vs --compare-with {other}",
        f"{'endpoint':<17} {'this':>7} {'other':>7} {'this/other':>10}",
    ]
    for endpoint, v in result.items():
        ratio = v["this"] / v["other"] if v["other"] else float("nan")
        lines.append(f"{endpoint:<17} {v['this']:>7.2f} {v['other']:>7.2f} {ratio:>10.2f}")
    return lines


# --------------------------------------------------------------------- run


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": git("status", "--porcelain", "--", "src").splitlines(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vms", type=int, help="VMs in the catalog [1000; --quick 100]")
    p.add_argument("--disks-per-vm", type=int, default=2)
    p.add_argument("--runs", type=int, default=50, help="backup runs (jobs per VM) [50]")
    p.add_argument("--seconds", type=float, help="per endpoint and phase [30; --quick 3]")
    p.add_argument("--clients", type=int, default=50, help="concurrent clients [50]")
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout, s [60]")
    p.add_argument(
        "--endpoints",
        default=",".join(BY_NAME),
        help="comma-separated subset of: " + ", ".join(BY_NAME),
    )
    p.add_argument("--database-url", help="an empty PostgreSQL database instead of a SQLite file")
    p.add_argument("--quick", action="store_true", help="3 s per endpoint, 100 VMs")
    p.add_argument(
        "--compare-with",
        type=Path,
        metavar="SRC",
        help="also run a hub of the code in SRC (the src/ of another checkout, e.g. "
        "`git archive <commit> src | tar -x -C /tmp/old`, then /tmp/old/src) on the same "
        "catalog and compare the hub CPU per request of both, one client, batches "
        "alternated (needs --database-url: SQLite serves one hub)",
    )
    p.add_argument(
        "--one-client",
        action="store_true",
        help="only the one-client phases (the hub's CPU per request without contention)",
    )
    p.add_argument("--workdir", type=Path, help="parent of the work directory [/var/tmp]")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--keep", action="store_true", help="keep the work directory (debugging)")
    args = p.parse_args(argv)
    args.vms = args.vms or (100 if args.quick else 1000)
    args.seconds = args.seconds or (3.0 if args.quick else 30.0)
    names = [n.strip() for n in args.endpoints.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown endpoints {unknown}")
    args.endpoints = [e.name for e in ENDPOINTS if e.name in names]
    if args.compare_with is not None:
        if not args.database_url:
            p.error("--compare-with needs --database-url (a PostgreSQL catalog)")
        if not (args.compare_with / "sendense").is_dir():
            p.error(f"--compare-with {args.compare_with}: no sendense package there")
    if args.vms < 1 or args.runs < 1 or args.disks_per_vm < 1 or args.clients < 2:
        p.error("--vms, --runs, --disks-per-vm must be >= 1 and --clients >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parent = args.workdir or Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sendense-api-bench-", dir=parent)).resolve()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    stamp = datetime.now(UTC)
    load0 = list(os.getloadavg())
    cpus = os.cpu_count() or 1
    say(f"work dir {work}; load average {load0[0]:.2f} on {cpus} cpus")
    size = Size(args.vms, args.disks_per_vm, args.runs)
    data_dir = work / "hub"
    repo_path = data_dir / "repositories" / "default"
    url = args.database_url or sqlite_url(data_dir / "catalog.db")
    shown_url = normalize_url(url).render_as_string(hide_password=True)
    hub: subprocess.Popen[bytes] | None = None
    other: subprocess.Popen[bytes] | None = None
    compared: dict[str, dict[str, float]] = {}
    clients: Clients | None = None
    db: Database | None = None
    filled = False
    phases: list[Phase] = []
    info: dict[str, Any] = {}
    try:
        # ------------------------------------------------------------ fill
        repo_path.mkdir(parents=True, mode=0o700)
        db = Database(url)
        db.upgrade()
        if args.database_url and not catalog_is_empty(db):
            raise SystemExit(f"{shown_url} has rows already: give an empty database")
        say(
            f"filling {shown_url}: {size.vms} VMs, {size.vms * size.disks_per_vm} disks, "
            f"{size.jobs} jobs, {size.backups} backups"
        )
        t0 = time.perf_counter()
        filled = True
        catalog = fill_catalog(db, repo_path, SecretBox(data_dir / "secret.key"), size, args.seed)
        fill_s = time.perf_counter() - t0
        db.dispose()
        say(f"filled in {fill_s:.1f}s: {catalog.counts}")
        ids_path = work / "ids.json"
        ids_path.write_text(
            json.dumps(
                {"vms": catalog.vm_names, "backups": catalog.backup_ids, "jobs": catalog.job_ids}
            )
        )
        info["catalog"] = {**catalog.counts, "fill_seconds": round(fill_s, 2)}

        # ------------------------------------------------------------- hub
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        log = work / "hub.log"
        t0 = time.perf_counter()
        hub = start_service(
            [
                "hub",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                "--database-url",
                url,
            ],
            log,
            # Compared: one process per hub, so that neither counts an idle
            # worker's background CPU.
            env={"SENDENSE_API_WORKERS": "1"} if args.compare_with else None,
        )
        wait_healthy(f"{base_url}/api/v1/health", hub, log, timeout=120)
        info["hub_start_seconds"] = round(time.perf_counter() - t0, 2)
        token = (data_dir / "admin.token").read_text().strip()
        say(f"hub pid {hub.pid} at {base_url}, up in {info['hub_start_seconds']}s")

        # A first request per endpoint (not measured): what the hub builds lazily.
        warmup: dict[str, float] = {}
        with httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=args.timeout,
        ) as c:
            rng = random.Random(args.seed)
            ids = {"vms": catalog.vm_names, "backups": catalog.backup_ids, "jobs": catalog.job_ids}
            for name in args.endpoints:
                t0 = time.perf_counter()
                try:
                    c.get(BY_NAME[name].path(rng, ids)).raise_for_status()
                    warmup[name] = round((time.perf_counter() - t0) * 1000, 1)
                except httpx.HTTPError as e:
                    warmup[name] = float("nan")
                    say(f"warm-up {name}: {type(e).__name__}: {e}")
        info["warmup_ms"] = warmup
        say(f"warm-up (ms): {warmup}")

        if args.compare_with is not None:
            other_dir = work / "hub-other"
            other_dir.mkdir()
            for name in ("secret.key", "admin.token"):  # hubs of one catalog share them
                shutil.copy(data_dir / name, other_dir / name)
            other_port = free_port()
            other = start_service(
                [
                    "hub",
                    "serve",
                    "--port",
                    str(other_port),
                    "--data-dir",
                    str(other_dir),
                    "--database-url",
                    url,
                ],
                work / "hub-other.log",
                env={"PYTHONPATH": str(args.compare_with.resolve()), "SENDENSE_API_WORKERS": "1"},
            )
            wait_healthy(
                f"http://127.0.0.1:{other_port}/api/v1/health",
                other,
                work / "hub-other.log",
                timeout=120,
            )
            compared = compare_cpu(
                {"this": (hub, port), "other": (other, other_port)},
                token,
                {"vms": catalog.vm_names, "backups": catalog.backup_ids, "jobs": catalog.job_ids},
                args.endpoints,
                args.seed,
            )

        # ---------------------------------------------------------- clients
        clients = Clients(base_url, token, ids_path)
        seed = args.seed
        for name in args.endpoints if args.compare_with is None else []:
            for n in (1,) if args.one_client else (1, args.clients):
                seed += 1
                cpu0 = cpu_seconds(hub.pid)
                latencies, errors, elapsed = clients.run(name, n, args.seconds, args.timeout, seed)
                phase = phase_of(name, n, latencies, errors, elapsed)
                phase.hub_cpu_s = cpu_seconds(hub.pid) - cpu0
                phase.load1 = os.getloadavg()[0]
                phases.append(phase)
                say(
                    f"{name:<17} x{n:<3} {phase.requests:>6} reqs  p50 {phase.p50:8.1f}  "
                    f"p99 {phase.p99:8.1f} ms  errors {phase.error_count}"
                )
                if hub.poll() is not None:
                    raise RuntimeError(f"the hub exited with {hub.returncode}; see {log}")
        info["hub_log_tail"] = log.read_text(errors="replace")[-4000:]
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if clients is not None:
            clients.stop()
        stop_service(hub)
        stop_service(other)
        if args.database_url and filled:
            try:
                cleanup_db = Database(args.database_url)
                empty_catalog(cleanup_db)
                cleanup_db.dispose()
            except Exception as e:  # never hide the first error
                say(f"could not empty {shown_url}: {e}")
        if db is not None:
            db.dispose()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    last = last_line(phases, args.clients)
    lines = table(phases, args.timeout)
    results = {
        "started_at": stamp.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "params": {
            "vms": size.vms,
            "disks_per_vm": size.disks_per_vm,
            "runs": size.runs,
            "seconds": args.seconds,
            "clients": args.clients,
            "client_processes": CLIENT_PROCESSES,
            "timeout": args.timeout,
            "database": normalize_url(url).get_backend_name(),
            "seed": args.seed,
            "quick": args.quick,
            "one_client": args.one_client,
        },
        "host": {
            "cpus": cpus,
            "loadavg_start": load0,
            "loadavg_end": list(os.getloadavg()),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "note": "hub and client processes share these cpus",
        },
        "git": git_state(),
        **info,
        "endpoints": {e.name: e.shown for e in ENDPOINTS},
        "phases": [
            {
                "endpoint": p.endpoint,
                "clients": p.clients,
                "requests": p.requests,
                "errors": p.errors,
                "elapsed_s": round(p.elapsed, 3),
                "rps": round(p.rps, 1),
                "p50_ms": round(p.p50, 2),
                "p90_ms": round(p.p90, 2),
                "p99_ms": round(p.p99, 2),
                "max_ms": round(p.max, 2),
                "mean_ms": round(p.mean, 2),
                "hub_cpu_s": round(p.hub_cpu_s, 2),
                "load1_end": round(p.load1, 2),
                "target_p99_ms": p.target,
                "meets_target": p.ok,
            }
            for p in phases
        ],
        "last_line": last,
        **({"compare": {"other_src": str(args.compare_with), **compared}} if compared else {}),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"api-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(
        f"catalog {shown_url.split('://')[0]}: {info['catalog']}; "
        + (
            f"{COMPARE_ROUNDS} x {COMPARE_BATCH} requests per endpoint and hub"
            if compared
            else f"{args.seconds:g}s per endpoint and phase; "
            f"{'1 client' if args.one_client else f'1 then {args.clients} clients'} "
            f"in {CLIENT_PROCESSES} processes"
        )
        + f"; hub and clients share {cpus} cpus"
    )
    for line in compare_table(compared, args.compare_with) if compared else lines:
        print(line)
    print(f"results: {out}")
    print(last, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
