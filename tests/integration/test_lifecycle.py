"""The job lifecycle on a real catalog (SQLite and PostgreSQL): owners,
leases, conditional status writes, cancel across processes, local jobs.

Two `JobLifecycle` objects with different owners stand for two hub processes
sharing one catalog (the e2e test with two real hub processes is in
tests/e2e/test_two_hubs.py).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from sendense.catalog.db import Database
from sendense.catalog.models import (
    Backup,
    BackupHold,
    BackupJob,
    Node,
    Repository,
    Source,
    Vm,
    VmDisk,
)
from sendense.core.errors import Cancelled, InvalidRequest
from sendense.engine.lifecycle import JobContext, JobLifecycle, owner_is_dead


class SleepJob:
    """A local job kind for these tests: waits for a release, honours cancel."""

    kind = "sleep"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.recovered: list[str] = []
        self.ended: list[tuple[str, str]] = []

    def execute(self, job_id: str, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        ctx.progress("sleeping", done=0, total=1, force=True)
        while not self.release.wait(0.05):
            ctx.check_cancel()
        if params.get("fail"):
            raise InvalidRequest("asked to fail")
        return {"slept": True}

    def recover(self, job_id: str, params: dict[str, Any]) -> None:
        self.recovered.append(job_id)

    def on_end(self, job_id: str, params: dict[str, Any], status: str) -> None:
        self.ended.append((job_id, status))


def wait_status(db: Database, job_id: str, want: str, timeout: float = 10) -> BackupJob:
    deadline = time.monotonic() + timeout
    while True:
        with db.session() as s:
            job = s.get(BackupJob, job_id)
            assert job is not None
            if job.status == want:
                return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} is {job.status}, not {want}")
        time.sleep(0.05)


def make_backup(db: Database) -> str:
    """A completed restore point to hold (rows only: holds are catalog state)."""
    with db.session() as s:
        node = Node(name="n", url="http://127.0.0.1:1", token_encrypted="x")
        s.add(node)
        s.flush()
        src = Source(name="s", node_id=node.id, type="qemu", config={})
        repo = Repository(id="r", name="r", path="/nonexistent")
        s.add_all([src, repo])
        s.flush()
        vm = Vm(name="vm", source_id=src.id, path="/x")
        s.add(vm)
        s.flush()
        disk = VmDisk(vm_id=vm.id, disk_index=0, disk_key=2000, label="d", capacity_bytes=1,
                      size_gb=0.0)  # fmt: skip
        s.add(disk)
        s.flush()
        job = BackupJob(vm_id=vm.id, repository_id="r", node_id=node.id, status="completed",
                        requested_type="full")  # fmt: skip
        s.add(job)
        s.flush()
        b = Backup(job_id=job.id, vm_id=vm.id, vm_disk_id=disk.id, disk_index=0, disk_key=2000,
                   repository_id="r", backup_type="full", status="completed", file_path="/x",
                   nbd_export_name="")  # fmt: skip
        s.add(b)
        s.flush()
        return b.id


@pytest.fixture
def two_hubs(database: Database) -> tuple[JobLifecycle, JobLifecycle, SleepJob, SleepJob]:
    a, b = JobLifecycle(database, lease_seconds=30), JobLifecycle(database, lease_seconds=30)
    ka, kb = SleepJob(), SleepJob()
    a.register(ka)
    b.register(kb)
    yield a, b, ka, kb
    ka.release.set()
    kb.release.set()
    a.shutdown()
    b.shutdown()


def new_job(lc: JobLifecycle, params: dict[str, Any] | None = None, holds: list[str] = []) -> str:  # noqa: B006
    with lc.db.session() as s:
        return lc.new_local_job(s, "sleep", params or {}, holds=holds).id


def test_local_job_runs_to_completion_and_drops_its_holds(two_hubs: Any) -> None:
    a, _, ka, _ = two_hubs
    backup_id = make_backup(a.db)
    job_id = new_job(a, holds=[backup_id])
    with a.db.session() as s:
        assert s.scalar(select(BackupHold.backup_id).where(BackupHold.holder_id == job_id))
    a.launch(job_id)
    wait_status(a.db, job_id, "running")
    ka.release.set()
    job = wait_status(a.db, job_id, "completed")
    assert job.result == {"slept": True} and job.finished_at is not None
    with a.db.session() as s:
        assert s.scalars(select(BackupHold).where(BackupHold.holder_id == job_id)).all() == []
    assert ka.ended == [(job_id, "completed")]


def test_failed_job_keeps_code_and_message(two_hubs: Any) -> None:
    a, _, ka, _ = two_hubs
    job_id = new_job(a, {"fail": True})
    ka.release.set()
    a.launch(job_id)
    job = wait_status(a.db, job_id, "failed")
    assert (job.error_code, job.error_message) == ("invalid_request", "asked to fail")


def test_cancelled_job_never_becomes_running_again(two_hubs: Any) -> None:
    a, _, _, _ = two_hubs
    job_id = new_job(a)
    assert a.transition(job_id, "cancelled", allowed_from=("pending",))
    assert not a.transition(job_id, "running", allowed_from=("pending",))
    a.launch(job_id)  # a launch after the cancel runs nothing
    time.sleep(0.3)
    job = wait_status(a.db, job_id, "cancelled")
    assert job.started_at is None


def test_cancel_asked_through_another_hub_stops_the_owners_job(two_hubs: Any) -> None:
    a, b, _, _ = two_hubs
    job_id = new_job(a)
    a.launch(job_id)
    wait_status(a.db, job_id, "running")
    # Hub B cannot end A's job itself ...
    assert not b.transition(job_id, "cancelled")
    assert wait_status(a.db, job_id, "running")
    # ... but its request reaches A's runner through the catalog.
    assert b.request_cancel(job_id)
    job = wait_status(a.db, job_id, "cancelled")
    assert job.error_code == Cancelled.code


def test_a_live_lease_is_never_taken_over(two_hubs: Any) -> None:
    a, b, _, _ = two_hubs
    job_id = new_job(a)
    a.launch(job_id)
    wait_status(a.db, job_id, "running")
    # Same host, our own pid: A's owner is alive and its lease is fresh.
    assert not owner_is_dead(a.owner)
    assert job_id not in [j for j, _, _ in b.orphans()]
    assert b.recover_local() == []
    assert wait_status(a.db, job_id, "running").owner == a.owner


def test_an_expired_lease_is_taken_over_once_and_the_old_owner_loses(two_hubs: Any) -> None:
    a, b, _, kb = two_hubs
    job_id = new_job(a)
    with a.db.session() as s:
        s.execute(
            update(BackupJob)
            .where(BackupJob.id == job_id)
            .values(status="running", lease_until=datetime.now(UTC) - timedelta(seconds=1))
        )
    c = JobLifecycle(a.db)
    orphans = b.orphans()
    assert [(j, k) for j, k, _ in orphans] == [(job_id, "sleep")]
    old = orphans[0][2]
    results = [b.take_over(job_id, old), c.take_over(job_id, old)]
    assert results == [True, False]  # one winner
    # B recovers it: its kind repairs, then the job fails with the reason.
    with a.db.session() as s:
        s.execute(
            update(BackupJob)
            .where(BackupJob.id == job_id)
            .values(lease_until=datetime.now(UTC) - timedelta(seconds=1), owner=a.owner)
        )
    assert b.recover_local() == [job_id]
    assert kb.recovered == [job_id]
    job = wait_status(a.db, job_id, "failed")
    assert job.error_code == "hub_restarted" and job.owner == b.owner
    # The old owner's late writes do not land.
    assert not a.transition(job_id, "completed")
    assert wait_status(a.db, job_id, "failed")


def test_a_dead_owner_on_this_host_is_recognised() -> None:
    import socket

    assert owner_is_dead(None)
    assert owner_is_dead(f"{socket.gethostname()}/999999999/abcd")
    assert not owner_is_dead("another-host/1/abcd")  # only its lease can tell


def test_renew_extends_only_our_active_leases(two_hubs: Any) -> None:
    a, b, _, _ = two_hubs
    mine, theirs = new_job(a), new_job(b)
    past = datetime.now(UTC) - timedelta(seconds=5)
    with a.db.session() as s:
        s.execute(update(BackupJob).values(lease_until=past))
    assert a.renew() == 1
    with a.db.session() as s:
        leases = dict(s.execute(select(BackupJob.id, BackupJob.lease_until)).all())
    assert leases[mine] > datetime.now(UTC) and leases[theirs] < datetime.now(UTC)


def test_async_wait_wakes_on_the_end_of_a_job_run_here(two_hubs: Any) -> None:
    import asyncio

    a, _, ka, _ = two_hubs
    job_id = new_job(a)
    a.launch(job_id)
    wait_status(a.db, job_id, "running")

    async def waiter() -> float:
        t0 = time.monotonic()
        threading.Timer(0.2, ka.release.set).start()
        await a.wait_ended_async(job_id, 10)
        return time.monotonic() - t0

    took = asyncio.run(waiter())
    assert took < 5
    wait_status(a.db, job_id, "completed")
