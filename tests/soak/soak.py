"""Kill -9 soak: a seeded random loop of actions and faults, with invariants.

Two hub processes on one PostgreSQL catalog (sharing its ``secret.key`` and
the ``default`` repository), two nodes (node a runs one job at a time, so a
second backup there waits in the queue), three qemu-storage-daemon VMs (one
holds a GPT disk with an ext4 filesystem, for restore sessions). A backup
with a fault has, half the time, a second backup in flight (another VM's,
or the same VM's queued behind it). Each iteration:

1. draws an action and a fault from ``Random(f"{seed}:{iteration}")`` (so an
   iteration's draw does not depend on the ones before it): a backup (full,
   incremental or auto), a consolidation, a verify, a delete, a restore
   session with a file download, a whole-disk restore, or a retention apply
   through a policy; and kill -9 of a hub, a node, a qemu-nbd target, a node
   worker or a VM, at a random moment while the action runs; the killed
   process is started again (a hub at once or after its lease ran out);
2. waits until no job is pending or running (bounded);
3. checks the invariants (invariants.py): every completed restore point
   reads byte-identical to its truth image, repository files and records
   match one for one, no qemu-nbd/nbdkit/worker process or NBD port is left,
   no job runs past its lease;
4. writes into every VM and backs each one up: each backup must complete.

Truth images: the soak writes into a VM only while no job of it runs, and
copies the VM's disk (``qemu-img convert``) after each write, so the disk at
any backup job's start is the copy taken last; the job id maps to it.

An action that hit no fault must succeed (a refusal the API documents, such
as 409 ``in_use``, is accepted). One that did may fail, but the invariants
must hold afterwards.

Run: ``make soak`` (SOAK_ITERATIONS, SOAK_SEED) or
``.venv/bin/python tests/soak/soak.py --iterations 5 --seed 7 [--start-at 3]``.
On failure it prints the seed, the failing step and a command that replays it,
and keeps its work directory (logs of every process) unless ``--clean``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: tests/ holds fixtures/ and soak/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from fixtures.cluster import Cluster
from fixtures.disks import PartitionSpec, build_ext4, build_partitioned
from fixtures.processes import processes_under
from sendense.catalog.db import Database
from sendense.qemu import img
from sendense.qemu.qsd import QsdVm
from soak import invariants

MiB = 1 << 20
ACTIONS = (
    "backup",
    "backup",
    "backup",
    "consolidate",
    "verify",
    "delete",
    "restore_file",
    "restore_disk",
    "retention",
)
FAULTS = ("hub", "node", "qemu-nbd", "worker", "vm")
LEASE = 5.0
SETTLE_TIMEOUT = 180.0
JOB_TIMEOUT = 240.0
# Copies slow enough (about 3 s for a full of a 24 MiB disk) that a fault
# lands while data moves.
NODE_ENV = {"SENDENSE_NODE_MAX_RATE": str(8 * MiB), "SENDENSE_NODE_REQUEST_SIZE": str(MiB)}
ENDED = ("completed", "failed", "cancelled")


class SoakFailure(AssertionError):
    pass


class Unavailable(RuntimeError):
    """No hub answered."""


@dataclass
class SoakVm:
    qsd: QsdVm
    node: str  # "a" or "b": the node whose source holds it
    fs: bool = False
    version: int = 0
    truth: Path | None = None
    tree: dict[str, bytes] = field(default_factory=dict)  # fs VM: the files it holds now
    partition_offset: int = 0

    @property
    def name(self) -> str:
        return self.qsd.name


@dataclass
class Step:
    iteration: int
    action: str
    fault: str | None
    rng: random.Random
    notes: list[str] = field(default_factory=list)
    faulted: bool = False

    def describe(self) -> str:
        return f"step {self.iteration}: {self.action}, fault {self.fault or 'none'}" + (
            f" ({'; '.join(self.notes)})" if self.notes else ""
        )


def plan(seed: int, iteration: int, fault_rate: float) -> Step:
    """What iteration ``iteration`` of seed ``seed`` does (independent of the others)."""
    rng = random.Random(f"{seed}:{iteration}")
    fault = rng.choice(FAULTS) if rng.random() < fault_rate else None
    # qemu-nbd targets and workers live only while a backup copies.
    action = "backup" if fault in ("qemu-nbd", "worker") else rng.choice(ACTIONS)
    return Step(iteration, action, fault, rng)


def replay_command(seed: int, iterations: int, step: int | None = None) -> str:
    cmd = f"SOAK_SEED={seed} SOAK_ITERATIONS={iterations} make soak"
    if step is not None:
        cmd += (
            f"   (or only from the failing step: .venv/bin/python tests/soak/soak.py"
            f" --seed {seed} --iterations {iterations} --start-at {step})"
        )
    return cmd


class Soak:
    def __init__(
        self,
        root: Path,
        database_url: str,
        *,
        seed: int,
        iterations: int,
        start_at: int = 0,
        fault_rate: float = 0.8,
        log: Callable[[str], None] = print,
    ) -> None:
        self.root = root
        self.database_url = database_url
        self.seed = seed
        self.iterations = iterations
        self.start_at = start_at
        self.fault_rate = fault_rate
        self.log = log
        env = {"SENDENSE_JOB_LEASE": str(LEASE), "SENDENSE_RESTORE_DIRS": str(root / "restores")}
        self.hubs = {
            name: Cluster(root / name, database_url, hub_env=dict(env), node_env=dict(NODE_ENV))
            for name in ("a", "b")
        }
        self.vms: list[SoakVm] = []
        self.truth_of_job: dict[str, Path] = {}  # backup job id -> truth image at its start
        self.truth_of_backup: dict[str, Path] = {}
        self.trees: dict[Path, dict[str, str]] = {}  # truth image -> fs VM's files (sha256)
        self.policy_id = ""
        self.last_hub = "a"
        self.db: Database | None = None
        self.counts = {"faults": 0, "actions": 0, "backups": 0, "points_checked": 0}
        self.timings: list[float] = []

    # ------------------------------------------------------------ set-up

    def setup(self) -> None:
        (self.root / "restores").mkdir(parents=True, exist_ok=True)
        (self.root / "truth").mkdir(parents=True, exist_ok=True)
        a, b = self.hubs["a"], self.hubs["b"]
        for c in (a, b):
            c.root.mkdir(parents=True, exist_ok=True)
        a.start_node()
        b.start_node()
        a.start_hub()
        # Hubs sharing a catalog share the key that seals its credentials.
        b.hub_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(a.hub_dir / "secret.key", b.hub_dir / "secret.key")
        b.start_hub()
        self.db = Database(self.database_url)
        self._plain_vm("soak-a1", "a", 24 * MiB)
        self._plain_vm("soak-b1", "b", 24 * MiB)
        self._fs_vm("soak-fs", "a")
        for node in ("a", "b"):
            c = self.hubs[node]
            # Node a runs one job at a time: a second backup there is queued.
            limit = {"max_jobs": 1} if node == "a" else {}
            n = self.api("POST", "/api/v1/nodes", json=c.node_body(f"node-{node}", **limit))
            mine = [v for v in self.vms if v.node == node]
            src = self.api(
                "POST",
                "/api/v1/sources",
                json={
                    "name": f"qemu-{node}",
                    "node_id": n["node_id"],
                    "type": "qemu",
                    "config": {
                        "vms": [{"name": v.name, "qmp_socket": v.qsd.qmp_socket} for v in mine]
                    },
                },
            )
            self.api("POST", "/api/v1/vms/discover", json={"source_id": src["source_id"]})
        policy = self.api(
            "POST",
            "/api/v1/policies",
            json={
                "name": "soak-retention",
                "enabled": False,
                "selector": {"vms": [v.name for v in self.vms]},
                "repository_id": "default",
                "schedule": "0 3 * * *",
                "retention": {"keep_last": 4},
            },
        )
        self.policy_id = policy["policy_id"]
        for vm in self.vms:  # every VM starts with a restore point
            self.snapshot(vm)
            self.backup_must_succeed(vm, "full", random.Random(f"{self.seed}:setup"))

    def _plain_vm(self, name: str, node: str, size: int) -> None:
        qsd = QsdVm(self.root / "vms" / name, name)
        qsd.add_disk(size)
        qsd.start()
        vm = SoakVm(qsd, node)
        self.vms.append(vm)
        self.write_plain(vm, random.Random(f"{self.seed}:{name}"), 8 * MiB)

    def _fs_vm(self, name: str, node: str) -> None:
        qsd = QsdVm(self.root / "vms" / name, name)
        vm = SoakVm(qsd, node, fs=True)
        rng = random.Random(f"{self.seed}:{name}")
        vm.tree = {f"file{i}.bin": rng.randbytes(rng.randrange(1, 400_000)) for i in range(4)}
        vm.tree["hello.txt"] = b"hello from the soak\n"
        ext4 = self._build_ext4(vm)
        disk = self.root / "vms" / f"{name}.raw"
        (vm.partition_offset,) = build_partitioned(disk, "gpt", [PartitionSpec(ext4, "linux")])
        qsd.add_disk(disk.stat().st_size)
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(qsd.disks[0])],
            check=True,
            capture_output=True,
        )
        disk.unlink()
        qsd.start()
        self.vms.append(vm)

    def _build_ext4(self, vm: SoakVm) -> Path:
        tree = self.root / "trees" / vm.name
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        for name, data in vm.tree.items():
            (tree / name).write_bytes(data)
        ext4 = self.root / "trees" / f"{vm.name}.ext4"
        build_ext4(ext4, tree, size=16 * MiB)
        return ext4

    # ------------------------------------------------------------- hubs

    def live(self) -> list[Cluster]:
        return [c for c in self.hubs.values() if c.hub is not None and c.hub.poll() is None]

    def api(
        self,
        method: str,
        path: str,
        *,
        ok: tuple[int, ...] = (200, 201, 202, 204),
        via: random.Random | None = None,
        **kw: Any,
    ) -> Any:
        """A call on a live hub (a random one with ``via``), the other one
        when the first does not answer; the body when the status is in ``ok``."""
        r = self.request(method, path, via=via, **kw)
        if r.status_code not in ok:
            raise SoakFailure(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r.json() if r.content else None

    def request(
        self, method: str, path: str, *, via: random.Random | None = None, **kw: Any
    ) -> httpx.Response:
        deadline = time.monotonic() + 60
        while True:
            hubs = self.live()
            if via is not None:
                via.shuffle(hubs)
            for c in hubs:
                try:
                    r = c.http(method, path, **kw)
                except httpx.TransportError:
                    continue
                if method != "GET":
                    self.last_hub = c.root.name  # the one that runs what was asked
                return r
            if time.monotonic() > deadline:
                raise Unavailable(f"no hub answered {method} {path} for 60 s")
            time.sleep(0.5)

    # ------------------------------------------------------- VMs, truth

    def write_plain(self, vm: SoakVm, rng: random.Random, budget: int = 0) -> None:
        """Random writes (64 KiB aligned), flushed as the guest would."""
        size = self._capacity(vm)
        h = vm.qsd.guest(0)
        try:
            written = 0
            count = rng.randint(1, 4)
            while count > 0 or written < budget:
                length = rng.randrange(1, 64) * 64 * 1024
                offset = rng.randrange(0, (size - length) // 65536 + 1) * 65536
                h.pwrite(rng.randbytes(length), offset)
                written += length
                count -= 1
            h.flush()
        finally:
            h.shutdown()

    def _capacity(self, vm: SoakVm) -> int:
        h = vm.qsd.guest(0)
        try:
            return int(h.get_size())
        finally:
            h.shutdown()

    def write_fs(self, vm: SoakVm, rng: random.Random) -> None:
        """Files changed, added and removed: the filesystem rebuilt and written
        over its partition through the guest's NBD export."""
        names = sorted(vm.tree)
        vm.tree[rng.choice(names)] = rng.randbytes(rng.randrange(1, 400_000))
        vm.tree[f"new{vm.version}.bin"] = rng.randbytes(rng.randrange(1, 200_000))
        if len(names) > 4:
            del vm.tree[rng.choice([n for n in names if n != "hello.txt"])]
        ext4 = self._build_ext4(vm)
        h = vm.qsd.guest(0)
        try:
            with ext4.open("rb") as f:
                at = vm.partition_offset
                while chunk := f.read(4 * MiB):
                    h.pwrite(chunk, at)
                    at += len(chunk)
            h.flush()
        finally:
            h.shutdown()

    def write(self, vm: SoakVm, rng: random.Random, budget: int = 0) -> None:
        if vm.fs:
            self.write_fs(vm, rng)
        else:
            self.write_plain(vm, rng, budget)
        self.snapshot(vm)

    def snapshot(self, vm: SoakVm) -> None:
        """The truth image of what the VM's disk holds now."""
        vm.version += 1
        truth = self.root / "truth" / f"{vm.name}-v{vm.version}.qcow2"
        subprocess.run(
            ["qemu-img", "convert", "-U", "-O", "qcow2", str(vm.qsd.disks[0]), str(truth)],
            check=True,
            capture_output=True,
        )
        vm.truth = truth
        if vm.fs:
            self.trees[truth] = {n: hashlib.sha256(d).hexdigest() for n, d in vm.tree.items()}

    def truth_for(self, b: dict[str, Any]) -> Path | None:
        found = self.truth_of_backup.get(b["backup_id"]) or self.truth_of_job.get(b["job_id"])
        if found is not None:
            self.truth_of_backup[b["backup_id"]] = found
        return found

    def vm_by_name(self, name: str) -> SoakVm:
        return next(v for v in self.vms if v.name == name)

    # ------------------------------------------------------------- jobs

    def start_backup(
        self, vm: SoakVm, kind: str, rng: random.Random, *, queue: bool = False
    ) -> str:
        """A backup job; its truth image is the VM's disk now (nothing writes
        into the VM until it ended)."""
        assert vm.truth is not None
        body: dict[str, Any] = {"vm_name": vm.name, "repository_id": "default", "backup_type": kind}
        if queue:
            body["queue"] = True
        job_id = str(self.api("POST", "/api/v1/backups", json=body, via=rng)["job_id"])
        self.truth_of_job[job_id] = vm.truth
        self.counts["backups"] += 1
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.api("GET", f"/api/v1/jobs/{job_id}")
        return result

    def wait_job(self, job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                job: dict[str, Any] = self.api("GET", f"/api/v1/jobs/{job_id}", params={"wait": 1})
            except Unavailable:
                job = {"status": "unknown"}
            if job["status"] in ENDED:
                return job
            if time.monotonic() > deadline:
                raise SoakFailure(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            time.sleep(0.2)

    def wait_running(
        self, job_id: str, rng: random.Random, timeout: float = 30, most: float = 1.5
    ) -> None:
        """Until the job moves data (or has ended), then a random moment more
        (up to ``most`` s)."""
        want_bytes = rng.random() < 0.5
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in ENDED or (
                job["status"] == "running" and (not want_bytes or job["bytes_done"] > 0)
            ):
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0, most))

    def backup_must_succeed(self, vm: SoakVm, kind: str, rng: random.Random) -> dict[str, Any]:
        job_id = self.start_backup(vm, kind, rng)
        job = self.wait_job(job_id)
        if job["status"] != "completed":
            raise SoakFailure(
                f"backup of {vm.name} ({kind}) job {job_id} ended {job['status']}: {job['error']}"
            )
        return job

    def completed_backups(self, vm_name: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {"status": "completed", "limit": 1000}
        if vm_name:
            params["vm_name"] = vm_name
        while True:
            page = self.api("GET", "/api/v1/backups", params={**params, "offset": len(out)})
            out += page["backups"]
            if len(out) >= page["total"] or not page["backups"]:
                return out

    def all_backups(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = self.api("GET", "/api/v1/backups", params={"limit": 1000, "offset": len(out)})
            out += page["backups"]
            if len(out) >= page["total"] or not page["backups"]:
                return out

    # ----------------------------------------------------------- faults

    def inject(self, step: Step, vm: SoakVm | None) -> None:
        """kill -9 what the step says, and start it again."""
        if step.fault is None or step.faulted:
            return
        step.faulted = True
        rng = step.rng
        if step.fault == "hub":
            # Mostly the hub that took the action (it owns the job).
            name = self.last_hub if rng.random() < 0.7 else rng.choice(sorted(self.hubs))
            c = self.hubs[name]
            c.kill("hub")
            wait = rng.random() < 0.5
            step.notes.append(
                f"killed hub {name}" + (", restarted after its lease" if wait else "")
            )
            if wait:
                time.sleep(LEASE + 1)
            c.start_hub()
        elif step.fault == "node":
            name = vm.node if vm is not None and rng.random() < 0.7 else rng.choice("ab")
            c = self.hubs[name]
            c.kill("node")
            step.notes.append(f"killed node {name}")
            c.start_node()
        elif step.fault == "vm":
            target = vm or rng.choice(self.vms)
            target.qsd.kill()
            step.notes.append(f"killed VM {target.name}")
            target.qsd.start()
        else:
            needle = "qemu-nbd" if step.fault == "qemu-nbd" else "sendense.node.worker"
            found = sorted(p for p in processes_under(self.root) if needle in p[1])
            if step.fault == "worker":  # the one copying (a node keeps a spare too)
                found = [p for p in found if p[0] in self.job_workers()] or found
            if not found:
                step.notes.append(f"no {step.fault} process to kill")
                return
            pid, _ = rng.choice(found)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            step.notes.append(f"killed {step.fault} pid {pid}")
        self.counts["faults"] += 1

    def job_workers(self) -> set[int]:
        """Pids of the workers that hold a job (``<node data>/jobs/<id>/pid``)."""
        pids = set()
        for c in self.hubs.values():
            for pid_file in (c.node_dir / "jobs").glob("*/pid"):
                with contextlib.suppress(OSError, ValueError):
                    pids.add(int(pid_file.read_text().strip()))
        return pids

    # ---------------------------------------------------------- actions

    def expect(self, step: Step, ok: bool, what: str) -> None:
        """A step that hit no fault must do what it says."""
        if not ok and not step.faulted:
            raise SoakFailure(f"{what} (no fault injected)")
        if step.faulted:
            step.notes.append(f"then {what}")

    def act(self, step: Step) -> None:
        getattr(self, f"act_{step.action}")(step)
        self.inject(step, None)  # an action that ended before its fault
        self.counts["actions"] += 1

    def act_backup(self, step: Step) -> None:
        rng = step.rng
        vm = rng.choice(self.vms)
        long_copy = step.fault is not None
        kind = "full" if long_copy and rng.random() < 0.6 else rng.choice(["incremental", "auto"])
        self.write(vm, rng, budget=16 * MiB if long_copy else 0)
        job_id = self.start_backup(vm, kind, rng)
        step.notes.append(f"{kind} of {vm.name}, job {job_id}")
        jobs = [job_id]
        companion = rng.random() if long_copy else 1.0
        if companion < 0.5:  # a second VM's backup in flight too (queued on node a)
            other = rng.choice([v for v in self.vms if v is not vm])
            self.write(other, rng, budget=8 * MiB)
            jobs.append(self.start_backup(other, "auto", rng))
            step.notes.append(f"auto of {other.name}, job {jobs[-1]}")
        elif companion < 0.75:  # the same VM again, queued behind the first
            jobs.append(self.start_backup(vm, "auto", rng, queue=True))
            step.notes.append(f"queued auto of {vm.name}, job {jobs[-1]}")
        if step.fault:
            self.wait_running(job_id, rng)
            self.inject(step, vm)
        for one in jobs:
            job = self.wait_job(one)
            self.expect(
                step, job["status"] == "completed", f"backup ended {job['status']}: {job['error']}"
            )

    def _pick_point(self, step: Step, vm: SoakVm | None = None) -> dict[str, Any] | None:
        points = self.completed_backups(vm.name if vm else None)
        if not points:
            step.notes.append("no restore point to use")
            return None
        return step.rng.choice(sorted(points, key=lambda b: b["backup_id"]))

    def act_consolidate(self, step: Step) -> None:
        vm = step.rng.choice(self.vms)
        keep = step.rng.randint(1, 2)
        r = self.request(
            "POST",
            "/api/v1/backups/consolidate",
            json={"vm_name": vm.name, "keep": keep},
            via=step.rng,
        )
        if r.status_code == 409:
            step.notes.append(f"consolidate {vm.name}: 409 {r.json()['error']}")
            return
        if r.status_code != 202:
            raise SoakFailure(f"consolidate {vm.name} keep {keep}: {r.status_code} {r.text[:300]}")
        job_id = r.json()["job_id"]
        step.notes.append(f"consolidate {vm.name} keep {keep}, job {job_id}")
        if step.fault:
            self.wait_running(job_id, step.rng, timeout=5, most=0.5)
            self.inject(step, vm)
        job = self.wait_job(job_id)
        self.expect(
            step, job["status"] == "completed", f"consolidate {job['status']}: {job['error']}"
        )

    def act_verify(self, step: Step) -> None:
        point = self._pick_point(step)
        if point is None:
            return
        r = self.request("POST", f"/api/v1/backups/{point['backup_id']}/verify", via=step.rng)
        if r.status_code == 409:
            step.notes.append(f"verify: 409 {r.json()['error']}")
            return
        if r.status_code != 202:
            raise SoakFailure(f"verify {point['backup_id']}: {r.status_code} {r.text[:300]}")
        job_id = r.json()["job_id"]
        step.notes.append(f"verify {point['backup_id']}, job {job_id}")
        if step.fault:
            self.wait_running(job_id, step.rng, timeout=5, most=0.5)
            self.inject(step, self.vm_by_name(point["vm_name"]))
        job = self.wait_job(job_id)
        self.expect(step, job["status"] == "completed", f"verify {job['status']}: {job['error']}")
        if job["status"] == "completed":
            b = self.request("GET", f"/api/v1/backups/{point['backup_id']}")
            if b.status_code == 200 and b.json()["verify_status"] != "ok":
                raise SoakFailure(f"verify of an intact restore point said {b.json()}")

    def act_delete(self, step: Step) -> None:
        point = self._pick_point(step)
        if point is None:
            return
        vm = self.vm_by_name(point["vm_name"])
        path = f"/api/v1/backups/{point['backup_id']}"
        if step.fault == "hub":
            # kill -9 of the hub while it deletes (files, then records).
            victim = step.rng.choice(sorted(self.hubs))
            answer: list[Any] = []

            def delete() -> None:
                try:
                    answer.append(
                        self.hubs[victim].http("DELETE", path, params={"cascade": "true"})
                    )
                except httpx.TransportError as e:
                    answer.append(e)

            worker = threading.Thread(target=delete)
            worker.start()
            time.sleep(step.rng.uniform(0, 0.3))
            self.last_hub = victim
            self.inject(step, vm)
            worker.join()
            got = answer[0]
            step.notes.append(
                f"delete {point['backup_id']} (cascade) on hub {victim}: "
                + (str(got.status_code) if isinstance(got, httpx.Response) else type(got).__name__)
            )
            return
        if step.fault:
            self.inject(step, vm)  # the delete right after a fault elsewhere
        r = self.request("DELETE", path, params={"cascade": "true"})
        step.notes.append(f"delete {point['backup_id']} (cascade): {r.status_code}")
        if r.status_code not in (200, 409):
            self.expect(step, False, f"delete answered {r.status_code} {r.text[:300]}")

    def act_restore_file(self, step: Step) -> None:
        vm = next(v for v in self.vms if v.fs)
        point = self._pick_point(step, vm)
        if point is None:
            return
        truth = self.truth_for(point)
        r = self.request("POST", "/api/v1/restore/mounts", json={"backup_id": point["backup_id"]})
        if r.status_code != 201:
            self.expect(step, r.status_code == 409, f"open session: {r.status_code} {r.text[:300]}")
            return
        mid = r.json()["mount_id"]
        step.notes.append(f"session {mid} on {point['backup_id']}")
        try:
            if step.fault:
                self.inject(step, vm)
            files = self.request(
                "GET", f"/api/v1/restore/mounts/{mid}/files", params={"path": "/", "partition": 1}
            )
            if files.status_code != 200:
                self.expect(step, False, f"listing: {files.status_code} {files.text[:300]}")
                return
            listed = sorted(e["name"] for e in files.json()["entries"] if e["type"] == "file")
            want = self.trees.get(truth) if truth else None
            if want is not None and listed != sorted(want):
                raise SoakFailure(f"session {mid}: files {listed}, the VM held {sorted(want)}")
            name = step.rng.choice(listed)
            got = self.request(
                "GET",
                f"/api/v1/restore/mounts/{mid}/download",
                params={"path": f"/{name}", "partition": 1},
            )
            if got.status_code != 200:
                self.expect(step, False, f"download: {got.status_code} {got.text[:300]}")
                return
            if want is not None and hashlib.sha256(got.content).hexdigest() != want[name]:
                raise SoakFailure(f"session {mid}: /{name} differs from what the VM held")
            step.notes.append(f"downloaded /{name}")
        finally:
            self.request("DELETE", f"/api/v1/restore/mounts/{mid}")

    def act_restore_disk(self, step: Step) -> None:
        point = self._pick_point(step)
        if point is None:
            return
        dest = self.root / "restores" / f"{uuid.uuid4().hex[:8]}.qcow2"
        r = self.request(
            "POST",
            "/api/v1/restores",
            json={
                "backup_id": point["backup_id"],
                "destination": {"type": "file", "path": str(dest)},
            },
            via=step.rng,
        )
        if r.status_code != 202:
            self.expect(step, r.status_code == 409, f"restore: {r.status_code} {r.text[:300]}")
            return
        job_id = r.json()["job_id"]
        step.notes.append(f"restore {point['backup_id']}, job {job_id}")
        if step.fault:
            self.wait_running(job_id, step.rng, timeout=5, most=0.5)
            self.inject(step, self.vm_by_name(point["vm_name"]))
        job = self.wait_job(job_id)
        self.expect(step, job["status"] == "completed", f"restore {job['status']}: {job['error']}")
        truth = self.truth_for(point)
        if (
            job["status"] == "completed"
            and truth is not None
            and not img.compare(str(dest), str(truth))
        ):
            raise SoakFailure(f"restored {point['backup_id']} into {dest}: differs from {truth}")
        if job["status"] == "completed":
            dest.unlink()  # what a failed one leaves is for the invariants

    def act_retention(self, step: Step) -> None:
        r = self.request("POST", f"/api/v1/policies/{self.policy_id}/retention/apply", via=step.rng)
        if r.status_code == 409:
            step.notes.append(f"retention: 409 {r.json()['error']}")
            return
        if r.status_code != 202:
            raise SoakFailure(f"retention apply: {r.status_code} {r.text[:300]}")
        job_ids = r.json()["job_ids"]
        step.notes.append(f"retention jobs {job_ids}")
        if step.fault:
            if job_ids:
                self.wait_running(job_ids[0], step.rng, timeout=5, most=0.3)
            self.inject(step, None)
        for job_id in job_ids:
            job = self.wait_job(job_id)
            self.expect(
                step, job["status"] == "completed", f"retention {job['status']}: {job['error']}"
            )

    # ------------------------------------------------------- invariants

    def settle(self) -> None:
        """Until no job is pending or running (or the bound passes)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            busy = [
                j
                for status in ("pending", "running")
                for j in self.api("GET", "/api/v1/jobs", params={"status": status, "limit": 100})[
                    "jobs"
                ]
            ]
            if not busy:
                return
            if time.monotonic() > deadline:
                left = [(j["job_id"], j["kind"], j["status"], j["step"]) for j in busy]
                raise SoakFailure(f"did not settle in {SETTLE_TIMEOUT:.0f} s: {left}")
            time.sleep(0.5)

    def check(self) -> list[str]:
        assert self.db is not None
        try:
            self.settle()
        except SoakFailure as e:
            return [str(e), *invariants.lease_problems(self.db)]
        backups = self.all_backups()
        repo = self.hubs["a"].hub_dir / "repositories" / "default"
        problems = invariants.restore_point_problems(backups, self.truth_for)
        problems += invariants.repository_problems(repo, backups)
        problems += invariants.restore_dir_problems(self.root / "restores")
        deadline = time.monotonic() + 15  # processes end shortly after their job
        while True:
            nodes = [c.node.pid for c in self.hubs.values() if c.node and c.node.poll() is None]
            leaks = invariants.process_problems(self.root, nodes) + invariants.port_problems(
                (c.nbd_first, c.nbd_last) for c in self.hubs.values()
            )
            if not leaks or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        problems += leaks
        problems += invariants.lease_problems(self.db)
        self.counts["points_checked"] += sum(b["status"] == "completed" for b in backups)
        self._prune_truth(backups)
        return problems

    def _prune_truth(self, backups: list[dict[str, Any]]) -> None:
        """Truth images no restore point and no VM needs any more (nothing runs now)."""
        needed = {self.truth_for(b) for b in backups} | {v.truth for v in self.vms}
        for path in (self.root / "truth").iterdir():
            if path not in needed:
                path.unlink()
                self.trees.pop(path, None)

    # ------------------------------------------------------------- loop

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.log(
            f"soak: seed {self.seed}, iterations {self.start_at}..{self.iterations - 1}, "
            f"work dir {self.root}"
        )
        self.setup()
        problems = self.check()
        if problems:
            self.fail("set-up", problems, None)
        for i in range(self.start_at, self.iterations):
            step = plan(self.seed, i, self.fault_rate)
            t0 = time.monotonic()
            try:
                self.act(step)
                problems = self.check()
                if not problems:
                    for vm in self.vms:  # the next backup of every VM succeeds
                        self.write(vm, step.rng)
                        self.backup_must_succeed(vm, "auto", step.rng)
            except (SoakFailure, Unavailable) as e:
                problems = [str(e)]
            self.timings.append(time.monotonic() - t0)
            self.log(
                f"soak {i + 1}/{self.iterations} ({self.timings[-1]:.1f} s): {step.describe()}"
                + (" FAILED" if problems else " ok")
            )
            if problems:
                self.fail(step.describe(), problems, i)
        problems = self.check()
        if problems:
            self.fail("final check", problems, None)
        total = time.monotonic() - started
        mean = sum(self.timings) / max(1, len(self.timings))
        summary = {
            "soak_iterations": len(self.timings),
            "soak_seed": self.seed,
            **{f"soak_{k}": v for k, v in self.counts.items()},
            "soak_seconds": round(total, 1),
            "soak_seconds_per_iteration": round(mean, 1),
        }
        self.log(" ".join(f"{k}={v}" for k, v in summary.items()))
        return summary

    def fail(self, where: str, problems: list[str], iteration: int | None) -> None:
        lines = [
            f"SOAK FAILED: seed {self.seed}, {where}",
            *(f"  - {p}" for p in problems),
            f"  logs: {self.root}/{{a,b}}/hub.log, {self.root}/{{a,b}}/node.log",
            f"  replay: {replay_command(self.seed, self.iterations, iteration)}",
        ]
        raise SoakFailure("\n".join(lines))

    def teardown(self) -> None:
        for c in self.hubs.values():
            with contextlib.suppress(Exception):
                c.stop()
        for vm in self.vms:
            with contextlib.suppress(Exception):
                vm.qsd.stop()
        # Whatever a kill left behind (the leak check has reported it already).
        invariants_left = processes_under(self.root)
        for pid, _ in invariants_left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.db is not None:
            self.db.dispose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iterations", type=int, default=int(os.environ.get("SOAK_ITERATIONS") or 100))
    p.add_argument(
        "--seed", type=int, default=int(os.environ.get("SOAK_SEED") or random.randrange(1 << 31))
    )
    p.add_argument("--start-at", type=int, default=0, help="skip the iterations before this one")
    p.add_argument("--fault-rate", type=float, default=0.8, help="share of iterations with a fault")
    p.add_argument("--workdir", type=Path, default=None, help="kept; default: a temporary one")
    p.add_argument("--clean", action="store_true", help="remove the work directory even on failure")
    args = p.parse_args(argv)
    if args.iterations < 1 or not 0 <= args.start_at < args.iterations:
        p.error("--iterations must be >= 1 and 0 <= --start-at < --iterations")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="sendense-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    from pgserver import PgCluster, PgServer

    external = os.environ.get("SENDENSE_TEST_PG_URL")
    server: PgCluster = PgCluster(external) if external else PgServer()
    if isinstance(server, PgServer):
        server.start()
    dbname = f"soak_{uuid.uuid4().hex[:10]}"
    soak = Soak(
        root,
        server.create_database(dbname),
        seed=args.seed,
        iterations=args.iterations,
        start_at=args.start_at,
        fault_rate=args.fault_rate,
        log=lambda line: print(line, flush=True),
    )
    ok = False
    try:
        soak.run()
        ok = True
    except SoakFailure as e:
        print(e, flush=True)
    except BaseException:
        print(
            f"SOAK FAILED: seed {args.seed} (an error of the soak itself)\n"
            f"  replay: {replay_command(args.seed, args.iterations)}",
            flush=True,
        )
        raise
    finally:
        soak.teardown()
        with contextlib.suppress(Exception):
            server.drop_database(dbname)
        if isinstance(server, PgServer):
            server.stop()
        if (ok or args.clean) and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
