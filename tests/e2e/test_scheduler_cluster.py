"""The scheduler inside real hub processes, on the real clock.

A policy is written into the hub's catalog (as POST /policies would) with a
one-minute schedule and a creation time just before the last minute
boundary: it is due at once, and the hubs tick every second
(``SENDENSE_SCHEDULER_INTERVAL=1``). The tests disable the policy as soon as
its first run is claimed, so nothing else starts behind them.

- one hub: the run takes a full backup (tagged with the policy and run),
  verifies it (``verify_after``) and applies retention (``keep_last: 1``
  removes the older manual restore point), and the run ends ``completed``;
- two hub processes on one PostgreSQL catalog, both scheduling: each
  scheduled run is claimed once, and one job is started, not two.
"""

from __future__ import annotations

import itertools
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from fixtures.cluster import Cluster
from sendense.catalog.db import Database, sqlite_url
from sendense.catalog.models import BackupJob, Policy, PolicyRun, PolicyRunVm, Vm
from sendense.qemu import img

MiB = 1 << 20
SCHEDULER = {"SENDENSE_SCHEDULER_INTERVAL": "1"}


def catalog(c: Cluster) -> Database:
    return Database(c.database_url or sqlite_url(c.hub_dir / "catalog.db"))


def due_now() -> datetime:
    """A creation time one second before the last minute boundary: a
    ``* * * * *`` policy created then is due now, for that boundary only."""
    now = datetime.now(UTC)
    if now.second >= 50:  # do not race the next boundary
        time.sleep(61 - now.second)
        now = datetime.now(UTC)
    return now.replace(second=0, microsecond=0) - timedelta(seconds=1)


def add_policy(db: Database, name: str, vms: list[str], **fields: Any) -> str:
    with db.session() as s:
        p = Policy(
            name=name,
            selector={"vms": vms},
            repository_id="default",
            schedule="* * * * *",
            created_at=fields.pop("created_at", None) or due_now(),
            **fields,
        )
        s.add(p)
        s.flush()
        return p.id


def wait_for(what: str, check: Any, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def runs(db: Database, policy_id: str) -> list[PolicyRun]:
    with db.session() as s:
        return list(s.scalars(select(PolicyRun).where(PolicyRun.policy_id == policy_id)))


def disable(db: Database, *policy_ids: str) -> None:
    with db.session() as s:
        s.execute(update(Policy).where(Policy.id.in_(policy_ids)).values(enabled=False))


def jobs_of_vm(db: Database, vm_name: str, kind: str = "backup") -> list[BackupJob]:
    with db.session() as s:
        return list(
            s.scalars(
                select(BackupJob)
                .join(Vm, Vm.id == BackupJob.vm_id)
                .where(Vm.name == vm_name, BackupJob.kind == kind)
                .order_by(BackupJob.created_at)
            )
        )


def test_a_scheduled_run_backs_up_verifies_and_applies_retention(tmp_path: Path, make_vm) -> None:  # type: ignore[no-untyped-def]
    c = Cluster(tmp_path, hub_env=SCHEDULER)
    c.start_node()
    c.start_hub()
    db = catalog(c)
    try:
        vm = make_vm("sched1", [16 * MiB])
        c.register(vm)
        manual = c.backup("sched1", "full")
        pid = add_policy(
            db, "every-minute", ["sched1"], verify_after=True, retention={"keep_last": 1}
        )
        [run] = wait_for("the run to be claimed", lambda: runs(db, pid), timeout=30)
        disable(db, pid)
        assert run.trigger == "schedule" and run.missed_count == 0
        done = wait_for(
            "the run to end",
            lambda: [r for r in runs(db, pid) if r.status != "running"],
            timeout=120,
        )
        assert [r.id for r in done] == [run.id]
        assert done[0].status == "completed", done[0].summary
        entry = done[0].summary["vms"]["sched1"]
        job = c.client.get(f"/api/v1/jobs/{entry['backup_job_id']}")
        assert job["status"] == "completed"
        assert job["tags"]["policy_id"] == pid and job["tags"]["trigger"] == "schedule"
        assert job["tags"]["policy_run_id"] == run.id
        (bid,) = job["backups"]
        backup = c.client.get(f"/api/v1/backups/{bid}")
        assert backup["backup_type"] == "full"  # the VM's first run under the policy
        assert img.compare(backup["file_path"], str(vm.disks[0]))
        [verify_id] = entry["verify_job_ids"]
        verify = c.client.get(f"/api/v1/jobs/{verify_id}")
        assert verify["status"] == "completed"
        assert c.client.get(f"/api/v1/backups/{bid}")["verify_status"] == "ok"
        retention = c.client.get(f"/api/v1/jobs/{entry['retention_job_id']}")
        assert retention["status"] == "completed" and retention["kind"] == "retention"
        # The follow-up jobs say which policy and run they belong to, as the
        # backup job does (policy-scoped webhooks hear of them).
        for follow_up in (verify, retention):
            assert follow_up["tags"]["policy_id"] == pid, follow_up["tags"]
            assert follow_up["tags"]["policy_run_id"] == run.id
        # keep_last 1: the manual restore point went, the new one stays.
        left = c.client.get("/api/v1/backups", vm_name="sched1")["backups"]
        assert [b["backup_id"] for b in left] == [bid]
        (old,) = manual["backups"]
        assert c.http("GET", f"/api/v1/backups/{old}").status_code == 404
        with db.session() as s:
            [item] = s.scalars(select(PolicyRunVm).where(PolicyRunVm.run_id == run.id))
        assert item.status == "done" and entry["retention_job_id"] in (item.reason or "")
        assert "policy run claimed" in c.log("hub")
    finally:
        db.dispose()
        c.stop()


def test_runs_missed_while_the_hub_was_down_run_once_and_say_so(tmp_path: Path, make_vm) -> None:  # type: ignore[no-untyped-def]
    c = Cluster(tmp_path, hub_env=SCHEDULER)
    c.start_node()
    c.start_hub()
    db = catalog(c)
    try:
        vm = make_vm("miss1", [16 * MiB])
        c.register(vm)
        c.kill("hub", signal.SIGTERM)
        # Created three minutes before the last boundary while the hub was
        # down: four one-minute runs are due, the newest runs, 3 were missed.
        boundary = due_now() + timedelta(seconds=1)
        pid = add_policy(
            db, "missed", ["miss1"], created_at=boundary - timedelta(minutes=3, seconds=1)
        )
        c.start_hub()
        [run] = wait_for("the catch-up run", lambda: runs(db, pid), timeout=30)
        disable(db, pid)
        assert (run.trigger, run.missed_count) == ("missed", 3)
        assert run.scheduled_at == boundary
        [job] = jobs_of_vm(db, "miss1")
        assert c.wait_job(job.id)["status"] == "completed"
        tags = c.client.get(f"/api/v1/jobs/{job.id}")["tags"]
        assert tags["trigger"] == "missed" and tags["missed_runs"] == "3"
        assert tags["first_missed"] == (boundary - timedelta(minutes=3)).isoformat()
        audit = c.client.get("/api/v1/audit", route="scheduler")["entries"]
        assert [
            (e["token_name"], e["target"]["run_id"], e["target"]["missed_count"]) for e in audit
        ] == [("scheduler", run.id, "3")]
        time.sleep(2)  # more ticks: still the one run
        assert len(runs(db, pid)) == 1 and len(jobs_of_vm(db, "miss1")) == 1
        wait_for("the run to end", lambda: runs(db, pid)[0].status == "completed", 30)
    finally:
        db.dispose()
        c.stop()


def test_node_limit_queues_in_the_catalog_and_the_scheduler_starts_the_rest(
    tmp_path: Path, make_vm
) -> None:  # type: ignore[no-untyped-def]
    c = Cluster(tmp_path, hub_env={**SCHEDULER, "SENDENSE_SCHEDULER_NODE_LIMIT": "1"})
    c.start_node()
    c.start_hub()
    db = catalog(c)
    try:
        vms = [make_vm(f"lim{i}", [16 * MiB]) for i in range(3)]
        c.register(*vms)
        pid = add_policy(
            db, "limited", ["lim0", "lim1", "lim2"], enabled=False, created_at=datetime.now(UTC)
        )
        answer = c.client.post(f"/api/v1/policies/{pid}/run")
        assert len(answer["job_ids"]) == 1 and answer["queued"] == ["lim1", "lim2"], answer
        # The scheduler (not the request) starts the others, one at a time.
        wait_for(
            "every VM's job",
            lambda: all(jobs_of_vm(db, f"lim{i}") for i in range(3)),
            timeout=120,
        )
        jobs = sorted(
            (j for i in range(3) for j in jobs_of_vm(db, f"lim{i}")), key=lambda j: j.created_at
        )
        assert len(jobs) == 3
        done = [c.wait_job(j.id) for j in jobs]
        assert [j["status"] for j in done] == ["completed"] * 3
        for before, after in itertools.pairwise(done):  # never two at once on the node
            assert before["finished_at"] <= after["created_at"], (before, after)
        wait_for("the run to end", lambda: runs(db, pid)[0].status == "completed", 30)
    finally:
        db.dispose()
        c.stop()


@pytest.fixture
def two_hubs(pg_server, tmp_path: Path) -> Iterator[tuple[Cluster, Cluster]]:  # type: ignore[no-untyped-def]
    """Hub A with the node, hub B on the same PostgreSQL catalog; both schedule."""
    url = str(pg_server.create_database(f"sched_{uuid.uuid4().hex[:10]}"))
    a = Cluster(tmp_path / "a", url, hub_env=SCHEDULER)
    b = Cluster(tmp_path / "b", url, hub_env=SCHEDULER)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a.start_node()
    a.start_hub()
    b.hub_dir.mkdir(parents=True)
    shutil.copy2(a.hub_dir / "secret.key", b.hub_dir / "secret.key")
    b.start_hub()
    try:
        yield a, b
    finally:
        b.stop()
        a.stop()


@pytest.mark.postgres
def test_two_hubs_on_one_catalog_start_a_scheduled_run_once(
    two_hubs: tuple[Cluster, Cluster], make_vm
) -> None:  # type: ignore[no-untyped-def]
    a, b = two_hubs
    vm = make_vm("shared1", [16 * MiB])
    a.register(vm)
    db = catalog(a)
    try:
        created = due_now()
        # One policy with a VM, and sixty matching none: 61 claims raced
        # by two hubs (each API process pair has one scheduler).
        pid = add_policy(db, "every-minute", ["shared1"], created_at=created)
        others = [add_policy(db, f"empty-{i}", ["nothing"], created_at=created) for i in range(60)]
        wait_for("every policy's run", lambda: all(runs(db, p) for p in [pid, *others]), 30)
        disable(db, pid, *others)
        time.sleep(3)  # both hubs tick again with the policies' old state gone
        for p in [pid, *others]:
            assert len(runs(db, p)) == 1, p
        [run] = runs(db, pid)
        claimers = {r.claimed_by for p in [pid, *others] for r in runs(db, p)}
        [job] = jobs_of_vm(db, "shared1")
        assert job.tags["policy_run_id"] == run.id
        finished = a.wait_job(job.id, timeout=90)
        assert finished["status"] == "completed", finished
        wait_for("the run to end", lambda: runs(db, pid)[0].status == "completed", 30)
        assert len(jobs_of_vm(db, "shared1")) == 1
        logs = a.log("hub") + b.log("hub")
        assert logs.count("policy run claimed policy_id=" + pid) == 1
        print(f"claims by: {sorted(map(str, claimers))}")
    finally:
        db.dispose()
