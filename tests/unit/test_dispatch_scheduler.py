"""The scheduler and the queue follow one rule (engine/dispatch.py): a node's
``max_jobs`` or the hub's default, counting every backup on the node, from a
policy or not. On a real catalog (SQLite and PostgreSQL), with the
scheduler's test world (fake engine, test_scheduler_queue).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update
from test_scheduler_queue import World

from sendense.catalog.db import Database
from sendense.catalog.models import BackupJob, Node, PolicyRunVm
from sendense.engine import dispatch
from sendense.engine.lifecycle import JobLifecycle
from sendense.scheduler import run_policy_now
from sendense.scheduler.runs import drain

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


@dataclass
class Settings:
    """The hub's settings as they are now: the new limit only."""

    node_job_limit: int = 4
    scheduler: bool = True
    scheduler_interval: float = 10.0


@pytest.fixture
def world(database: Database) -> World:
    w = World(database)
    w.settings = Settings()  # type: ignore[assignment]
    return w


def api_job(world: World, vm_id: str) -> str:
    """A backup started through the API (no policy), running on node1."""
    with world.db.session() as s:
        job = BackupJob(
            vm_id=vm_id,
            node_id=world.nodes["node1"],
            status="running",
            requested_type="full",
            owner="hub/1/x",
        )
        s.add(job)
        s.flush()
        return job.id


def test_api_jobs_count_against_the_policy_limit(world: World) -> None:
    for name in ("a", "b"):
        world.vm(name, tags={"tier": "gold"})
    manual = world.vm("manual")
    with world.db.session() as s:
        s.execute(update(Node).values(max_jobs=2))
    api_job(world, manual)
    answer = run_policy_now(world.st, world.policy(), created_by="alice", now=T0)
    # One slot left on node1: a starts, b waits in the run's queue.
    assert len(answer["job_ids"]) == 1 and answer["queued"] == ["b"], answer
    assert drain(world.st, T0) == []


def test_the_hub_default_applies_without_max_jobs(world: World) -> None:
    world.settings.node_job_limit = 1  # type: ignore[attr-defined]
    world.vm("a", tags={"tier": "gold"})
    api_job(world, world.vm("manual"))
    answer = run_policy_now(world.st, world.policy(), created_by="alice", now=T0)
    assert answer["job_ids"] == [] and answer["queued"] == ["a"], answer
    with world.db.session() as s:
        assert dispatch.occupied(s, world.nodes["node1"]) == 1
    # The API job ends: the scheduler's next drain starts a.
    with world.db.session() as s:
        s.execute(update(BackupJob).where(BackupJob.owner == "hub/1/x").values(status="completed"))
    assert len(drain(world.st, T0)) == 1


def test_queued_jobs_take_no_slot_from_the_scheduler(world: World) -> None:
    world.settings.node_job_limit = 1  # type: ignore[attr-defined]
    world.vm("a", tags={"tier": "gold"})
    waiting = world.vm("waiting")
    with world.db.session() as s:
        dispatch.new_queued_job(
            s,
            vm_id=waiting,
            repository_id=world.repository_id,
            node_id=world.nodes["node1"],
            requested_type="full",
            disk_id=None,
            tags={},
            created_by="bob",
            reason="waiting for node node1: 1 of 1 jobs running",
        )
    answer = run_policy_now(world.st, world.policy(), created_by="alice", now=T0)
    assert len(answer["job_ids"]) == 1, answer
    # The engine was told the item holds the slot (it starts now, not queued).
    assert [r.reserved for r in world.engine.requests] == [True]


def queue_api_backup(world: World, vm_id: str) -> str:
    with world.db.session() as s:
        job = dispatch.new_queued_job(
            s,
            vm_id=vm_id,
            repository_id=world.repository_id,
            node_id=world.nodes["node1"],
            requested_type="full",
            disk_id=None,
            tags={},
            created_by="bob",
            reason="waiting for node node1: 1 of 1 jobs running",
        )
        return job.id


def test_a_policy_entry_that_waited_longer_goes_before_a_queued_backup(world: World) -> None:
    """One slot, two queues: the entry queued first gets the slot even though
    queued backups are claimed the moment it frees."""
    world.settings.node_job_limit = 1  # type: ignore[attr-defined]
    world.vm("a", tags={"tier": "gold"})
    busy = api_job(world, world.vm("manual"))
    answer = run_policy_now(world.st, world.policy(), created_by="alice", now=T0)
    assert answer["queued"] == ["a"]
    later = queue_api_backup(world, world.vm("later"))
    with world.db.session() as s:
        s.execute(update(BackupJob).where(BackupJob.id == busy).values(status="completed"))
    lifecycle = JobLifecycle(world.db, owner="hub/2/y")
    node = world.nodes["node1"]
    assert dispatch.claim(world.db, lifecycle, node, world.settings) is None  # a first
    [started] = drain(world.st, T0)
    assert world.items()["a"].status == "started"
    world.finish(started)
    got = dispatch.claim(world.db, lifecycle, node, world.settings)
    assert got is not None and got[0] == later


def test_a_policy_entry_that_cannot_start_now_does_not_hold_the_queue(world: World) -> None:
    world.settings.node_job_limit = 1  # type: ignore[attr-defined]
    world.vm("a", tags={"tier": "gold"})
    busy = api_job(world, world.vm("manual"))
    run_policy_now(world.st, world.policy(), created_by="alice", now=T0)
    with world.db.session() as s:  # retried later (its VM was busy, say)
        s.execute(update(PolicyRunVm).values(not_before=datetime.now(UTC) + timedelta(minutes=5)))
        s.execute(update(BackupJob).where(BackupJob.id == busy).values(status="completed"))
    later = queue_api_backup(world, world.vm("later"))
    got = dispatch.claim(
        world.db, JobLifecycle(world.db, owner="hub/2/y"), world.nodes["node1"], world.settings
    )
    assert got is not None and got[0] == later
