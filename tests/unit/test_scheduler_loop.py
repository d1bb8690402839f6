"""The scheduler loop with a controllable clock on a real catalog (SQLite and
PostgreSQL): due runs, missed runs after downtime, windows, per-node
queueing, busy VMs, two schedulers on one catalog.

The world (catalog, fake engine, fake local jobs) is test_scheduler_queue's.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from test_scheduler_queue import World

from sendense.catalog.db import Database
from sendense.catalog.models import AuditEntry, Policy, PolicyRun
from sendense.scheduler import events, run_policy_now
from sendense.scheduler.loop import DueCache, PolicyTiming, Scheduler, due_set


@pytest.fixture
def world(database: Database) -> World:
    return World(database)


class FakeClock:
    """Time moves only when the test (or a sleep) moves it."""

    def __init__(self, now: datetime) -> None:
        self.t = now
        self.slept: list[float] = []
        self.woke = threading.Event()

    def now(self) -> datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += timedelta(seconds=seconds)
        self.woke.set()

    def at(self, hour: int, minute: int = 0, second: int = 0, day: int = 23) -> datetime:
        self.t = datetime(2026, 11, day, hour, minute, second, tzinfo=UTC)
        return self.t


def at(hour: int, minute: int = 0, second: int = 0, day: int = 23) -> datetime:
    return datetime(2026, 11, day, hour, minute, second, tzinfo=UTC)


def scheduler(world: World, clock: FakeClock) -> Scheduler:
    return Scheduler(world.st, clock=clock, interval=10)


def runs_of(world: World, policy_id: str) -> list[PolicyRun]:
    with world.db.session() as s:
        return list(
            s.scalars(
                select(PolicyRun)
                .where(PolicyRun.policy_id == policy_id)
                .order_by(PolicyRun.scheduled_at)
            )
        )


def last_scheduled(world: World, policy_id: str) -> datetime | None:
    with world.db.session() as s:
        return s.get_one(Policy, policy_id).last_scheduled_at


# ------------------------------------------------------------------ due set


def test_due_set_is_pure_and_collapses_missed_runs() -> None:
    created = at(8, 0)
    policies = [
        PolicyTiming("hourly", "0 * * * *", "UTC", created),
        ("daily", "0 2 * * *", "UTC", created),  # plain tuples too
        PolicyTiming("berlin", "30 9 * * *", "Europe/Berlin", created),  # 08:30 UTC
    ]
    assert due_set(policies, at(8, 59)) == [("berlin", at(8, 30), 0)]
    assert due_set(policies, at(9, 0)) == [("hourly", at(9, 0), 0), ("berlin", at(8, 30), 0)]
    # Down from 08:00 to 12:05: one hourly run, for 12:00, standing for 3 more.
    assert due_set(policies[:1], at(12, 5)) == [("hourly", at(12, 0), 3)]
    assert due_set([PolicyTiming("hourly", "0 * * * *", "UTC", at(12, 0))], at(12, 59)) == []


def test_due_set_cache_gives_the_same_answers() -> None:
    cache = DueCache()
    policies = [PolicyTiming(f"p{i}", f"{i % 60} * * * *", "UTC", at(8, 0)) for i in range(120)]
    for minute in range(0, 180, 7):
        now = at(8, 0) + timedelta(minutes=minute)
        assert due_set(policies, now, cache) == due_set(policies, now)


# ---------------------------------------------------------------- due runs


def test_a_due_run_is_claimed_once_and_starts_its_jobs(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    world.vm("b", tags={"tier": "gold"})
    pid = world.policy(schedule="0 * * * *")
    clock = FakeClock(at(8, 30))
    sched = scheduler(world, clock)
    assert sched.tick().claimed == []
    clock.at(9, 0, 5)
    report = sched.tick()
    assert len(report.claimed) == 1 and len(report.started) == 2
    [run] = runs_of(world, pid)
    assert (run.scheduled_at, run.trigger, run.missed_count) == (at(9), "schedule", 0)
    assert last_scheduled(world, pid) == at(9)
    assert sched.lag_seconds == 5
    tags = world.job(report.started[0]).tags
    assert tags["trigger"] == "schedule" and tags["scheduled_at"] == at(9).isoformat()
    # Later ticks of the same hour claim nothing more.
    clock.at(9, 0, 15)
    assert sched.tick().claimed == []
    clock.at(9, 59, 59)
    assert sched.tick().claimed == []
    # The jobs end: the run ends with them.
    for job_id in report.started:
        world.finish(job_id)
    clock.at(9, 59, 59)
    assert sched.tick().finished == [run.id]
    assert runs_of(world, pid)[0].status == "completed"


def test_a_disabled_policy_does_not_run(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    pid = world.policy(schedule="0 * * * *", enabled=False)
    sched = scheduler(world, FakeClock(at(12, 0, 5)))
    assert sched.tick().claimed == [] and runs_of(world, pid) == []


def test_missed_runs_after_downtime_run_once_and_say_so(world: World) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def hook(s: Any, event: str, payload: dict[str, Any], policy_id: str | None) -> None:
        seen.append((event, payload))

    world.vm("a", tags={"tier": "gold"})
    pid = world.policy(schedule="0 * * * *")
    clock = FakeClock(at(9, 0, 3))
    first = scheduler(world, clock).tick()
    world.finish(first.started[0])
    # The hub is down from 09:01 to 12:30: 10:00, 11:00 and 12:00 were missed.
    clock.at(12, 30)
    events.subscribe(hook)
    try:
        report = scheduler(world, clock).tick()
    finally:
        events.unsubscribe(hook)
    assert len(report.claimed) == 1 and len(report.started) == 1
    run = runs_of(world, pid)[-1]
    assert (run.scheduled_at, run.trigger, run.missed_count) == (at(12), "missed", 2)
    assert run.summary["first_missed"] == at(10).isoformat()
    tags = world.job(report.started[0]).tags
    assert tags["trigger"] == "missed" and tags["missed_runs"] == "2"
    assert tags["first_missed"] == at(10).isoformat()
    with world.db.session() as s:
        [audit] = s.scalars(select(AuditEntry).where(AuditEntry.route == "scheduler")).all()
    assert audit.token_name == "scheduler" and audit.target["missed_count"] == "2"
    assert audit.target["run_id"] == run.id
    # (the first run ended in this tick too: run.finished)
    missed = [payload for e, payload in seen if e == "run.missed"]
    assert len(missed) == 1
    assert missed[0]["missed_count"] == 2 and missed[0]["policy_id"] == pid
    # Only once: the next ticks of the hour claim nothing.
    clock.at(12, 31)
    assert scheduler(world, clock).tick().claimed == []
    assert len(runs_of(world, pid)) == 2


def test_a_new_policy_does_not_run_for_times_before_it_existed(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    pid = world.policy(schedule="0 * * * *", created_at=at(11, 10))
    clock = FakeClock(at(11, 59))
    assert scheduler(world, clock).tick().claimed == []
    clock.at(12, 0, 1)
    scheduler(world, clock).tick()
    [run] = runs_of(world, pid)
    assert run.trigger == "schedule" and run.missed_count == 0


# ------------------------------------------------------------------ windows


def test_outside_the_window_queued_items_wait_and_running_ones_finish(world: World) -> None:
    world.settings.scheduler_node_limit = 1
    world.vm("a", tags={"tier": "gold"})
    world.vm("b", tags={"tier": "gold"})
    # Runs at 21:00 (UTC), may start jobs between 22:00 and 23:00 only.
    pid = world.policy(schedule="0 21 * * *", window={"start": "22:00", "end": "23:00"})
    clock = FakeClock(at(21, 0, 5))
    sched = scheduler(world, clock)
    report = sched.tick()
    assert len(report.claimed) == 1 and report.started == []
    assert {i.status for i in world.items().values()} == {"queued"}
    clock.at(21, 59, 55)
    assert sched.tick().started == []
    clock.at(22, 0, 0)
    [job_a] = sched.tick().started
    assert world.items()["a"].status == "started"
    # The window closes while a runs: a is left alone, b does not start.
    clock.at(23, 0, 5)
    world.finish(job_a)
    report = sched.tick()
    assert report.started == [] and world.items()["b"].status == "queued"
    assert world.items()["a"].status == "done"
    # The next day's window starts it (no newer run in between: 21:00 is
    # claimed the next day and takes b's place, then starts it in the window).
    clock.at(21, 0, 5, day=24)
    report = sched.tick()
    assert world.items(runs_of(world, pid)[0].id)["b"].status == "skipped"
    assert "superseded" in (world.items(runs_of(world, pid)[0].id)["b"].reason or "")
    clock.at(22, 0, 5, day=24)
    assert len(sched.tick().started) == 1


def test_a_manual_run_ignores_the_window(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    pid = world.policy(window={"start": "22:00", "end": "23:00"})
    answer = run_policy_now(world.st, pid, created_by="alice", now=at(12, 0))
    assert len(answer["job_ids"]) == 1


# ------------------------------------------------------ per node, busy VMs


def test_node_limit_one_with_three_vms_runs_one_at_a_time(world: World) -> None:
    world.settings.scheduler_node_limit = 1
    for name in ("a", "b", "c"):
        world.vm(name, tags={"tier": "gold"})
    world.policy(schedule="0 * * * *")
    clock = FakeClock(at(9, 0, 5))
    sched = scheduler(world, clock)
    order = []
    report = sched.tick()
    for _ in range(3):
        assert len(report.started) == 1
        assert len(world.active_jobs()) == 1
        order.append(world.job(report.started[0]).vm_id)
        clock.sleep(10)
        assert sched.tick().started == []  # still running: the others wait
        world.finish(report.started[0])
        clock.sleep(10)
        report = sched.tick()
    assert report.started == [] and len(report.finished) == 1
    assert len(set(order)) == 3


def test_a_busy_vm_is_retried_later_in_the_run(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    manual = run_policy_now(
        world.st, world.policy("manual", enabled=False), created_by="bob", now=at(8, 59)
    )
    pid = world.policy(schedule="0 * * * *")
    clock = FakeClock(at(9, 0, 5))
    sched = scheduler(world, clock)
    assert sched.tick().started == []
    run = runs_of(world, pid)[0]
    item = world.items(run.id)["a"]
    assert item.status == "queued" and "disk_busy" in (item.reason or "")
    world.finish(manual["job_ids"][0])
    clock.sleep(10)  # 09:00:15, before the retry time (09:00:20)
    assert sched.tick().started == []
    clock.sleep(10)
    assert len(sched.tick().started) == 1
    assert world.items(run.id)["a"].status == "started"


def test_a_claim_left_starting_by_a_dead_hub_is_queued_again(world: World) -> None:
    from sendense.catalog.models import PolicyRunVm

    world.vm("a", tags={"tier": "gold"})
    pid = world.policy(window={"start": "22:00", "end": "23:00"}, schedule="0 9 * * *")
    clock = FakeClock(at(9, 0, 5))
    sched = scheduler(world, clock)
    sched.tick()
    with world.db.session() as s:
        s.execute(update(PolicyRunVm).values(status="starting", updated_at=at(9, 0, 5)))
    clock.at(22, 0)
    assert len(sched.tick().started) == 1
    assert runs_of(world, pid)[0].status == "running"


# ------------------------------------------------- two schedulers, one catalog


def test_two_schedulers_on_one_catalog_start_a_run_once(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    pid = world.policy(schedule="0 * * * *")
    clock = FakeClock(at(9, 0, 5))
    one, two = (
        Scheduler(world.st, clock=clock, name="one"),
        Scheduler(world.st, clock=clock, name="two"),
    )
    # Both computed the due set before either claimed: the second insert fails.
    due = due_set([PolicyTiming(pid, "0 * * * *", "UTC", at(8, 0))], at(9, 0, 5))
    assert one._claim(due[0], at(9, 0, 5)) is not None
    with world.db.session() as s:  # as if two had read the policy before one's commit
        s.execute(update(Policy).values(last_scheduled_at=None))
    assert two._claim(due[0], at(9, 0, 5)) is None
    report_one, report_two = one.tick(), two.tick()
    assert len(runs_of(world, pid)) == 1
    assert len(report_one.started) + len(report_two.started) == 1
    assert len(world.engine.requests) == 1


# ------------------------------------------------------------------- thread


class GatedClock(FakeClock):
    """A sleep waits until the test lets the loop go on (one tick per release)."""

    def __init__(self, now: datetime) -> None:
        super().__init__(now)
        self.gate = threading.Semaphore(0)

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        self.gate.acquire(timeout=10)


def test_the_thread_ticks_with_the_clock_and_stops(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    pid = world.policy(schedule="0 * * * *")
    clock = GatedClock(at(8, 59, 50))
    sched = scheduler(world, clock)
    sched.start()
    try:
        assert clock.woke.wait(10)  # ticked at 08:59:50, sleeping until 09:00:00
        assert runs_of(world, pid) == []
        clock.gate.release()
        deadline = datetime.now(UTC) + timedelta(seconds=10)
        while len(clock.slept) < 2 and datetime.now(UTC) < deadline:
            clock.woke.wait(0.05)
    finally:
        sched._stop.set()
        clock.gate.release()
        sched.stop()
    assert not sched.running
    [run] = runs_of(world, pid)
    assert run.scheduled_at == at(9) and clock.slept[:2] == [10, 10]


@pytest.fixture(autouse=True)
def _no_hooks_left() -> Any:
    yield
    assert not events._hooks


def test_a_manual_run_at_a_scheduled_time_is_a_run_of_its_own(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    pid = world.policy(schedule="0 * * * *")
    clock = FakeClock(at(9))
    assert len(scheduler(world, clock).tick().claimed) == 1
    answer = run_policy_now(world.st, pid, created_by="alice", now=at(9))
    manual = [r for r in runs_of(world, pid) if r.id == answer["run_id"]]
    assert manual[0].trigger == "manual" and manual[0].scheduled_at > at(9)
    assert len(runs_of(world, pid)) == 2
