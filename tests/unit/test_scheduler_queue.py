"""Policy runs and the scheduler's queue on a real catalog (SQLite and
PostgreSQL), with a fake backup engine and a controllable clock.

The engine fake inserts the job and restore-point rows a real start would
and refuses a busy VM with 409 ``disk_busy`` exactly like the real one; the
test ends jobs itself (`World.finish`). Local jobs (verify, retention) are
inserted by the real planners and recorded instead of run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import pytest
from sqlalchemy import select, update

from sendense.catalog.db import Database
from sendense.catalog.models import (
    Backup,
    BackupJob,
    Node,
    Policy,
    PolicyRun,
    PolicyRunVm,
    Repository,
    Source,
    Vm,
    VmDisk,
)
from sendense.catalog.stores.common import ACTIVE
from sendense.core.errors import DiskBusy, NoParent, NotFound
from sendense.engine.backup import BackupRequest
from sendense.scheduler import events, matched_vms, run_policy_now
from sendense.scheduler.runs import create_run, drain, finish_runs, follow_up

if TYPE_CHECKING:
    from sendense.hub.state import HubState

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


class FakeEngine:
    """`BackupEngine.start` as the scheduler sees it."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.requests: list[BackupRequest] = []
        self.refuse: dict[str, Exception] = {}
        self.on_start: Callable[[BackupRequest], None] | None = None

    def start(self, req: BackupRequest) -> str:
        if self.on_start is not None:
            self.on_start(req)
        if req.vm_name in self.refuse:
            raise self.refuse[req.vm_name]
        with self.db.session() as s:
            vm = s.scalars(select(Vm).where(Vm.name == req.vm_name)).one_or_none()
            if vm is None:
                raise NotFound(f"VM {req.vm_name} not found")
            busy = s.scalars(
                select(BackupJob).where(BackupJob.vm_id == vm.id, BackupJob.status.in_(ACTIVE))
            ).first()
            if busy is not None:
                raise DiskBusy(f"VM {vm.name} is busy with job {busy.id}", job_id=busy.id)
            job = BackupJob(
                vm_id=vm.id,
                repository_id=req.repository_id,
                node_id=vm.source.node_id,
                status="running",
                requested_type=req.backup_type,
                tags=req.tags or {},
                created_by=req.created_by,
            )
            s.add(job)
            s.flush()
            for d in vm.disks:
                s.add(
                    Backup(
                        job_id=job.id,
                        vm_id=vm.id,
                        vm_disk_id=d.id,
                        disk_index=d.disk_index,
                        disk_key=d.disk_key,
                        repository_id=req.repository_id,
                        backup_type="full",
                        status="pending",
                        file_path=f"/srv/{vm.name}/{job.id}-{d.disk_index}.qcow2",
                        nbd_export_name="x",
                        created_at=datetime.now(UTC),
                    )
                )
            self.requests.append(req)
            return job.id


class FakeLifecycle:
    """`JobLifecycle.new_local_job` / `launch`: rows inserted, launches recorded."""

    owner = "test-hub"

    def __init__(self) -> None:
        self.launched: list[str] = []

    def new_local_job(
        self,
        s: Any,
        kind: str,
        params: dict[str, Any],
        *,
        vm_id: str | None = None,
        repository_id: str | None = None,
        created_by: str = "admin",
        holds: Iterable[str] = (),
        step: str = "queued",
        tags: dict[str, Any] | None = None,
    ) -> BackupJob:
        job = BackupJob(
            kind=kind,
            vm_id=vm_id,
            repository_id=repository_id,
            status="pending",
            step=step,
            tags=dict(tags or {}),
            requested_type=kind,
            params=params,
            created_by=created_by,
        )
        s.add(job)
        s.flush()
        return job

    def launch(self, job_id: str) -> None:
        self.launched.append(job_id)


@dataclass
class Settings:
    scheduler_node_limit: int = 0
    scheduler: bool = True
    scheduler_interval: float = 10.0


@dataclass
class World:
    """A catalog with nodes, VMs and a repository, and the hub state the
    scheduler uses (fake engine and lifecycle)."""

    db: Database
    settings: Settings = field(default_factory=Settings)
    engine: FakeEngine = field(init=False)
    lifecycle: FakeLifecycle = field(default_factory=FakeLifecycle)
    repository_id: str = ""
    nodes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.engine = FakeEngine(self.db)
        with self.db.session() as s:
            repo = Repository(name="repo1", path="/srv")
            s.add(repo)
            s.flush()
            self.repository_id = repo.id

    @property
    def st(self) -> HubState:
        """This world as the hub state the scheduler takes."""
        return cast("HubState", self)

    def node(self, name: str) -> str:
        if name not in self.nodes:
            with self.db.session() as s:
                node = Node(name=name, url=f"http://{name}", token_encrypted="x")
                s.add(Source(name=f"src-{name}", node=node, type="qemu"))
                s.flush()
                self.nodes[name] = node.id
        return self.nodes[name]

    def vm(self, name: str, *, node: str = "node1", tags: dict[str, Any] | None = None) -> str:
        self.node(node)
        with self.db.session() as s:
            source = s.scalars(select(Source).where(Source.name == f"src-{node}")).one()
            vm = Vm(name=name, source_id=source.id, path=f"/run/{name}", tags=tags or {})
            vm.disks = [
                VmDisk(
                    disk_index=0, disk_key=2000, label="d0", capacity_bytes=1 << 20, size_gb=0.001
                )
            ]
            s.add(vm)
            s.flush()
            return vm.id

    def policy(self, name: str = "p1", **fields: Any) -> str:
        values: dict[str, Any] = {
            "selector": {"tags": {"tier": "gold"}},
            "schedule": "0 * * * *",
            "retention": {},
            "created_at": T0,
            **fields,
        }
        with self.db.session() as s:
            p = Policy(name=name, repository_id=self.repository_id, **values)
            s.add(p)
            s.flush()
            return p.id

    def finish(
        self,
        job_id: str,
        status: str = "completed",
        *,
        at: datetime | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        """End a job as the engine would (its restore points completed too)."""
        with self.db.session() as s:
            s.execute(
                update(BackupJob)
                .where(BackupJob.id == job_id)
                .values(
                    status=status,
                    error_code=None if status == "completed" else "boom",
                    result=result or {},
                )
            )
            s.execute(
                update(Backup)
                .where(Backup.job_id == job_id)
                .values(
                    status="completed" if status == "completed" else "failed",
                    change_id="c",
                    created_at=at or datetime.now(UTC),
                )
            )

    def items(self, run_id: str | None = None) -> dict[str, PolicyRunVm]:
        with self.db.session() as s:
            q = select(PolicyRunVm, Vm.name).join(Vm, Vm.id == PolicyRunVm.vm_id)
            if run_id:
                q = q.where(PolicyRunVm.run_id == run_id)
            return {name: item for item, name in s.execute(q.order_by(PolicyRunVm.created_at))}

    def run(self, run_id: str) -> PolicyRun:
        with self.db.session() as s:
            run = s.get(PolicyRun, run_id)
            assert run is not None
            return run

    def job(self, job_id: str) -> BackupJob:
        with self.db.session() as s:
            job = s.get(BackupJob, job_id)
            assert job is not None
            return job

    def active_jobs(self) -> list[BackupJob]:
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(BackupJob).where(
                        BackupJob.kind == "backup", BackupJob.status.in_(ACTIVE)
                    )
                )
            )


@pytest.fixture
def world(database: Database) -> World:
    return World(database)


# ----------------------------------------------------------------- selector


def test_selector_matches_by_name_or_by_every_tag(world: World) -> None:
    world.vm("web1", tags={"tier": "gold", "env": "prod"})
    world.vm("web2", tags={"tier": "gold", "env": "test"})
    world.vm("db1", tags={"tier": "silver"})
    world.vm("other")
    pid = world.policy(
        selector={"vms": ["db1", "not-yet-discovered"], "tags": {"tier": "gold", "env": "prod"}}
    )
    empty = world.policy("empty", selector={})
    with world.db.session() as s:
        assert [vm.name for vm in matched_vms(s, s.get_one(Policy, pid))] == ["db1", "web1"]
        assert matched_vms(s, s.get_one(Policy, empty)) == []


# ----------------------------------------------------------- run_policy_now


def test_run_now_starts_one_job_per_vm_and_the_first_is_full(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    world.vm("b", tags={"tier": "gold"})
    pid = world.policy()
    answer = run_policy_now(world.st, pid, created_by="alice", now=T0)
    assert len(answer["job_ids"]) == 2 and answer["queued"] == [] and answer["skipped"] == []
    assert [r.backup_type for r in world.engine.requests] == ["full", "full"]
    assert {r.created_by for r in world.engine.requests} == {"alice"}
    tags = world.job(answer["job_ids"][0]).tags
    assert tags["policy_id"] == pid and tags["trigger"] == "manual"
    assert tags["policy_run_id"] == answer["run_id"]
    run = world.run(answer["run_id"])
    assert run.trigger == "manual" and run.status == "running"
    assert {i.status for i in world.items().values()} == {"started"}


def test_run_now_unknown_policy_is_not_found(world: World) -> None:
    with pytest.raises(NotFound):
        run_policy_now(world.st, "nope", created_by="alice")


def test_full_every_third_run(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    pid = world.policy(full_every=3)
    types = []
    for n in range(5):
        answer = run_policy_now(world.st, pid, created_by="alice", now=T0 + timedelta(hours=n))
        world.finish(answer["job_ids"][0])
        follow_up(world.st, T0 + timedelta(hours=n))
        types.append(world.engine.requests[-1].backup_type)
    # "auto" is an incremental the engine turns into a full without a chain.
    assert types == ["full", "auto", "auto", "full", "auto"]


def test_run_now_with_node_limit_queues_the_rest_and_drain_starts_them_in_turn(
    world: World,
) -> None:
    world.settings.scheduler_node_limit = 1
    for name in ("a", "b", "c"):
        world.vm(name, tags={"tier": "gold"})
    world.vm("d", node="node2", tags={"tier": "gold"})
    pid = world.policy()
    answer = run_policy_now(world.st, pid, created_by="alice", now=T0)
    # One per node at a time: a (node1) and d (node2) start, b and c wait.
    assert len(answer["job_ids"]) == 2
    assert answer["queued"] == ["b", "c"]
    order = [r.vm_name for r in world.engine.requests]
    for _ in range(2):
        assert len([j for j in world.active_jobs() if j.node_id == world.nodes["node1"]]) == 1
        assert drain(world.st, T0) == []  # node1 is full
        running = [j for j in world.active_jobs() if j.node_id == world.nodes["node1"]]
        world.finish(running[0].id)
        follow_up(world.st, T0)
        assert len(drain(world.st, T0)) == 1
        order = [r.vm_name for r in world.engine.requests]
    assert order == ["a", "d", "b", "c"]
    for job in world.active_jobs():
        world.finish(job.id)
    follow_up(world.st, T0)
    assert finish_runs(world.st, T0) == [answer["run_id"]]
    run = world.run(answer["run_id"])
    assert run.status == "completed" and run.summary["counts"] == {"done": 4}


def test_busy_vm_waits_and_is_retried_later_in_the_run(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    first = run_policy_now(world.st, world.policy(), created_by="alice", now=T0)
    # Another policy's run finds the VM busy: queued with a retry time, not failed.
    other = world.policy("p2")
    answer = run_policy_now(world.st, other, created_by="alice", now=T0)
    assert answer["job_ids"] == [] and answer["queued"] == ["a"]
    item = world.items(answer["run_id"])["a"]
    assert item.status == "queued" and item.attempts == 1
    assert item.not_before == T0 + timedelta(seconds=15)
    assert "disk_busy" in (item.reason or "")
    # Before not_before nothing is tried; after it, still busy: backoff doubles.
    assert drain(world.st, T0 + timedelta(seconds=10)) == []
    assert world.items(answer["run_id"])["a"].attempts == 1
    assert drain(world.st, T0 + timedelta(seconds=15)) == []
    item = world.items(answer["run_id"])["a"]
    assert item.attempts == 2 and item.not_before == T0 + timedelta(seconds=45)
    world.finish(first["job_ids"][0])
    started = drain(world.st, T0 + timedelta(seconds=45))
    assert len(started) == 1
    assert world.items(answer["run_id"])["a"].status == "started"


def test_a_busy_item_is_skipped_when_a_newer_run_came_meanwhile(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    pid = world.policy()
    world.engine.refuse["a"] = DiskBusy("VM a is busy")
    newer: list[str] = []

    def a_newer_run_is_claimed(req: BackupRequest) -> None:
        if not newer:
            with world.db.session() as s:
                run = create_run(
                    s,
                    s.get_one(Policy, pid),
                    scheduled_at=T0 + timedelta(hours=1),
                    trigger="schedule",
                    now=T0 + timedelta(seconds=1),
                )
                newer.append(run.id)

    world.engine.on_start = a_newer_run_is_claimed
    answer = run_policy_now(world.st, pid, created_by="alice", now=T0)
    item = world.items(answer["run_id"])["a"]
    # Not queued again behind the newer run's own entry for the VM.
    assert item.status == "skipped" and item.reason == f"superseded by run {newer[0]}"
    assert world.items(newer[0])["a"].status == "queued"


def test_a_refused_start_fails_the_item_with_its_reason(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    world.vm("b", tags={"tier": "gold"})
    world.engine.refuse["a"] = NoParent("incremental impossible: no chain", disk_id=0)
    answer = run_policy_now(world.st, world.policy(), created_by="alice", now=T0)
    assert len(answer["job_ids"]) == 1
    assert answer["skipped"] == [
        {"vm_name": "a", "reason": "no_parent: incremental impossible: no chain"}
    ]
    world.finish(answer["job_ids"][0])
    follow_up(world.st, T0)
    finish_runs(world.st, T0)
    run = world.run(answer["run_id"])
    assert run.status == "partial"
    assert run.summary["failed"] == [
        {"vm_name": "a", "reason": "no_parent: incremental impossible: no chain"}
    ]


def test_a_policy_matching_nothing_ends_its_run_at_once(world: World) -> None:
    answer = run_policy_now(
        world.st, world.policy(selector={"vms": ["ghost"]}), created_by="x", now=T0
    )
    assert answer["job_ids"] == []
    run = world.run(answer["run_id"])
    assert run.status == "completed" and "matched no VM" in run.summary["warning"]


# ---------------------------------------------------------------- follow-up


def test_verify_then_retention_after_a_completed_backup(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    pid = world.policy(verify_after=True, retention={"keep_last": 1})
    first = run_policy_now(world.st, pid, created_by="alice", now=T0)
    world.finish(first["job_ids"][0], at=T0)
    follow_up(world.st, T0)
    item = world.items(first["run_id"])["a"]
    assert item.status == "verifying"
    verify_ids = world.run(first["run_id"]).summary["vms"]["a"]["verify_job_ids"]
    assert len(verify_ids) == 1 and world.lifecycle.launched == verify_ids
    assert world.job(verify_ids[0]).kind == "verify"
    world.finish(verify_ids[0])
    follow_up(world.st, T0)
    # One restore point, keep_last 1: nothing to remove, no retention job.
    item = world.items(first["run_id"])["a"]
    assert item.status == "done" and "nothing to remove" in (item.reason or "")

    second = run_policy_now(world.st, pid, created_by="alice", now=T0 + timedelta(hours=1))
    world.finish(second["job_ids"][0], at=T0 + timedelta(hours=1))
    follow_up(world.st, T0 + timedelta(hours=1))
    verify_ids = world.run(second["run_id"]).summary["vms"]["a"]["verify_job_ids"]
    world.finish(verify_ids[0])
    follow_up(world.st, T0 + timedelta(hours=1))
    item = world.items(second["run_id"])["a"]
    assert item.status == "retaining"
    retention_id = world.run(second["run_id"]).summary["vms"]["a"]["retention_job_id"]
    job = world.job(retention_id)
    assert job.kind == "retention" and world.lifecycle.launched[-1] == retention_id
    assert job.params["backup_ids"]  # the first restore point goes
    assert retention_id in (item.reason or "")
    world.finish(retention_id)
    follow_up(world.st, T0 + timedelta(hours=1))
    finish_runs(world.st, T0 + timedelta(hours=1))
    assert world.items(second["run_id"])["a"].status == "done"
    assert world.run(second["run_id"]).status == "completed"


@pytest.mark.parametrize(
    "status, result",
    [
        ("failed", {}),
        # The verify job completes and says the restore point is bad.
        ("completed", {"backup_id": "b1", "verify_status": "failed", "verify_error": "digest"}),
    ],
    ids=["job-failed", "point-failed"],
)
def test_failed_verify_fails_the_vm_and_skips_retention(
    world: World, status: str, result: dict[str, Any]
) -> None:
    world.vm("a", tags={"tier": "gold"})
    pid = world.policy(verify_after=True, retention={"keep_last": 1})
    answer = run_policy_now(world.st, pid, created_by="alice", now=T0)
    world.finish(answer["job_ids"][0])
    follow_up(world.st, T0)
    verify_id = world.run(answer["run_id"]).summary["vms"]["a"]["verify_job_ids"][0]
    world.finish(verify_id, status, result=result)
    follow_up(world.st, T0)
    item = world.items(answer["run_id"])["a"]
    assert item.status == "failed"
    if result:
        assert "b1 failed verification (digest)" in (item.reason or "")
    assert not any(j.kind == "retention" for j in map(world.job, world.lifecycle.launched))
    assert verify_id in (item.reason or "") and "retention not run" in (item.reason or "")
    finish_runs(world.st, T0)
    run = world.run(answer["run_id"])
    assert run.status == "failed" and run.summary["failed"][0]["vm_name"] == "a"


def test_failed_backup_and_failed_retention_are_recorded(world: World) -> None:
    world.vm("a", tags={"tier": "gold"})
    pid = world.policy(retention={"keep_last": 1})
    first = run_policy_now(world.st, pid, created_by="alice", now=T0)
    world.finish(first["job_ids"][0], "failed")
    follow_up(world.st, T0)
    item = world.items(first["run_id"])["a"]
    assert item.status == "failed" and first["job_ids"][0] in (item.reason or "")

    for n in (1, 2):
        answer = run_policy_now(world.st, pid, created_by="alice", now=T0 + timedelta(hours=n))
        world.finish(answer["job_ids"][0], at=T0 + timedelta(hours=n))
        follow_up(world.st, T0 + timedelta(hours=n))
    retention_id = world.run(answer["run_id"]).summary["vms"]["a"]["retention_job_id"]
    world.finish(retention_id, "failed")
    follow_up(world.st, T0 + timedelta(hours=2))
    item = world.items(answer["run_id"])["a"]
    assert item.status == "failed" and f"retention job {retention_id} failed" in (item.reason or "")


def test_run_finished_event_is_emitted_once(world: World) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def hook(s: Any, event: str, payload: dict[str, Any], policy_id: str | None) -> None:
        seen.append((event, payload))

    events.subscribe(hook)
    try:
        world.vm("a", tags={"tier": "gold"})
        answer = run_policy_now(world.st, world.policy(), created_by="alice", now=T0)
        world.finish(answer["job_ids"][0])
        follow_up(world.st, T0)
        finish_runs(world.st, T0)
        finish_runs(world.st, T0)
    finally:
        events.unsubscribe(hook)
    assert [e for e, _ in seen] == ["run.finished"]
    assert seen[0][1]["status"] == "completed" and seen[0][1]["run_id"] == answer["run_id"]


@pytest.mark.parametrize(
    "counts, status",
    [
        ({}, "completed"),
        ({"done": 2}, "completed"),
        ({"done": 1, "failed": 1}, "partial"),
        ({"done": 1, "skipped": 1}, "partial"),
        ({"failed": 2}, "failed"),
        ({"failed": 1, "skipped": 1}, "failed"),
        ({"skipped": 2}, "skipped"),
    ],
)
def test_run_status(counts: dict[str, int], status: str) -> None:
    from sendense.scheduler.runs import run_status

    assert run_status(counts) == status
