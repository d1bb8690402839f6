"""Per-node limits and the queue of backup jobs: who may start now, who waits,
and which waiting job starts when a slot frees.

The rule (one for every way a backup starts: API, CLI, scheduler)::

    limit(node)    = nodes.max_jobs, or SENDENSE_NODE_JOB_LIMIT when NULL
                     (0: no limit)
    occupied(node) = backup jobs of the node that are pending or running and
                     not queued (claimed, preparing targets, copying)
                   + policy items the scheduler reserved a slot for and is
                     starting (scheduler/runs.py ``starting``)

- **Queued.** A backup asked while ``occupied >= limit`` is not refused: it is
  created ``pending`` with step ``queued``, no owner, no lease, no restore
  point rows and no target (targets and ports are made when it is claimed).
  Its ``params["queue"]`` and ``messages`` say why it waits, e.g. "waiting
  for node node1: 4 of 4 jobs running". A backup asked for a VM that
  already has a job is refused (409 ``disk_busy``) unless the request asked
  to queue (``queue: true``): then it waits for that job too.
- **Claim.** Every hub process runs a `Dispatcher`: every
  ``SENDENSE_DISPATCH_INTERVAL`` seconds, and at once when a job of its own
  ends, it tries to claim queued jobs. A claim is one short transaction:
  the node's row lock (PostgreSQL ``SELECT ... FOR UPDATE``; SQLite a write,
  which takes the database's write lock) serializes the count; if
  ``occupied < limit`` the first queued job in the fair order is locked
  (``FOR UPDATE SKIP LOCKED`` on PostgreSQL: a row another hub is claiming
  or cancelling is passed over, not waited for) and taken with a
  conditional ``UPDATE ... WHERE owner IS NULL AND status = 'pending'``: the
  claiming hub becomes its owner with a lease, and starts it (plan, targets,
  node) like a job asked now. Exactly one hub wins a job.
- **Fair order.** Not the order of the requests: across VMs, the VM whose
  last backup started longest ago (never: first) goes first, then the
  oldest request, then the job id. A VM with many queued requests gets one
  slot at a time (its jobs run one after another anyway: one job per VM), and
  after each of them the others' single requests come first, so no VM
  starves another.
- **No owner, no orphan.** A queued job runs nothing: recovery
  (`JobLifecycle.orphans`) leaves it alone, and any hub claims it later,
  whichever hub it was asked on and even if that hub has died. A job whose
  claiming hub died before planning it (no restore point rows yet) is put
  back in the queue by the hub that takes it over (`requeue_unplanned`).
- **Policies.** A policy's VMs wait in their run's queue (scheduler/runs.py)
  and start at the scheduler's tick, counted by the same rule. Between the
  two queues the older request goes first: a queued job does not take a
  slot while a policy entry for the node that may start now (window open,
  retry time passed) has waited longer.
- **Cancel.** A queued job is cancelled by one conditional write (nothing
  exists on disk yet); a claim and a cancel racing are settled by the same
  ``owner IS NULL`` condition.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, not_, select, update
from sqlalchemy.orm import Session, aliased

from sendense.catalog.db import Database
from sendense.catalog.models import Backup, BackupJob, Node, PolicyRunVm
from sendense.engine.lifecycle import ACTIVE, QUEUED_STEP, JobLifecycle, queued_clause

log = logging.getLogger(__name__)

# Kinds of jobs that keep a VM busy: one job per VM at a time (a merge holds
# the chain's write lock).
VM_BUSY_KINDS = ("backup", "consolidate", "retention")
# Queued jobs of a node looked at per claim (the first claimable one wins).
CANDIDATES = 8


def lock_node(s: Session, node_id: str) -> None:
    """Serialize with every other counter of this node's slots: PostgreSQL the
    node's row lock; SQLite a write first (the database's write lock, and
    later reads see every earlier commit). Take it before a VM's lock."""
    if s.get_bind().dialect.name == "sqlite":
        s.execute(update(Node).where(Node.id == node_id).values(id=Node.id))
    else:
        s.execute(select(Node.id).where(Node.id == node_id).with_for_update())


def default_limit(settings: Any) -> int:
    """SENDENSE_NODE_JOB_LIMIT (0: no limit). The scheduler's former
    SENDENSE_SCHEDULER_NODE_LIMIT stands in for it when only that one is set
    (deprecated; the same rule now counts every backup, not only policy
    jobs)."""
    value = getattr(settings, "node_job_limit", None)
    legacy = getattr(settings, "scheduler_node_limit", None)
    explicit = "node_job_limit" in (getattr(settings, "model_fields_set", None) or ())
    if legacy is not None and (value is None or not explicit):
        value = legacy
    return max(int(value if value is not None else 4), 0)


def limit_of(s: Session, node_id: str, settings: Any) -> int:
    """The node's limit: its ``max_jobs``, else the hub's default (0: none)."""
    max_jobs = s.scalar(select(Node.max_jobs).where(Node.id == node_id))
    return int(max_jobs) if max_jobs is not None else default_limit(settings)


def occupied(s: Session, node_id: str) -> int:
    """Slots of the node in use (any hub process): backup jobs pending or
    running that are not queued, plus policy items being started."""
    jobs = s.execute(
        select(func.count())
        .select_from(BackupJob)
        .where(
            BackupJob.node_id == node_id,
            BackupJob.kind == "backup",
            BackupJob.status.in_(ACTIVE),
            not_(queued_clause()),
        )
    ).scalar_one()
    starting = s.execute(
        select(func.count())
        .select_from(PolicyRunVm)
        .where(PolicyRunVm.node_id == node_id, PolicyRunVm.status == "starting")
    ).scalar_one()
    return int(jobs) + int(starting)


def node_full(s: Session, node_id: str, settings: Any) -> str | None:
    """Why a new job of the node must wait (None: a slot is free). Call with
    the node locked (`lock_node`)."""
    limit = limit_of(s, node_id, settings)
    if limit <= 0:
        return None
    used = occupied(s, node_id)
    if used < limit:
        return None
    name = s.scalar(select(Node.name).where(Node.id == node_id)) or node_id
    return f"waiting for node {name}: {used} of {limit} jobs running"


def vm_busy_job(s: Session, vm_id: str) -> BackupJob | None:
    """A job keeping the VM busy: a backup (queued ones included: they are
    next), a consolidation or a retention, pending or running."""
    return s.scalar(
        select(BackupJob)
        .where(
            BackupJob.vm_id == vm_id,
            BackupJob.kind.in_(VM_BUSY_KINDS),
            BackupJob.status.in_(ACTIVE),
        )
        .order_by(BackupJob.created_at)
        .limit(1)
    )


def new_queued_job(
    s: Session,
    *,
    vm_id: str,
    repository_id: str,
    node_id: str,
    requested_type: str,
    disk_id: int | None,
    tags: dict[str, Any],
    created_by: str,
    reason: str,
) -> BackupJob:
    """Insert a queued backup job (no owner, no lease, no restore points)."""
    now = datetime.now(UTC)
    job = BackupJob(
        kind="backup",
        vm_id=vm_id,
        repository_id=repository_id,
        node_id=node_id,
        status="pending",
        step=QUEUED_STEP,
        requested_type=requested_type,
        tags=tags,
        created_by=created_by,
        created_at=now,
        owner=None,
        lease_until=None,
        params={"disk_id": disk_id, "queue": {"reason": reason, "queued_at": now.isoformat()}},
        messages={"hub": [f"queued: {reason}"]},
    )
    s.add(job)
    s.flush()
    return job


def fair_order() -> list[Any]:
    """ORDER BY of queued jobs: the VM's last started backup (never: first),
    then the request's time, then the id."""
    other = aliased(BackupJob)
    last_started = (
        select(func.max(other.started_at))
        .where(other.vm_id == BackupJob.vm_id, other.kind == "backup")
        .correlate(BackupJob)
        .scalar_subquery()
    )
    return [last_started.asc().nulls_first(), BackupJob.created_at, BackupJob.id]


def _vm_free() -> Any:
    """The queued job's VM has no claimed or running job that keeps it busy."""
    other = aliased(BackupJob)
    busy = (
        select(other.id)
        .where(
            other.vm_id == BackupJob.vm_id,
            other.kind.in_(VM_BUSY_KINDS),
            other.status.in_(ACTIVE),
            not_(queued_clause(other)),
        )
        .correlate(BackupJob)
        .exists()
    )
    return not_(busy)


def queued_nodes(db: Database) -> list[str]:
    """Nodes with queued jobs (a cheap read: most ticks find none)."""
    with db.session() as s:
        return [
            n
            for n in s.scalars(select(BackupJob.node_id).where(queued_clause()).distinct()).all()
            if n is not None
        ]


def candidates(s: Session, node_id: str) -> list[str]:
    """The node's first queued jobs in the fair order whose VM is free."""
    return list(
        s.scalars(
            select(BackupJob.id)
            .where(queued_clause(), BackupJob.node_id == node_id, _vm_free())
            .where(BackupJob.cancel_requested_at.is_(None))
            .order_by(*fair_order())
            .limit(CANDIDATES)
        ).all()
    )


def _policy_first(s: Session, node_id: str, job_id: str, settings: Any) -> bool:
    """A policy's entry for this node has waited longer than the queued job
    and may start now: the scheduler starts it at its next tick (this hub
    schedules). One slot, two queues: the older request goes first."""
    if not getattr(settings, "scheduler", False):
        return False
    from sendense.scheduler.runs import oldest_waiting  # the scheduler imports this module

    waiting = oldest_waiting(s, node_id, datetime.now(UTC))
    if waiting is None:
        return False
    queued_at = s.scalar(select(BackupJob.created_at).where(BackupJob.id == job_id))
    return queued_at is not None and waiting < queued_at


def claim(
    db: Database, lifecycle: JobLifecycle, node_id: str, settings: Any
) -> tuple[str, int, int] | None:
    """Claim the first queued job of the node in the fair order if the node
    has a free slot: ``(job id, slots used before, limit)``, or None.

    The order is read first, with no lock (the costly query: 35-75 ms with
    1,000 queued jobs among 100,000); then, under the node's lock, the count
    and the claim itself: the candidates locked ``FOR UPDATE SKIP LOCKED``
    (PostgreSQL) and the first one still queued, whose VM is still free,
    taken with a conditional write. A candidate taken meanwhile by another
    hub is passed over; if all were, the order is read again."""
    for _ in range(3):
        with db.session() as s:
            # Without the lock first: a full node costs no write lock.
            limit = limit_of(s, node_id, settings)
            if limit > 0 and occupied(s, node_id) >= limit:
                return None
            ids = candidates(s, node_id)
            if not ids or _policy_first(s, node_id, ids[0], settings):
                return None
        with db.session() as s:
            lock_node(s, node_id)
            limit = limit_of(s, node_id, settings)
            used = occupied(s, node_id)
            if limit > 0 and used >= limit:
                return None
            if s.get_bind().dialect.name != "sqlite":
                locked = set(
                    s.scalars(
                        select(BackupJob.id)
                        .where(BackupJob.id.in_(ids), queued_clause())
                        .with_for_update(skip_locked=True)
                    ).all()
                )
                ids = [i for i in ids if i in locked]
            for job_id in ids:
                result = s.execute(
                    update(BackupJob)
                    .where(BackupJob.id == job_id, queued_clause(), _vm_free())
                    .values(step="claimed", **lifecycle.claim_fields())
                )
                if getattr(result, "rowcount", 0):
                    return job_id, used, limit
    return None


def requeue_unplanned(db: Database, lifecycle: JobLifecycle, job_id: str) -> bool:
    """Put back in the queue a job this process took over from a dead hub
    that had claimed it but not planned it yet (no restore point rows: no
    file, no target, nothing on the node). True if done."""
    with db.session() as s:
        if s.scalar(select(Backup.id).where(Backup.job_id == job_id).limit(1)) is not None:
            return False
        job = s.get(BackupJob, job_id)
        if job is None or not (job.params or {}).get("queue"):
            return False  # not a job that came from the queue
        messages = dict(job.messages or {})
        messages["hub"] = [
            *(messages.get("hub") or []),
            "queued again: the hub that claimed it stopped before starting it",
        ]
        result = s.execute(
            update(BackupJob)
            .where(
                BackupJob.id == job_id,
                BackupJob.status == "pending",
                BackupJob.owner == lifecycle.owner,
                BackupJob.started_at.is_(None),
            )
            .values(owner=None, lease_until=None, step=QUEUED_STEP, messages=messages)
        )
        done = bool(getattr(result, "rowcount", 0))
    if done:
        log.warning("job=%s queued again: its claiming hub died before starting it", job_id)
    return done


def cancel_queued(db: Database, lifecycle: JobLifecycle, job_id: str) -> bool:
    """Cancel a job that is still queued (True), in one conditional write:
    nothing exists on disk for it yet. False: not queued (claimed meanwhile,
    or already ended)."""
    now = datetime.now(UTC)
    with db.session() as s:
        result = s.execute(
            update(BackupJob)
            .where(BackupJob.id == job_id, queued_clause())
            .values(
                status="cancelled",
                step="cancelled",
                finished_at=now,
                cancel_requested_at=now,
                error_code="cancelled",
                error_message="cancelled by user while queued (nothing was started)",
            )
        )
        done = bool(getattr(result, "rowcount", 0))
    if done:
        log.info("job=%s cancelled while queued", job_id)
        lifecycle.notify(job_id)
        lifecycle.ended(job_id)
    return done


class Dispatcher:
    """Claims queued jobs for this hub process and launches them.

    ``launch(job_id)`` starts a claimed job (the backup engine's
    `BackupEngine.launch_claimed`); it handles its own failures."""

    def __init__(
        self,
        db: Database,
        lifecycle: JobLifecycle,
        settings: Any,
        launch: Callable[[str], None],
        *,
        interval: float | None = None,
    ) -> None:
        self.db = db
        self.lifecycle = lifecycle
        self.settings = settings
        self.launch = launch
        self.interval = (
            interval if interval is not None else float(getattr(settings, "dispatch_interval", 2))
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one pass at a time in this process
        lifecycle.on_end.append(self._job_ended)

    def _job_ended(self, job_id: str) -> None:
        self.poke()

    def poke(self) -> None:
        """Try again now (a job of this process ended: a slot may be free)."""
        self._wake.set()

    def run_once(self) -> list[str]:
        """One pass: claim and launch what may start on every node with
        queued jobs; the ids launched."""
        launched: list[str] = []
        with self._lock:
            for node_id in queued_nodes(self.db):
                while not self._stop.is_set():
                    try:
                        got = claim(self.db, self.lifecycle, node_id, self.settings)
                    except Exception:
                        log.exception("claim of queued jobs failed node_id=%s", node_id)
                        break
                    if got is None:
                        break
                    job_id, used, limit = got
                    log.info(
                        "job=%s claimed from the queue node_id=%s slots=%d/%s owner=%s",
                        job_id,
                        node_id,
                        used + 1,
                        limit or "unlimited",
                        self.lifecycle.owner,
                    )
                    self.launch(job_id)
                    launched.append(job_id)
        return launched

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("dispatcher pass failed")
            self._wake.wait(self.interval)
            self._wake.clear()
