"""The queue of backup jobs on a real catalog (SQLite and PostgreSQL): the
per-node count and limit, the atomic claim, the fair order across VMs,
cancel of a queued job, recovery leaving queued jobs alone, and the
scheduler's old setting standing in for the new one.

Rows are written as `BackupEngine.start` writes them (engine/dispatch.py
`new_queued_job` for queued ones); nothing is launched here: the e2e tests
(tests/e2e/test_dispatch_*.py) run real hubs and nodes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from sendense.catalog.db import Database
from sendense.catalog.models import (
    BackupJob,
    Node,
    Policy,
    PolicyRun,
    PolicyRunVm,
    Repository,
    Source,
    Vm,
)
from sendense.engine import dispatch
from sendense.engine.lifecycle import JobLifecycle
from sendense.settings import HubSettings

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


@dataclass
class Settings:
    node_job_limit: int = 1


class World:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.settings = Settings()
        with db.session() as s:
            node = Node(name="node1", url="http://node1", token_encrypted="x")
            s.add(node)
            s.flush()
            self.node_id = node.id
            source = Source(name="src1", node_id=node.id, type="qemu")
            s.add(source)
            s.flush()
            self.source_id = source.id
            repo = Repository(name="repo1", path="/srv")
            s.add(repo)
            s.flush()
            self.repository_id = repo.id
        self.vms: dict[str, str] = {}

    def vm(self, name: str) -> str:
        if name not in self.vms:
            with self.db.session() as s:
                vm = Vm(name=name, source_id=self.source_id, path=f"/run/{name}")
                s.add(vm)
                s.flush()
                self.vms[name] = vm.id
        return self.vms[name]

    def queue(self, vm: str, at: datetime) -> str:
        with self.db.session() as s:
            job = dispatch.new_queued_job(
                s,
                vm_id=self.vm(vm),
                repository_id=self.repository_id,
                node_id=self.node_id,
                requested_type="full",
                disk_id=None,
                tags={},
                created_by="alice",
                reason="waiting for node node1: 1 of 1 jobs running",
            )
            job.created_at = at
            return job.id

    def running(self, vm: str, owner: str = "other-hub", started: datetime = T0) -> str:
        with self.db.session() as s:
            job = BackupJob(
                vm_id=self.vm(vm),
                node_id=self.node_id,
                status="running",
                step="copying",
                requested_type="full",
                owner=owner,
                lease_until=datetime.now(UTC) + timedelta(minutes=5),
                created_at=started,
                started_at=started,
            )
            s.add(job)
            s.flush()
            return job.id

    def end(self, job_id: str, started: datetime | None = None) -> None:
        values: dict[str, Any] = {"status": "completed", "finished_at": datetime.now(UTC)}
        if started is not None:
            values["started_at"] = started
        with self.db.session() as s:
            s.execute(update(BackupJob).where(BackupJob.id == job_id).values(**values))

    def job(self, job_id: str) -> BackupJob:
        with self.db.session() as s:
            job = s.get(BackupJob, job_id)
            assert job is not None
            return job

    def claim(self, lifecycle: JobLifecycle) -> str | None:
        got = dispatch.claim(self.db, lifecycle, self.node_id, self.settings)
        return got[0] if got else None


@pytest.fixture
def world(database: Database) -> World:
    return World(database)


def hub(world: World, name: str) -> JobLifecycle:
    return JobLifecycle(world.db, owner=f"{name}/1/x")


def test_a_queued_job_has_no_owner_and_takes_no_slot(world: World) -> None:
    world.running("a")
    job_id = world.queue("b", T0)
    job = world.job(job_id)
    assert (job.status, job.step, job.owner, job.lease_until) == ("pending", "queued", None, None)
    assert job.params["queue"]["reason"] == "waiting for node node1: 1 of 1 jobs running"
    assert job.messages == {"hub": ["queued: waiting for node node1: 1 of 1 jobs running"]}
    with world.db.session() as s:
        assert dispatch.occupied(s, world.node_id) == 1
        assert dispatch.node_full(s, world.node_id, world.settings) == (
            "waiting for node node1: 1 of 1 jobs running"
        )
    assert dispatch.queued_nodes(world.db) == [world.node_id]


def test_no_claim_while_the_node_is_full_then_one_claim_per_free_slot(world: World) -> None:
    running = world.running("a")
    first, second = world.queue("b", T0), world.queue("c", T0 + timedelta(seconds=1))
    one = hub(world, "one")
    assert world.claim(one) is None
    world.end(running)
    assert world.claim(one) == first
    job = world.job(first)
    assert job.owner == one.owner and job.lease_until is not None and job.step == "claimed"
    assert world.claim(one) is None  # the claimed job holds the only slot
    world.settings.node_job_limit = 2
    assert world.claim(one) == second


def test_node_max_jobs_overrides_the_hub_default(world: World) -> None:
    world.settings.node_job_limit = 4
    with world.db.session() as s:
        s.execute(update(Node).where(Node.id == world.node_id).values(max_jobs=1))
    world.running("a")
    world.queue("b", T0)
    assert world.claim(hub(world, "one")) is None
    with world.db.session() as s:
        assert dispatch.limit_of(s, world.node_id, world.settings) == 1
        s.execute(update(Node).where(Node.id == world.node_id).values(max_jobs=None))
        assert dispatch.limit_of(s, world.node_id, world.settings) == 4
    assert world.claim(hub(world, "one")) is not None


def test_a_policy_item_being_started_holds_a_slot(world: World) -> None:
    world.queue("b", T0)
    vm_a = world.vm("a")
    with world.db.session() as s:
        policy = Policy(
            name="p1", repository_id=world.repository_id, selector={}, schedule="0 * * * *"
        )
        s.add(policy)
        s.flush()
        run = PolicyRun(policy_id=policy.id, scheduled_at=T0, trigger="manual", status="running")
        s.add(run)
        s.flush()
        s.add(
            PolicyRunVm(
                run_id=run.id,
                policy_id=policy.id,
                vm_id=vm_a,
                node_id=world.node_id,
                status="starting",
            )
        )
    assert world.claim(hub(world, "one")) is None


def test_fair_order_a_vm_with_five_requests_does_not_delay_another_vm(world: World) -> None:
    """Five requests for VM a, then one for VM b: when a's first job ends, b
    goes next (a's last backup started more recently than b's, never),
    then a's others one at a time (one job per VM)."""
    world.settings.node_job_limit = 1
    lc = hub(world, "one")
    a_jobs = [world.queue("a", T0 + timedelta(seconds=i)) for i in range(5)]
    b_job = world.queue("b", T0 + timedelta(seconds=10))
    order = []
    started = T0 + timedelta(minutes=1)
    while (job_id := world.claim(lc)) is not None:
        order.append(job_id)
        started += timedelta(minutes=1)
        world.end(job_id, started=started)
    assert order == [a_jobs[0], b_job, *a_jobs[1:]]


def test_fair_order_oldest_last_backup_first(world: World) -> None:
    world.settings.node_job_limit = 1
    world.end(world.running("recent", started=T0 + timedelta(hours=2)))
    world.end(world.running("old", started=T0 + timedelta(hours=1)))
    recent = world.queue("recent", T0)  # asked first
    old = world.queue("old", T0 + timedelta(seconds=5))
    never = world.queue("never", T0 + timedelta(seconds=9))
    lc = hub(world, "one")
    order = []
    while (job_id := world.claim(lc)) is not None:
        order.append(job_id)
        world.end(job_id)
    assert order == [never, old, recent]


def test_a_vm_with_a_running_job_is_passed_over(world: World) -> None:
    world.settings.node_job_limit = 2
    busy = world.running("a")
    a_next = world.queue("a", T0)
    b_next = world.queue("b", T0 + timedelta(seconds=1))
    lc = hub(world, "one")
    assert world.claim(lc) == b_next
    world.end(busy)
    assert world.claim(lc) == a_next


def test_two_hubs_racing_claim_each_job_once(world: World) -> None:
    world.settings.node_job_limit = 0  # no limit: only the claim itself decides
    jobs = {world.queue(f"vm{i}", T0 + timedelta(seconds=i)) for i in range(12)}
    hubs = [hub(world, "one"), hub(world, "two"), hub(world, "three")]
    claimed: dict[str, list[str]] = {h.owner: [] for h in hubs}
    barrier = threading.Barrier(len(hubs))

    def run(lc: JobLifecycle) -> None:
        barrier.wait()
        while (job_id := world.claim(lc)) is not None:
            claimed[lc.owner].append(job_id)

    threads = [threading.Thread(target=run, args=(h,)) for h in hubs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [j for ids in claimed.values() for j in ids]
    assert sorted(every) == sorted(jobs)  # each exactly once
    for owner, ids in claimed.items():
        for job_id in ids:
            assert world.job(job_id).owner == owner
    print({owner.split("/")[0]: len(ids) for owner, ids in claimed.items()})


def test_cancel_of_a_queued_job_and_a_claim_racing_it(world: World) -> None:
    world.running("a")
    job_id = world.queue("b", T0)
    lc = hub(world, "one")
    assert dispatch.cancel_queued(world.db, lc, job_id) is True
    job = world.job(job_id)
    assert (job.status, job.step, job.error_code) == ("cancelled", "cancelled", "cancelled")
    assert job.finished_at is not None and job.owner is None
    assert dispatch.cancel_queued(world.db, lc, job_id) is False  # once
    assert dispatch.queued_nodes(world.db) == []
    # A claimed job is no longer cancelled here (its owner cancels it).
    other = world.queue("c", T0)
    with world.db.session() as s:
        s.execute(update(BackupJob).where(BackupJob.status == "running").values(status="failed"))
    assert world.claim(lc) == other
    assert dispatch.cancel_queued(world.db, lc, other) is False


def test_recovery_leaves_queued_jobs_alone_and_another_hub_claims_them(world: World) -> None:
    dead = hub(world, "dead")
    world.queue("a", T0)  # asked on the hub that then died: no owner anyway
    claimed = world.running("b", owner=dead.owner)
    with world.db.session() as s:  # the dead hub's lease ran out
        s.execute(
            update(BackupJob)
            .where(BackupJob.id == claimed)
            .values(lease_until=datetime.now(UTC) - timedelta(seconds=1))
        )
    alive = hub(world, "alive")
    assert [job_id for job_id, _, _ in alive.orphans()] == [claimed]
    assert alive.recover_local() == []  # backups are the engine's; queued ones nobody's
    world.end(claimed)
    got = world.claim(alive)
    assert got is not None and world.job(got).owner == alive.owner


def test_the_schedulers_old_setting_stands_in_for_the_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SENDENSE_NODE_JOB_LIMIT", raising=False)
    monkeypatch.delenv("SENDENSE_SCHEDULER_NODE_LIMIT", raising=False)
    assert dispatch.default_limit(HubSettings()) == 4
    monkeypatch.setenv("SENDENSE_SCHEDULER_NODE_LIMIT", "1")
    assert dispatch.default_limit(HubSettings()) == 1
    monkeypatch.setenv("SENDENSE_NODE_JOB_LIMIT", "3")
    assert dispatch.default_limit(HubSettings()) == 3
    monkeypatch.setenv("SENDENSE_NODE_JOB_LIMIT", "0")
    assert dispatch.default_limit(HubSettings()) == 0


def test_orphans_ignore_only_queued_jobs(world: World) -> None:
    """A pending job with an owner whose lease expired is still an orphan."""
    job_id = world.queue("a", T0)
    lc = hub(world, "one")
    assert world.claim(lc) == job_id
    with world.db.session() as s:
        s.execute(
            update(BackupJob)
            .where(BackupJob.id == job_id)
            .values(lease_until=datetime.now(UTC) - timedelta(seconds=1))
        )
        kinds = s.scalars(select(BackupJob.step).where(BackupJob.id == job_id)).all()
    assert kinds == ["claimed"]
    assert [j for j, _, _ in hub(world, "two").orphans()] == [job_id]


def test_a_claim_whose_hub_died_before_planning_goes_back_to_the_queue(world: World) -> None:
    world.settings.node_job_limit = 1
    job_id = world.queue("a", T0)
    dead = hub(world, "dead")
    assert world.claim(dead) == job_id
    with world.db.session() as s:  # the claimer died: its lease runs out
        s.execute(
            update(BackupJob)
            .where(BackupJob.id == job_id)
            .values(lease_until=datetime.now(UTC) - timedelta(seconds=1))
        )
    alive = hub(world, "alive")
    [(orphan, _, old)] = alive.orphans()
    assert orphan == job_id and alive.take_over(job_id, old)
    assert world.claim(alive) is None  # taken over: it holds the slot
    assert dispatch.requeue_unplanned(world.db, alive, job_id)
    job = world.job(job_id)
    assert (job.status, job.step, job.owner, job.lease_until) == ("pending", "queued", None, None)
    assert job.messages["hub"][-1].startswith("queued again")
    assert alive.orphans() == []
    assert world.claim(alive) == job_id
    # A job that was never queued, or already planned, is not requeued.
    assert not dispatch.requeue_unplanned(world.db, alive, world.running("b", owner=alive.owner))


def test_a_vm_being_consolidated_keeps_its_queued_backup_waiting(world: World) -> None:
    world.settings.node_job_limit = 4
    with world.db.session() as s:
        merge = BackupJob(
            kind="consolidate",
            vm_id=world.vm("a"),
            status="running",
            requested_type="consolidate",
            owner="other-hub/1/x",
            lease_until=datetime.now(UTC) + timedelta(minutes=5),
        )
        s.add(merge)
        s.flush()
        merge_id = merge.id
    queued = world.queue("a", T0)
    lc = hub(world, "one")
    assert world.claim(lc) is None  # the merge holds the chain
    with world.db.session() as s:
        assert dispatch.occupied(s, world.node_id) == 0  # a merge takes no backup slot
    world.end(merge_id)
    assert world.claim(lc) == queued
