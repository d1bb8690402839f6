"""Policy runs: create one, queue its VMs, start what may start, follow up.

A run (`PolicyRun`) has one row per VM its policy matched (`PolicyRunVm`):
the queue the scheduler drains. Every step below is a conditional write in
the catalog, so several hub processes on one catalog can drain the same
queues without starting anything twice::

    queued ──claim──> starting ──engine.start──> started ──backup completed──┐
      ▲  │                │ 409 disk_busy / busy       │ backup failed         │
      │  │                └──> queued (not_before)     └──> failed             │
      │  └── a newer run of the policy ──> skipped                            │
      │                                                                       ▼
      │                     done <── retaining <── (retention job) <── verifying (verify_after)
      │                                  │                                 │ verify failed
      └ (start refused for another       └──> failed (retention failed)   └──> failed
         reason: failed, with it)              retention is not run on an unverified point

- claim: under the node's row lock (``FOR UPDATE``; on SQLite the write lock),
  count the node's slots in use against its limit with the rule every backup
  follows (engine/dispatch.py: ``nodes.max_jobs`` or
  SENDENSE_NODE_JOB_LIMIT; backup jobs claimed or running, from the API or a
  policy, plus items being started), then flip the item ``queued ->
  starting``: that item holds a slot until its job exists, and the engine
  starts it at once (``BackupRequest.reserved``). Policy items wait here, in
  the run's queue, not as queued jobs. A hub that dies there leaves a ``starting`` item:
  `recover_starting` puts it back in the queue after `STARTING_STALE`.
- A busy VM (another job on it: backup, consolidation, retention) is not a
  failure: the item goes back to ``queued`` with ``not_before`` (backoff
  `retry_delay`). Other refusals (no disks, no space, ...) fail the item with
  the error's code and message.
- Windows: outside its policy's window a scheduled item is not claimed (a
  started job runs to its end). A manual run (`run_policy_now`) is an
  operator's explicit request and ignores the window.
- Follow-up (`follow_up`): once a backup job has completed, ``verify_after``
  starts a verify job per new restore point; when those completed, retention
  runs for that VM with the policy's rules (`engine.retention`). Each step's
  job id is kept in the run's ``summary["vms"][vm_name]`` and in the item's
  ``reason`` (what a user reads). Any failure fails the item with its reason.
- `finish_runs`: a run whose items all ended (done / failed / skipped) is
  ``completed`` (all done), ``partial``, ``failed`` or ``skipped`` (`run_status`).

Which backup: the first run of a VM under a policy is a full, then every
``full_every``-th one (``full_every`` null: only the first); the others ask
for ``auto`` (incremental; the engine makes a full when no chain exists).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sendense.catalog.models import (
    Backup,
    BackupJob,
    Policy,
    PolicyRun,
    PolicyRunVm,
    Source,
    Vm,
)
from sendense.catalog.stores.common import ACTIVE
from sendense.core.errors import Conflict, Error, NotFound, Unavailable
from sendense.engine import delete, dispatch
from sendense.engine import retention as retention_engine
from sendense.engine import verify as verification
from sendense.engine.backup import BackupRequest
from sendense.policy.retention import RetentionRules
from sendense.policy.schedule import Window
from sendense.scheduler import events
from sendense.scheduler.selector import matched_vms

if TYPE_CHECKING:
    from sendense.hub.state import HubState

log = logging.getLogger(__name__)

# Item statuses.
QUEUED = "queued"
STARTING = "starting"
STARTED = "started"
VERIFYING = "verifying"
RETAINING = "retaining"
DONE = "done"
FAILED = "failed"
SKIPPED = "skipped"
ENDED = (DONE, FAILED, SKIPPED)
FOLLOWING = (STARTED, VERIFYING, RETAINING)

# A claimed item whose start never got recorded (its hub died in between)
# goes back to the queue after this long.
STARTING_STALE = timedelta(minutes=10)
# Refusals that mean "not now": the VM has another job, or no port / node
# answered. Busy is retried for the whole run; unavailable this many times.
BUSY_CODES = frozenset({"disk_busy", "busy"})
UNAVAILABLE_ATTEMPTS = 5


def retry_delay(attempts: int) -> timedelta:
    """Backoff before the ``attempts``-th retry: 15 s, 30 s, ... at most 5 min."""
    return timedelta(seconds=min(15 * 2 ** max(attempts - 1, 0), 300))


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC)


def lock_row(s: Session, model: Any, row_id: str) -> None:
    """Serialize with other writers of this row (and on SQLite, of the catalog):
    PostgreSQL ``SELECT ... FOR UPDATE``; SQLite a write first, which takes the
    database's write lock and makes later reads see every earlier commit."""
    if s.get_bind().dialect.name == "sqlite":
        s.execute(update(model).where(model.id == row_id).values(id=model.id))
    else:
        s.execute(select(model.id).where(model.id == row_id).with_for_update())


# ------------------------------------------------------------------ create


def create_run(
    s: Session,
    policy: Policy,
    *,
    scheduled_at: datetime,
    trigger: str,
    now: datetime,
    missed_count: int = 0,
    first_missed: datetime | None = None,
    claimed_by: str | None = None,
    created_by: str = "scheduler",
) -> PolicyRun:
    """Insert the run and one queued item per matched VM (flushed: a second
    insert of the same ``(policy, scheduled_at)`` raises ``IntegrityError``
    here, which is how a claim is lost). Queued items of the policy's older
    runs are skipped: this run takes their place."""
    run = PolicyRun(
        policy_id=policy.id,
        scheduled_at=scheduled_at,
        trigger=trigger,
        missed_count=missed_count,
        status="running",
        claimed_by=claimed_by,
        created_at=now,
        summary={
            "created_by": created_by,
            "first_missed": first_missed.isoformat() if first_missed else None,
            "vms": {},
        },
    )
    s.add(run)
    s.flush()
    s.execute(
        update(PolicyRunVm)
        .where(
            PolicyRunVm.policy_id == policy.id,
            PolicyRunVm.run_id != run.id,
            PolicyRunVm.status == QUEUED,
        )
        .values(
            status=SKIPPED,
            reason=f"superseded by run {run.id} ({trigger}, {scheduled_at.isoformat()})",
            updated_at=now,
        )
    )
    vms = matched_vms(s, policy)
    node_of = dict(
        s.execute(
            select(Vm.id, Source.node_id)
            .join(Source, Source.id == Vm.source_id)
            .where(Vm.id.in_([vm.id for vm in vms]))
        ).all()
    )
    for vm in vms:
        s.add(
            PolicyRunVm(
                run_id=run.id,
                policy_id=policy.id,
                vm_id=vm.id,
                node_id=node_of.get(vm.id),
                status=QUEUED,
                created_at=now,
                updated_at=now,
            )
        )
    if not vms:
        run.summary = {**run.summary, "warning": "the policy's selector matched no VM"}
    s.flush()
    return run


def run_policy_now(
    st: HubState, policy_id: str, *, created_by: str, now: datetime | None = None
) -> dict[str, Any]:
    """Run a policy now (``POST /api/v1/policies/{id}/run``): a ``manual``
    run of every VM its selector matches, started at once as far as the
    per-node limit and busy VMs allow (the rest stay queued; the scheduler
    starts them later). Ignores the window. Answers ``{"run_id", "job_ids",
    "queued": [vm names], "skipped": [{"vm_name", "reason"}]}``
    (``skipped``: could not start, e.g. 409 ``no_parent``); `NotFound` for an
    unknown policy."""
    now = _now(now)
    for attempt in range(3):
        try:
            with st.db.session() as s:
                policy = s.get(Policy, policy_id)
                if policy is None:
                    raise NotFound(f"policy {policy_id} not found", policy_id=policy_id)
                run = create_run(
                    s,
                    policy,
                    # A scheduled run (or another manual one) may hold this
                    # very time: the next microsecond then.
                    scheduled_at=now + timedelta(microseconds=attempt),
                    trigger="manual",
                    now=now,
                    claimed_by=getattr(st.lifecycle, "owner", None),
                    created_by=created_by,
                )
                run_id = run.id
            break
        except IntegrityError:
            if attempt == 2:
                raise
    log.info("policy run created policy_id=%s run_id=%s trigger=manual", policy_id, run_id)
    drain(st, now, run_id=run_id)
    with st.db.session() as s:
        rows = s.execute(
            select(PolicyRunVm.status, PolicyRunVm.job_id, PolicyRunVm.reason, Vm.name)
            .join(Vm, Vm.id == PolicyRunVm.vm_id)
            .where(PolicyRunVm.run_id == run_id)
            .order_by(Vm.name)
        ).all()
    finish_runs(st, now, run_ids=[run_id])
    return {
        "run_id": run_id,
        "job_ids": [r.job_id for r in rows if r.job_id and r.status not in (FAILED, SKIPPED)],
        "queued": [r.name for r in rows if r.status in (QUEUED, STARTING)],
        "skipped": [
            {"vm_name": r.name, "reason": r.reason} for r in rows if r.status in (FAILED, SKIPPED)
        ],
    }


# ------------------------------------------------------------------- drain


@dataclass(frozen=True)
class _Candidate:
    item_id: str
    run_id: str
    node_id: str | None
    vm_id: str
    vm_name: str
    policy_id: str
    policy_name: str
    repository_id: str
    full_every: int | None
    trigger: str
    missed_count: int
    scheduled_at: datetime
    first_missed: str | None
    created_by: str
    attempts: int


def _window_open(window: dict[str, Any] | None, timezone: str, now: datetime) -> bool:
    try:
        parsed = Window.parse(window) if window else None
        return parsed is None or parsed.contains(now, timezone)
    except Error as e:  # the API refuses such a window; a row edited by hand
        log.warning(
            "policy window unusable, ignored window=%r timezone=%r: %s", window, timezone, e
        )
        return True


def _candidates(
    s: Session, now: datetime, run_id: str | None, node_id: str | None = None
) -> list[_Candidate]:
    q = (
        select(
            PolicyRunVm.id,
            PolicyRunVm.run_id,
            PolicyRunVm.node_id,
            PolicyRunVm.vm_id,
            PolicyRunVm.attempts,
            Vm.name,
            Policy.id,
            Policy.name,
            Policy.repository_id,
            Policy.full_every,
            Policy.window,
            Policy.timezone,
            PolicyRun.trigger,
            PolicyRun.missed_count,
            PolicyRun.scheduled_at,
            PolicyRun.summary,
        )
        .join(PolicyRun, PolicyRun.id == PolicyRunVm.run_id)
        .join(Policy, Policy.id == PolicyRunVm.policy_id)
        .join(Vm, Vm.id == PolicyRunVm.vm_id)
        .where(
            PolicyRunVm.status == QUEUED,
            PolicyRun.status == "running",
            or_(PolicyRunVm.not_before.is_(None), PolicyRunVm.not_before <= now),
        )
        .order_by(PolicyRun.created_at, PolicyRunVm.created_at, Vm.name)
    )
    if run_id is not None:
        q = q.where(PolicyRunVm.run_id == run_id)
    if node_id is not None:
        q = q.where(PolicyRunVm.node_id == node_id)
    out = []
    for r in s.execute(q).all():
        (item_id, rid, node_id, vm_id, attempts, vm_name, pid, pname, repo_id, full_every) = r[:10]
        window, timezone, trigger, missed, scheduled_at, summary = r[10:]
        if trigger != "manual" and not _window_open(window, timezone, now):
            continue
        summary = summary or {}
        out.append(
            _Candidate(
                item_id,
                rid,
                node_id,
                vm_id,
                vm_name,
                pid,
                pname,
                repo_id,
                full_every,
                trigger,
                missed,
                scheduled_at,
                summary.get("first_missed"),
                summary.get("created_by") or "scheduler",
                attempts,
            )
        )
    return out


def oldest_waiting(s: Session, node_id: str, now: datetime) -> datetime | None:
    """When the longest-waiting entry that could start now on the node
    (window open, retry time passed) was queued; None: no such entry.

    Queued backups (engine/dispatch.py) are claimed the moment a slot frees,
    entries at the scheduler's next tick: a queued backup younger than such
    an entry lets it go first, so a stream of manual backups on a full node
    cannot starve a policy's VMs."""
    items = [c.item_id for c in _candidates(s, now, None, node_id)]
    if not items:
        return None
    return s.scalar(select(func.min(PolicyRunVm.created_at)).where(PolicyRunVm.id.in_(items)))


def running_on_node(s: Session, node_id: str) -> int:
    """Slots of the node in use (any hub process, any backup): the count
    every start is limited by (engine/dispatch.py `occupied`)."""
    return dispatch.occupied(s, node_id)


def _backup_type(s: Session, c: _Candidate) -> str:
    """``full`` for the VM's first run under the policy and every
    ``full_every``-th after it, else ``incremental``."""
    earlier = s.execute(
        select(func.count())
        .select_from(PolicyRunVm)
        .where(
            PolicyRunVm.policy_id == c.policy_id,
            PolicyRunVm.vm_id == c.vm_id,
            PolicyRunVm.job_id.is_not(None),
            PolicyRunVm.id != c.item_id,
        )
    ).scalar_one()
    if earlier == 0 or (c.full_every and earlier % c.full_every == 0):
        return "full"
    return "incremental"


def _claim(s: Session, c: _Candidate, now: datetime, settings: Any) -> str | None:
    """``queued -> starting`` under the node's lock if the node has room;
    the backup type to start, or None (no room, or another hub took it)."""
    if c.node_id is not None:
        dispatch.lock_node(s, c.node_id)
        if dispatch.node_full(s, c.node_id, settings) is not None:
            return None
    backup_type = _backup_type(s, c)
    taken = s.execute(
        update(PolicyRunVm)
        .where(PolicyRunVm.id == c.item_id, PolicyRunVm.status == QUEUED)
        .values(
            status=STARTING,
            attempts=PolicyRunVm.attempts + 1,
            backup_type=backup_type,
            updated_at=now,
        )
    )
    return backup_type if getattr(taken, "rowcount", 0) == 1 else None


def job_tags(c: _Candidate) -> dict[str, str]:
    """What a policy job carries: which policy and run, and for a run that
    stands for missed ones, how many and since when."""
    tags = {
        "policy": c.policy_name,
        "policy_id": c.policy_id,
        "policy_run_id": c.run_id,
        "trigger": c.trigger,
        "scheduled_at": c.scheduled_at.isoformat(),
    }
    if c.trigger == "missed":
        tags["missed_runs"] = str(c.missed_count)
        if c.first_missed:
            tags["first_missed"] = c.first_missed
    return tags


def drain(st: HubState, now: datetime | None = None, *, run_id: str | None = None) -> list[str]:
    """Start what may start now of the queued items (of one run, or all):
    oldest run first, per-node limit (engine/dispatch.py: the node's
    ``max_jobs`` or SENDENSE_NODE_JOB_LIMIT, 0: none), windows. The ids of
    the jobs started."""
    now = _now(now)
    with st.db.session() as s:
        candidates = _candidates(s, now, run_id)
    full_nodes: set[str | None] = set()
    started = []
    for c in candidates:
        if c.node_id in full_nodes:
            continue
        with st.db.session() as s:
            backup_type = _claim(s, c, now, st.settings)
        if backup_type is None:
            if c.node_id is not None:
                with st.db.session() as s:
                    if dispatch.node_full(s, c.node_id, st.settings) is not None:
                        full_nodes.add(c.node_id)
            continue
        job_id = _start(st, c, backup_type, now)
        if job_id is not None:
            started.append(job_id)
    return started


def _start(st: HubState, c: _Candidate, backup_type: str, now: datetime) -> str | None:
    """Start the claimed item's backup; record the outcome on the item."""
    values: dict[str, Any]
    job_id: str | None = None
    try:
        job_id = st.engine.start(
            BackupRequest(
                vm_name=c.vm_name,
                repository_id=c.repository_id,
                backup_type="full" if backup_type == "full" else "auto",
                tags=job_tags(c),
                created_by=c.created_by,
                reserved=True,  # the item's claim holds the node's slot
            )
        )
        values = {"status": STARTED, "job_id": job_id, "reason": None, "not_before": None}
        log.info(
            "policy job started policy_id=%s run_id=%s vm=%s job_id=%s type=%s",
            c.policy_id,
            c.run_id,
            c.vm_name,
            job_id,
            backup_type,
        )
    except Exception as e:
        code = e.code if isinstance(e, Error) else "internal_error"
        attempts = c.attempts + 1
        retry = (isinstance(e, Conflict) and code in BUSY_CODES) or (
            isinstance(e, Unavailable) and attempts < UNAVAILABLE_ATTEMPTS
        )
        if retry:
            values = {
                "status": QUEUED,
                "not_before": now + retry_delay(attempts),
                "reason": f"waiting ({code}): {e}",
            }
            log.info(
                "policy job deferred policy_id=%s run_id=%s vm=%s code=%s attempt=%d",
                c.policy_id,
                c.run_id,
                c.vm_name,
                code,
                attempts,
            )
        else:
            if not isinstance(e, Error):
                log.exception("policy job start failed vm=%s run_id=%s", c.vm_name, c.run_id)
            failed_job = e.details.get("job_id") if isinstance(e, Error) else None
            values = {"status": FAILED, "reason": f"{code}: {e}", "job_id": failed_job}
            log.warning(
                "policy job refused policy_id=%s run_id=%s vm=%s code=%s: %s",
                c.policy_id,
                c.run_id,
                c.vm_name,
                code,
                e,
            )
        job_id = None
    with st.db.session() as s:
        if values["status"] == QUEUED:
            newer = _newer_run(s, c)
            if newer is not None:  # created while this one was being tried
                values = {"status": SKIPPED, "reason": f"superseded by run {newer}"}
        s.execute(
            update(PolicyRunVm)
            .where(PolicyRunVm.id == c.item_id, PolicyRunVm.status == STARTING)
            .values(updated_at=now, **values)
        )
        if values["status"] in (STARTED, FAILED):
            _note(
                s,
                c.run_id,
                c.vm_name,
                status=values["status"],
                backup_job_id=values["job_id"],
                backup_type=backup_type,
                reason=values["reason"],
            )
    return job_id


def _newer_run(s: Session, c: _Candidate) -> str | None:
    """A later run of the policy that has this VM too (it takes the place of
    this item when the item goes back to the queue)."""
    return s.execute(
        select(PolicyRun.id)
        .join(PolicyRunVm, PolicyRunVm.run_id == PolicyRun.id)
        .where(
            PolicyRun.policy_id == c.policy_id,
            PolicyRun.id != c.run_id,
            PolicyRun.created_at > s.get_one(PolicyRun, c.run_id).created_at,
            PolicyRunVm.vm_id == c.vm_id,
        )
        .limit(1)
    ).scalar_one_or_none()


def recover_starting(st: HubState, now: datetime | None = None) -> int:
    """Items left ``starting`` by a hub that died: back to the queue (the
    engine's busy check refuses a second job if the first one did start)."""
    now = _now(now)
    stale = and_(PolicyRunVm.status == STARTING, PolicyRunVm.updated_at < now - STARTING_STALE)
    with st.db.session() as s:
        # Read first: every tick calls this, and a write (even of no row)
        # would take SQLite's write lock each time.
        if s.execute(select(PolicyRunVm.id).where(stale).limit(1)).first() is None:
            return 0
        result = s.execute(
            update(PolicyRunVm)
            .where(stale)
            .values(status=QUEUED, reason="requeued: the hub that claimed it stopped")
        )
        return int(getattr(result, "rowcount", 0) or 0)


# --------------------------------------------------------------- follow-up


def _note(s: Session, run_id: str, vm_name: str, **values: Any) -> None:
    """Merge ``values`` into ``summary["vms"][vm_name]`` (run row locked)."""
    lock_row(s, PolicyRun, run_id)
    run = s.execute(
        select(PolicyRun).where(PolicyRun.id == run_id).execution_options(populate_existing=True)
    ).scalar_one()
    summary = dict(run.summary or {})
    vms = dict(summary.get("vms") or {})
    vms[vm_name] = {**(vms.get(vm_name) or {}), **values}
    summary["vms"] = vms
    run.summary = summary


def follow_up(st: HubState, now: datetime | None = None) -> int:
    """Advance every item whose backup, verify or retention job ended; how
    many moved."""
    now = _now(now)
    with st.db.session() as s:
        # Started items only once their backup job ended (most ticks find
        # them running: one query, not one per item).
        rows = s.execute(
            select(PolicyRunVm.id, PolicyRunVm.status)
            .join(BackupJob, BackupJob.id == PolicyRunVm.job_id, isouter=True)
            .where(
                or_(
                    PolicyRunVm.status.in_((VERIFYING, RETAINING)),
                    and_(
                        PolicyRunVm.status == STARTED,
                        or_(BackupJob.id.is_(None), BackupJob.status.not_in(ACTIVE)),
                    ),
                )
            )
        ).all()
    moved = 0
    for item_id, status in rows:
        try:
            launch = _advance(st, item_id, status, now)
        except Exception:
            log.exception("policy follow-up failed item_id=%s status=%s", item_id, status)
            continue
        if launch is None:
            continue
        moved += 1
        for job_id in launch:
            st.lifecycle.launch(job_id)
    return moved


def _ended(s: Session, job_ids: Iterable[str]) -> list[BackupJob] | None:
    """The jobs, if all of them ended (None: one still runs)."""
    jobs = [s.get(BackupJob, j) for j in job_ids]
    if any(j is not None and j.status in ACTIVE for j in jobs):
        return None
    return [j for j in jobs if j is not None]


def _verify_failed(job: BackupJob) -> bool:
    return job.kind == verification.KIND and (job.result or {}).get("verify_status") == "failed"


def _job_error(job: BackupJob) -> str:
    if job.status == "completed" and _verify_failed(job):
        result = job.result or {}
        return (
            f"verify job {job.id}: restore point {result.get('backup_id') or '?'} failed "
            f"verification ({result.get('verify_error') or 'no detail'})"
        )
    detail = ": ".join(x for x in (job.error_code, job.error_message) if x)
    return f"{job.kind} job {job.id} {job.status}" + (f" ({detail})" if detail else "")


def _advance(st: HubState, item_id: str, status: str, now: datetime) -> list[str] | None:
    """One item's next step if its current job ended: the local jobs to
    launch after the commit (None: nothing changed)."""
    with st.db.session() as s:
        item = s.get(PolicyRunVm, item_id)
        if item is None:
            return None
        # Cheap check before taking the run's lock: most ticks find jobs running.
        run = s.get(PolicyRun, item.run_id)
        vm = s.get(Vm, item.vm_id)
        vm_name = vm.name if vm is not None else item.vm_id
        mine = ((run.summary if run else None) or {}).get("vms", {}).get(vm_name) or {}
        waiting_on = {
            STARTED: [item.job_id] if item.job_id else [],
            VERIFYING: list(mine.get("verify_job_ids") or []),
            RETAINING: [mine["retention_job_id"]] if mine.get("retention_job_id") else [],
        }[status]
        if _ended(s, waiting_on) is None:
            return None
    with st.db.session() as s:
        lock_row(s, PolicyRun, item.run_id)
        item = s.execute(
            select(PolicyRunVm)
            .where(PolicyRunVm.id == item_id)
            .execution_options(populate_existing=True)
        ).scalar_one()
        if item.status != status:
            return None  # another hub process moved it meanwhile
        policy = s.get(Policy, item.policy_id)
        jobs = _ended(s, waiting_on) or []
        # A verify job completes even when the restore point is bad: its
        # result says (engine/verify.py).
        failed = [j for j in jobs if j.status != "completed" or _verify_failed(j)]
        launch: list[str] = []
        if status == STARTED and (failed or not jobs):
            _finish_item(
                s,
                item,
                vm_name,
                now,
                FAILED,
                _job_error(failed[0])
                if failed
                else f"backup job {item.job_id} is gone from the catalog",
            )
        elif status == STARTED and policy is not None and policy.verify_after:
            launch = _start_verify(st, s, item, policy, vm_name, now)
        elif status == VERIFYING and failed:
            reason = "; ".join(_job_error(j) for j in failed)
            _finish_item(
                s,
                item,
                vm_name,
                now,
                FAILED,
                f"{reason}; retention not run (the new restore point is not verified)",
            )
        elif status in (STARTED, VERIFYING) and policy is not None:
            launch = _start_retention(st, s, item, policy, vm_name, now)
        elif status == RETAINING and failed:
            _finish_item(s, item, vm_name, now, FAILED, _job_error(failed[0]))
        elif status == RETAINING:
            _finish_item(s, item, vm_name, now, DONE, f"{item.reason} completed")
        else:  # the policy is gone: nothing more to do for this VM
            _finish_item(s, item, vm_name, now, DONE, "backup completed; the policy was deleted")
    return launch


def _append(reason: str | None, text: str) -> str:
    return f"{reason}; {text}" if reason else text


def _finish_item(
    s: Session, item: PolicyRunVm, vm_name: str, now: datetime, status: str, reason: str
) -> None:
    item.status = status
    item.reason = reason
    item.updated_at = now
    _note(s, item.run_id, vm_name, status=status, reason=reason)


def follow_up_tags(item: PolicyRunVm, policy: Policy) -> dict[str, str]:
    """What a policy's verify and retention jobs carry, like its backup jobs:
    policy-scoped webhooks hear of them too."""
    return {"policy": policy.name, "policy_id": policy.id, "policy_run_id": item.run_id}


def _start_verify(
    st: HubState, s: Session, item: PolicyRunVm, policy: Policy, vm_name: str, now: datetime
) -> list[str]:
    """A verify job per restore point the backup made (``verifying``)."""
    delete.lock_vm(s, item.vm_id)  # as POST /backups/{id}/verify does
    points = s.scalars(
        select(Backup)
        .where(Backup.job_id == item.job_id, Backup.status == "completed")
        .order_by(Backup.disk_index)
    ).all()
    job_ids = []
    errors = []
    for b in points:
        try:
            params = verification.plan_verify(s, b)
        except Error as e:
            errors.append(f"verify of {b.id} refused ({e.code}: {e})")
            continue
        job = st.lifecycle.new_local_job(
            s,
            verification.KIND,
            params,
            vm_id=b.vm_id,
            repository_id=b.repository_id,
            created_by="scheduler",
            holds=params["backup_ids"],
            tags=follow_up_tags(item, policy),
        )
        job_ids.append(job.id)
    if errors or not job_ids:
        reason = "; ".join(errors) or f"backup job {item.job_id} made no restore point to verify"
        _finish_item(s, item, vm_name, now, FAILED, f"{reason}; retention not run")
        return job_ids
    item.status = VERIFYING
    item.reason = f"verify job(s) {', '.join(job_ids)}"
    item.updated_at = now
    _note(s, item.run_id, vm_name, status=VERIFYING, verify_job_ids=job_ids)
    return job_ids


def _start_retention(
    st: HubState, s: Session, item: PolicyRunVm, policy: Policy, vm_name: str, now: datetime
) -> list[str]:
    """Retention of the VM with the policy's rules (``retaining``), or done
    when it removes nothing."""
    verified = f"{item.reason} completed" if item.status == VERIFYING and item.reason else None
    try:
        rules = RetentionRules.from_dict(policy.retention)
        if rules.empty:
            _finish_item(
                s, item, vm_name, now, DONE, _append(verified, "retention: the policy keeps all")
            )
            return []
        delete.lock_vm(s, item.vm_id)
        plan = retention_engine.plan_for_vm(
            s, item.vm_id, rules, now, policy.timezone, repository_id=policy.repository_id
        )
        if not retention_engine.removed_ids(plan):
            _finish_item(
                s, item, vm_name, now, DONE, _append(verified, "retention: nothing to remove")
            )
            return []
        job = retention_engine.new_retention_job(
            st, s, plan, created_by="scheduler", tags=follow_up_tags(item, policy)
        )
    except Error as e:
        _finish_item(
            s, item, vm_name, now, FAILED, _append(verified, f"retention refused ({e.code}: {e})")
        )
        return []
    item.status = RETAINING
    item.reason = _append(verified, f"retention job {job.id}")
    item.updated_at = now
    _note(s, item.run_id, vm_name, status=RETAINING, retention_job_id=job.id)
    return [job.id]


# ------------------------------------------------------------------ finish


def finish_runs(
    st: HubState, now: datetime | None = None, *, run_ids: Iterable[str] | None = None
) -> list[str]:
    """End the runs whose items all ended; their ids."""
    now = _now(now)
    with st.db.session() as s:
        q = select(PolicyRun.id).where(PolicyRun.status == "running")
        if run_ids is not None:
            q = q.where(PolicyRun.id.in_(list(run_ids)))
        running = list(s.scalars(q).all())
        if not running:
            return []
        counts: dict[str, dict[str, int]] = defaultdict(dict)
        for rid, status, n in s.execute(
            select(PolicyRunVm.run_id, PolicyRunVm.status, func.count())
            .where(PolicyRunVm.run_id.in_(running))
            .group_by(PolicyRunVm.run_id, PolicyRunVm.status)
        ).all():
            counts[rid][status] = int(n)
    finished = []
    for rid in running:
        c = counts.get(rid, {})
        if any(status not in ENDED for status in c):
            continue
        if _finish_run(st, rid, c, now):
            finished.append(rid)
    return finished


def run_status(counts: dict[str, int]) -> str:
    """A run's end from its entries' ends: ``completed`` (all done, or no VM
    matched), ``partial`` (some done), ``failed`` (none done, some failed),
    ``skipped`` (every VM superseded before it could start: no backup)."""
    done, failed, skipped = (counts.get(s, 0) for s in (DONE, FAILED, SKIPPED))
    if not failed and not skipped:
        return "completed"
    if done:
        return "partial"
    return "failed" if failed else "skipped"


def _finish_run(st: HubState, run_id: str, counts: dict[str, int], now: datetime) -> bool:
    status = run_status(counts)
    with st.db.session() as s:
        lock_row(s, PolicyRun, run_id)
        run = s.execute(
            select(PolicyRun)
            .where(PolicyRun.id == run_id)
            .execution_options(populate_existing=True)
        ).scalar_one()
        if run.status != "running":
            return False
        failures = [
            {"vm_name": name, "reason": r.reason}
            for r, name in s.execute(
                select(PolicyRunVm, Vm.name)
                .join(Vm, Vm.id == PolicyRunVm.vm_id)
                .where(PolicyRunVm.run_id == run_id, PolicyRunVm.status == FAILED)
                .order_by(Vm.name)
            ).all()
        ]
        run.status = status
        run.finished_at = now
        run.summary = {**(run.summary or {}), "counts": dict(counts), "failed": failures}
        policy = s.get(Policy, run.policy_id)
        events.emit(
            s,
            events.RUN_FINISHED,
            {
                "policy_id": run.policy_id,
                "policy": policy.name if policy else None,
                "run_id": run.id,
                "trigger": run.trigger,
                "status": status,
                "counts": dict(counts),
                "failed": failures,
            },
            policy_id=run.policy_id,
        )
    log.info("policy run finished run_id=%s status=%s counts=%s", run_id, status, counts)
    return True
