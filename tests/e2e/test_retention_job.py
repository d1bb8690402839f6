"""Retention on real chains: plan from the catalog, execute as a ``retention`` job.

The backups are made by a real hub and node; the plan comes from
`engine.retention.plan_for_vm` on the hub's catalog and the job runs in this
process (`RetentionJob` through its own `JobLifecycle`, an owner on another
"host" so the hub never adopts it), as the policies' scheduler will run it in
the hub. Before anything is removed every restore point is copied to a raw
file (``qemu-img convert -O raw``); afterwards every kept point must
``qemu-img compare`` identical to its copy, its digest must equal the digest
of that copy, and what was removed must be gone from the API and the disk.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select

from fixtures.cluster import Cluster
from fixtures.lifecycle import (
    MiB,
    by_disk,
    catalog_exec,
    catalog_url,
    cluster_env,
    error_body,
    lifecycle_cluster,
    point_files,
    raw_copy,
    reference_digest,
    repo_files,
    wait_for,
    write_random,
)
from sendense.catalog.db import Database
from sendense.catalog.models import Backup, Vm
from sendense.engine.lifecycle import JobLifecycle
from sendense.engine.retention import (
    RetentionJob,
    apply_for_vm,
    new_retention_job,
    plan_for_vm,
    plan_for_vms,
)
from sendense.qemu import img
from sendense.storage import immutability


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


class Runner:
    """Plans and runs retention jobs on the cluster's catalog, in this process."""

    def __init__(self, c: Cluster) -> None:
        self.db = Database(catalog_url(c))
        self.lifecycle = JobLifecycle(self.db, owner=f"retention-test-host/1/{id(self):x}")
        st = SimpleNamespace(
            db=self.db, lifecycle=self.lifecycle, settings=SimpleNamespace(merge_rate=0)
        )
        self.lifecycle.register(RetentionJob(st))  # type: ignore[arg-type]
        self.lifecycle.start_renewing()

    def vm_id(self, name: str) -> str:
        with self.db.session() as s:
            return str(s.scalars(select(Vm.id).where(Vm.name == name)).one())

    def plan(self, vm: str, rules: dict[str, int], **kw: Any) -> dict[str, Any]:
        with self.db.session() as s:
            return plan_for_vm(s, self.vm_id(vm), rules, **kw)

    def run(self, c: Cluster, plan: dict[str, Any]) -> dict[str, Any]:
        with self.db.session() as s:
            job_id = new_retention_job(self, s, plan, created_by="test").id  # type: ignore[arg-type]
        self.lifecycle.launch(job_id)
        job = c.wait_job(job_id)
        t = self.lifecycle._threads.get(job_id)
        if t is not None:
            t.join(10)
        return job

    def close(self) -> None:
        self.lifecycle.shutdown()
        self.db.dispose()


@pytest.fixture
def runner(cluster: Cluster) -> Iterator[Runner]:
    r = Runner(cluster)
    yield r
    r.close()


def take(
    c: Cluster, vm: Any, name: str, kinds: list[str], tmp_path: Path, repository_id: str = "default"
) -> list[dict[str, Any]]:
    """One backup per kind (disk 0), each after new writes; a raw copy of each."""
    points = []
    for i, kind in enumerate(kinds):
        write_random(vm, 0, (i * 3 * MiB) % (6 * MiB), MiB)
        started = c.start_backup(name, kind, repository_id=repository_id)
        job = c.wait_job(started["job_id"])
        assert job["status"] == "completed", job
        b = by_disk(c, job)[0]
        raw_copy(b["file_path"], tmp_path / f"{b['backup_id']}.raw")
        points.append(b)
        time.sleep(0.01)  # distinct created_at even on a coarse clock
    return points


def assert_reads_as_before(c: Cluster, point: dict[str, Any], tmp_path: Path) -> None:
    raw = tmp_path / f"{point['backup_id']}.raw"
    now = c.client.get(f"/api/v1/backups/{point['backup_id']}")
    assert img.compare(now["file_path"], str(raw)), now
    assert now["digest"] == point["digest"] == reference_digest(raw)
    assert img.check(now["file_path"])["check-errors"] == 0


def assert_gone(c: Cluster, point: dict[str, Any]) -> None:
    error_body(c.http("GET", f"/api/v1/backups/{point['backup_id']}"), 404)
    assert not any(f.exists() for f in point_files(point["file_path"]))


def disk0(plan: dict[str, Any]) -> dict[str, Any]:
    (d,) = plan["disks"]
    assert d["disk_id"] == 0
    return d


@pytest.mark.parametrize(
    "cluster", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_keep_last_two_deletes_an_old_chain_and_merges_the_current_one(
    cluster: Cluster, runner: Runner, make_vm, tmp_path: Path
) -> None:
    vm = make_vm("ret1", [8 * MiB])
    cluster.register(vm)
    kinds = [
        "full",
        "incremental",
        "incremental",
        "full",
        "incremental",
        "incremental",
        "incremental",
    ]
    p = take(cluster, vm, "ret1", kinds, tmp_path)
    ids = [b["backup_id"] for b in p]

    files_before = repo_files(cluster)
    plan = runner.plan("ret1", {"keep_last": 2})
    d = disk0(plan)
    assert [k["backup_id"] for k in d["keep"]] == [ids[6], ids[5]]
    assert all(k["reasons"] == [f"last #{i + 1}"] for i, k in enumerate(d["keep"]))
    assert [(r["backup_id"], r["action"]) for r in d["remove"]] == [
        (ids[4], "consolidate"),
        (ids[3], "consolidate"),
        (ids[2], "delete"),
        (ids[1], "delete"),
        (ids[0], "delete"),
    ]
    assert {r.get("into") for r in d["remove"][:2]} == {ids[5]}
    assert d["locked"] == []
    assert repo_files(cluster) == files_before  # the plan is a dry run

    job = runner.run(cluster, plan)
    assert job["status"] == "completed", job
    assert job["kind"] == "retention"
    assert sorted(job["backups"]) == sorted(ids[:5])  # what it removes
    result = job["result"]
    assert result["removed"] == 5 and result["failed"] == 0
    assert result["freed_bytes"] > 0
    assert {x["backup_id"]: x["status"] for x in result["points"]} == dict.fromkeys(ids[:5], "done")

    chain = cluster.client.get("/api/v1/backups/ret1/chain")["disks"][0]
    assert [x["backup_id"] for x in chain["chain"]] == [ids[5], ids[6]]
    base = cluster.client.get(f"/api/v1/backups/{ids[5]}")
    assert base["parent_backup_id"] is None and base["synthetic"] is True
    assert base["backup_type"] == "full"
    assert "backing-filename" not in img.info(base["file_path"])
    for b in p[5:]:
        assert_reads_as_before(cluster, b, tmp_path)
    for b in p[:5]:
        assert_gone(cluster, b)
    assert cluster.client.get("/api/v1/backups", vm_name="ret1")["total"] == 2

    # planning again removes nothing (and applying starts no job); the chain goes on
    again = disk0(runner.plan("ret1", {"keep_last": 2}))
    assert again["remove"] == [] and again["locked"] == []
    vm_id = runner.vm_id("ret1")
    assert apply_for_vm(runner, vm_id, {"keep_last": 2}) is None  # type: ignore[arg-type]
    with runner.db.session() as s:
        many = plan_for_vms(s, [vm_id], {"keep_last": 1}, timezone="Europe/Berlin")
    assert [v["vm_name"] for v in many["vms"]] == ["ret1"]
    assert many["vms"][0]["timezone"] == "Europe/Berlin"
    assert [r["backup_id"] for r in disk0(many["vms"][0])["remove"]] == [ids[5]]
    write_random(vm, 0, 0, MiB)
    nxt = by_disk(cluster, cluster.backup("ret1", "incremental"))[0]
    assert nxt["parent_backup_id"] == ids[6]
    assert img.compare(nxt["file_path"], str(vm.disks[0]))


@cluster_env(hub={"SENDENSE_LOCK_SWEEP_INTERVAL": "1"})
def test_immutable_repository_merges_only_expired_layers(
    cluster: Cluster, runner: Runner, make_vm, tmp_path: Path
) -> None:
    where = tmp_path / "vault"
    vm = make_vm("ret2", [8 * MiB])
    cluster.register(vm)
    try:
        r = cluster.http(
            "POST",
            "/api/v1/repositories",
            json={"name": "vault", "path": str(where), "immutable": True, "retention_days": 7},
        )
        assert r.status_code == 201, r.text
        rid = r.json()["repository_id"]
        kinds = ["full", "incremental", "incremental", "incremental", "incremental"]
        p = take(cluster, vm, "ret2", kinds, tmp_path, repository_id=rid)
        ids = [b["backup_id"] for b in p]
        for b in p:
            assert immutability.is_locked(b["file_path"]), b  # every layer locked
        # the three oldest layers' locks have expired; the two newest are live
        past = datetime.now(UTC) - timedelta(hours=1)
        for backup_id in ids[:3]:
            catalog_exec(
                cluster,
                "UPDATE backups SET immutable_until = :t WHERE id = :id",
                t=past,
                id=backup_id,
            )

        plan = runner.plan("ret2", {"keep_last": 1}, repository_id=rid)
        d = disk0(plan)
        # p3 is not kept by the rules but locked: kept and reported. p0, p1
        # merge into p2 (expired, the newest layer that may be rewritten),
        # which stays as the base p3 reads through.
        assert [x["backup_id"] for x in d["locked"]] == [ids[3]]
        assert "immutable until" in d["locked"][0]["reason"]
        assert d["locked"][0]["immutable_until"] is not None
        keep = {k["backup_id"]: k["reasons"] for k in d["keep"]}
        assert set(keep) == {ids[4], ids[2]}
        assert ids[3] in keep[ids[2]][0]
        assert [(x["backup_id"], x["action"], x.get("into")) for x in d["remove"]] == [
            (ids[1], "consolidate", ids[2]),
            (ids[0], "consolidate", ids[2]),
        ]

        job = runner.run(cluster, plan)
        assert job["status"] == "completed", job
        assert job["result"]["removed"] == 2

        chain = cluster.client.get("/api/v1/backups/ret2/chain")["disks"][0]
        assert [x["backup_id"] for x in chain["chain"]] == ids[2:]
        base = cluster.client.get(f"/api/v1/backups/{ids[2]}")
        assert base["synthetic"] is True and base["parent_backup_id"] is None
        for b in p[2:]:
            assert_reads_as_before(cluster, b, tmp_path)
        for b in p[3:]:  # the locked layers were not touched, and are still locked
            assert immutability.is_locked(b["file_path"]), b
        for b in p[:2]:
            assert_gone(cluster, b)

        # nothing more can go until the locks expire
        again = disk0(runner.plan("ret2", {"keep_last": 1}, repository_id=rid))
        assert again["remove"] == [] and [x["backup_id"] for x in again["locked"]] == [ids[3]]
    finally:
        subprocess.run(["chattr", "-R", "-i", str(where)], capture_output=True)


def test_a_failed_step_is_recorded_and_fails_the_job(
    cluster: Cluster, runner: Runner, make_vm, tmp_path: Path
) -> None:
    vm = make_vm("ret3", [8 * MiB])
    cluster.register(vm)
    p = take(cluster, vm, "ret3", ["full", "incremental", "full", "incremental"], tmp_path)
    ids = [b["backup_id"] for b in p]
    plan = runner.plan("ret3", {"keep_last": 2})
    d = disk0(plan)
    assert [(r["backup_id"], r["action"]) for r in d["remove"]] == [
        (ids[1], "delete"),
        (ids[0], "delete"),
    ]
    # after the plan, a lock appears on the newest of the two: its delete is
    # refused, so is the delete of the full it reads through
    until = datetime.now(UTC) + timedelta(days=1)
    catalog_exec(
        cluster, "UPDATE backups SET immutable_until = :t WHERE id = :id", t=until, id=ids[1]
    )
    job = runner.run(cluster, plan)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "retention_incomplete"
    assert ids[1] in job["error"]["message"]
    points = {x["backup_id"]: x for x in job["result"]["points"]}
    assert points[ids[1]]["status"] == "failed" and points[ids[1]]["error"] == "immutable"
    assert points[ids[0]]["status"] == "failed" and points[ids[0]]["error"] == "has_dependents"
    for b in p:
        assert_reads_as_before(cluster, b, tmp_path)


RULE_SETS = [
    {"keep_last": 2},
    {"keep_last": 1, "keep_daily": 3},
    {"keep_last": 1, "keep_weekly": 2},
    {"keep_last": 2, "keep_monthly": 2},
    {"keep_daily": 2, "keep_hourly": 1},
]


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [4, 7])
def test_random_histories_keep_every_kept_point_readable_and_locks_untouched(
    cluster: Cluster, runner: Runner, make_vm, tmp_path: Path, seed: int
) -> None:
    """Random backups (fulls now and then), random locks, retention after each
    backup with random rules: every point that stays reads as at its backup,
    nothing locked is touched, what the plan removes is gone."""
    rng = random.Random(seed)
    name = f"rnd{seed}"
    vm = make_vm(name, [4 * MiB])
    cluster.register(vm)
    now = datetime.now(UTC)
    t = now - timedelta(days=200)
    points: dict[str, dict[str, Any]] = {}
    actions: Counter[str] = Counter()
    for i in range(12):
        write_random(vm, 0, rng.randrange(0, 4 * MiB - 256 * 1024, 65536), 256 * 1024)
        kind = "full" if i == 0 or rng.random() < 0.25 else "incremental"
        b = by_disk(cluster, cluster.backup(name, kind))[0]
        raw_copy(b["file_path"], tmp_path / f"{b['backup_id']}.raw")
        # spread the history over months, so the time rules have buckets
        t += timedelta(hours=rng.choice([1, 7, 25, 24 * 9]))
        lock = rng.choice([None, None, None, None, "live", "expired"])
        until = {None: None, "live": now + timedelta(days=1), "expired": now - timedelta(hours=1)}
        catalog_exec(
            cluster,
            "UPDATE backups SET created_at = :t, immutable_until = :u WHERE id = :id",
            t=t,
            u=until[lock],
            id=b["backup_id"],
        )
        points[b["backup_id"]] = b
        rules = rng.choice(RULE_SETS)
        plan = runner.plan(name, rules)
        d = disk0(plan)
        removed = {r["backup_id"] for r in d["remove"]}
        staying = {k["backup_id"] for k in d["keep"]} | {x["backup_id"] for x in d["locked"]}
        assert staying | removed == set(points)
        assert b["backup_id"] in staying  # the newest is always kept
        with runner.db.session() as s:
            live_locks = set(
                s.scalars(select(Backup.id).where(Backup.immutable_until > datetime.now(UTC)))
            )
        assert not live_locks & removed
        before = {pid: sha256(points[pid]["file_path"]) for pid in live_locks & set(points)}

        job = runner.run(cluster, plan)
        assert job["status"] == "completed", (rules, plan, job)
        actions.update(r["action"] for r in d["remove"])
        actions["locked"] += len(d["locked"])
        for pid in removed:
            assert_gone(cluster, points.pop(pid))
        for pid in staying:
            assert_reads_as_before(cluster, points[pid], tmp_path)
        for pid, digest in before.items():
            assert sha256(points[pid]["file_path"]) == digest, f"locked {pid} was touched"
        again = disk0(runner.plan(name, rules))
        assert again["remove"] == [], again
    # the history exercised every kind of outcome
    assert actions["delete"] and actions["consolidate"] and actions["locked"], actions
    # the chain still goes on from the newest point
    write_random(vm, 0, 0, 65536)
    nxt = by_disk(cluster, cluster.backup(name, "incremental"))[0]
    assert img.compare(nxt["file_path"], str(vm.disks[0]))


CRASHING_RUNNER = """
import sys, time
from types import SimpleNamespace
from sendense.catalog.db import Database
from sendense.engine.lifecycle import JobLifecycle
from sendense.engine.retention import RetentionJob

db = Database(sys.argv[1])
lifecycle = JobLifecycle(db, lease_seconds=2, owner=sys.argv[3])
st = SimpleNamespace(db=db, lifecycle=lifecycle, settings=SimpleNamespace(merge_rate=2 << 20))
lifecycle.register(RetentionJob(st))
lifecycle.start_renewing()
lifecycle.launch(sys.argv[2])
time.sleep(300)
"""


def test_a_retention_job_killed_mid_merge_is_rolled_forward(
    cluster: Cluster, runner: Runner, make_vm, tmp_path: Path
) -> None:
    """The process running the job dies during the merge (kill -9); the hub
    (or any other) adopts the job when its lease expires and rolls the merge
    forward: the kept point reads as before, the merged ones are gone."""
    vm = make_vm("ret4", [32 * MiB])
    cluster.register(vm)
    p = []
    for i in range(5):  # four increments of 6 MiB: at 2 MiB/s the merge takes ~10 s
        write_random(vm, 0, (i * 6 * MiB) % (26 * MiB), 6 * MiB)
        b = by_disk(cluster, cluster.backup("ret4", "full" if i == 0 else "incremental"))[0]
        raw_copy(b["file_path"], tmp_path / f"{b['backup_id']}.raw")
        p.append(b)
    plan = runner.plan("ret4", {"keep_last": 1})
    assert [r["action"] for r in disk0(plan)["remove"]] == ["consolidate"] * 4

    owner = "retention-test-host/2/crash"
    other = JobLifecycle(runner.db, lease_seconds=2, owner=owner)
    st = SimpleNamespace(db=runner.db, lifecycle=other, settings=SimpleNamespace(merge_rate=0))
    other.register(RetentionJob(st))  # type: ignore[arg-type]
    with runner.db.session() as s:
        job_id = new_retention_job(st, s, plan, created_by="test").id  # type: ignore[arg-type]
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_RUNNER, catalog_url(cluster), job_id, owner],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "runner.log").open("wb"),
    )
    try:
        wait_for(
            "the merge to be under way",
            lambda: cluster.client.get(f"/api/v1/jobs/{job_id}")["result"].get("started_disks"),
        )
        time.sleep(1.0)
    finally:
        proc.kill()
        proc.wait(10)
    assert not [x for x in os.popen("pgrep -a qemu-img").read().splitlines() if str(tmp_path) in x]
    assert "backing-filename" in img.info(p[4]["file_path"])  # killed mid-merge

    time.sleep(2.5)  # the lease expires; adopt it here (or the hub does)
    runner.lifecycle.recover_local()
    job = cluster.wait_job(job_id, timeout=60)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "hub_restarted"
    assert "consistent" in job["error"]["message"]
    chain = cluster.client.get("/api/v1/backups/ret4/chain")["disks"][0]
    assert [x["backup_id"] for x in chain["chain"]] == [p[4]["backup_id"]]
    assert chain["chain"][0]["synthetic"] is True
    assert_reads_as_before(cluster, p[4], tmp_path)
    for b in p[:4]:
        assert_gone(cluster, b)
