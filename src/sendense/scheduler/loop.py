"""The scheduler loop inside the hub: claim due runs, drain queues, follow up.

Each tick (every ``settings.scheduler_interval`` seconds, `Scheduler.tick`):

1. due set (`due_set`, pure): for each enabled policy, the scheduled times
   since its ``last_scheduled_at`` (``created_at`` for a policy that never
   ran) up to now. Several of them (the hub was down) collapse into ONE run,
   for the newest time, with trigger ``missed`` and ``missed_count`` = the
   older ones it stands for; its jobs carry ``trigger=missed``,
   ``missed_runs`` and ``first_missed`` tags, the audit log gets an entry
   (route ``scheduler``) and `events` a ``run.missed``.
2. claim: insert the `PolicyRun` row; the unique ``(policy_id,
   scheduled_at)`` makes the insert of a second hub process on the same
   catalog fail (``IntegrityError``: that hub skips it), so a scheduled run
   starts once whatever the number of hubs. The same transaction advances
   ``last_scheduled_at`` and queues the matched VMs (`runs.create_run`).
3. follow-up, drain, finish (`runs`): verify/retention after ended backups,
   start queued items (windows, per-node limit, busy VMs later), end runs.

Time comes from a `Clock` (``now()``, ``sleep()``), injected: tests drive a
fake one, the hub uses `SystemClock`. Cost: the due set of 1,000 policies is
a comparison per policy once each policy's next time is known (kept in a
`DueCache` keyed by schedule, time zone and last run); cronsim is asked
again only for a policy whose time came or whose schedule changed.

Several API worker processes (hub/serve.py): only worker 0 (the parent
process, which also migrates and recovers) runs the loop; the others serve
the API only. Several hub hosts on one PostgreSQL all run it and rely on
the claim (and on the conditional writes of `runs`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NamedTuple, Protocol

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sendense.catalog.models import AuditEntry, Policy
from sendense.core.errors import Error
from sendense.policy.schedule import Schedule, due
from sendense.scheduler import events, runs

if TYPE_CHECKING:
    from sendense.hub.state import HubState

log = logging.getLogger(__name__)


class Clock(Protocol):
    def now(self) -> datetime: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock; ``sleep`` ends early when ``interrupt`` is set."""

    def __init__(self, interrupt: threading.Event | None = None) -> None:
        self.interrupt = interrupt

    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep(self, seconds: float) -> None:
        if self.interrupt is not None:
            self.interrupt.wait(seconds)
        else:
            time.sleep(seconds)


# ------------------------------------------------------------------ due set


class PolicyTiming(NamedTuple):
    """What the due set needs of a policy: ``last`` is its
    ``last_scheduled_at`` or, if it never ran, its ``created_at``."""

    policy_id: str
    schedule: str
    timezone: str
    last: datetime


class Due(NamedTuple):
    policy_id: str
    scheduled_at: datetime
    missed_count: int


@dataclass
class DueCache:
    """Each policy's next scheduled time, by (schedule, time zone, last run):
    a tick asks cronsim only for policies whose time came or changed."""

    next_at: dict[str, tuple[tuple[str, str, datetime], datetime | None]] = field(
        default_factory=dict
    )
    schedules: dict[tuple[str, str], Schedule] = field(default_factory=dict)

    def schedule(self, expression: str, timezone: str) -> Schedule:
        key = (expression, timezone)
        found = self.schedules.get(key)
        if found is None:
            found = self.schedules[key] = Schedule.parse(expression, timezone)
        return found


def due_set(
    policies: Iterable[PolicyTiming | tuple[str, str, str, datetime]],
    now: datetime,
    cache: DueCache | None = None,
) -> list[Due]:
    """The runs due at ``now``: ``(policy_id, scheduled_at, missed_count)``
    for each policy with a scheduled time in ``(last, now]``; the newest such
    time, and how many older ones it stands for (0: none missed). A policy
    whose schedule no longer parses is logged and left out."""
    cache = cache if cache is not None else DueCache()
    out = []
    seen = set()
    for p in policies:
        policy_id, expression, timezone, last = p
        seen.add(policy_id)
        key = (expression, timezone, last)
        known = cache.next_at.get(policy_id)
        if known is not None and known[0] == key:
            first = known[1]
        else:
            try:
                first = cache.schedule(expression, timezone).next_run(last)
            except Error as e:
                log.warning("policy schedule unusable policy_id=%s: %s", policy_id, e)
                continue
            cache.next_at[policy_id] = (key, first)
        if first is None or first > now:
            continue
        run = due(cache.schedule(expression, timezone), last, now)
        if run is not None:
            out.append(Due(policy_id, run.scheduled_at, run.missed))
    for gone in cache.next_at.keys() - seen:  # deleted or disabled policies
        del cache.next_at[gone]
    return out


def since(last_scheduled_at: datetime | None, created_at: datetime) -> datetime:
    """Where a policy's due runs are counted from: its last claimed run, or
    its creation if it never ran.

    Not its last edit (``updated_at``): an edit a few seconds after a
    scheduled time, before the next tick, would silently drop that run. So a
    policy re-enabled after a while catches up once (one ``missed`` run),
    and one given a new schedule runs at once if the new schedule had a time
    since its last run; the API may set ``last_scheduled_at`` to now on such
    edits to avoid it."""
    return last_scheduled_at or created_at


# ---------------------------------------------------------------- scheduler


@dataclass
class TickReport:
    """What one tick did (logged, and read by tests)."""

    at: datetime
    claimed: list[str] = field(default_factory=list)  # run ids
    lost: list[str] = field(default_factory=list)  # policy ids another hub claimed
    started: list[str] = field(default_factory=list)  # job ids
    moved: int = 0
    finished: list[str] = field(default_factory=list)  # run ids
    due_set_ms: float = 0.0


class Scheduler:
    """The loop: `tick` now and then, in a thread (`start`/`stop`)."""

    def __init__(
        self,
        st: HubState,
        *,
        clock: Clock | None = None,
        interval: float | None = None,
        name: str | None = None,
    ) -> None:
        self.st = st
        self._stop = threading.Event()
        self.clock: Clock = clock or SystemClock(self._stop)
        self.interval = interval if interval is not None else st.settings.scheduler_interval
        self.name = name or str(getattr(st.lifecycle, "owner", "hub"))
        self.cache = DueCache()
        self._thread: threading.Thread | None = None
        # Read by GET /metrics: when the last tick ran, and how late the
        # newest claimed run started after its scheduled time.
        self.last_tick_at: datetime | None = None
        self.lag_seconds: float = 0.0

    # ----------------------------------------------------------- one tick

    def tick(self, now: datetime | None = None) -> TickReport:
        now = (now or self.clock.now()).astimezone(UTC)
        report = TickReport(now)
        self._claim_due(now, report)
        runs.recover_starting(self.st, now)
        report.moved = runs.follow_up(self.st, now)
        report.started = runs.drain(self.st, now)
        report.finished = runs.finish_runs(self.st, now)
        self.last_tick_at = now
        if report.claimed or report.started or report.finished:
            log.info(
                "scheduler tick claimed=%d started=%d moved=%d finished=%d due_set_ms=%.1f",
                len(report.claimed),
                len(report.started),
                report.moved,
                len(report.finished),
                report.due_set_ms,
            )
        return report

    def _claim_due(self, now: datetime, report: TickReport) -> None:
        with self.st.db.session() as s:
            rows = s.execute(
                select(
                    Policy.id,
                    Policy.schedule,
                    Policy.timezone,
                    Policy.last_scheduled_at,
                    Policy.created_at,
                ).where(Policy.enabled.is_(True))
            ).all()
        timings = [PolicyTiming(r[0], r[1], r[2] or "UTC", since(*r[3:])) for r in rows]
        t0 = time.perf_counter()
        due = due_set(timings, now, self.cache)
        report.due_set_ms = (time.perf_counter() - t0) * 1000
        for d in due:
            try:
                run_id = self._claim(d, now)
            except Exception:
                log.exception("policy run claim failed policy_id=%s", d.policy_id)
                continue
            if run_id is None:
                report.lost.append(d.policy_id)
            else:
                report.claimed.append(run_id)
                self.lag_seconds = max(0.0, (now - d.scheduled_at).total_seconds())

    def _claim(self, d: Due, now: datetime) -> str | None:
        """Insert the run (the claim) and advance ``last_scheduled_at``; the
        run's id, or None when another hub process claimed it first."""
        try:
            with self.st.db.session() as s:
                policy = s.get(Policy, d.policy_id)
                if policy is None or not policy.enabled:
                    return None
                last = policy.last_scheduled_at
                if last is not None and last >= d.scheduled_at:
                    return None  # claimed and committed by another hub meanwhile
                first_missed = None
                trigger = "schedule"
                if d.missed_count:
                    trigger = "missed"
                    first_missed = Schedule.parse(policy.schedule, policy.timezone).next_run(
                        since(last, policy.created_at)
                    )
                run = runs.create_run(
                    s,
                    policy,
                    scheduled_at=d.scheduled_at,
                    trigger=trigger,
                    now=now,
                    missed_count=d.missed_count,
                    first_missed=first_missed,
                    claimed_by=self.name,
                )
                s.execute(
                    update(Policy)
                    .where(
                        Policy.id == policy.id,
                        or_(
                            Policy.last_scheduled_at.is_(None),
                            Policy.last_scheduled_at < d.scheduled_at,
                        ),
                    )
                    .values(last_scheduled_at=d.scheduled_at)
                )
                if d.missed_count:
                    self._record_missed(s, policy, run.id, d, first_missed)
                run_id = run.id
        except IntegrityError:
            log.info(
                "policy run claimed by another hub policy_id=%s scheduled_at=%s",
                d.policy_id,
                d.scheduled_at.isoformat(),
            )
            return None
        log.info(
            "policy run claimed policy_id=%s run_id=%s scheduled_at=%s trigger=%s missed=%d",
            d.policy_id,
            run_id,
            d.scheduled_at.isoformat(),
            "missed" if d.missed_count else "schedule",
            d.missed_count,
        )
        return run_id

    def _record_missed(
        self, s: Session, policy: Policy, run_id: str, d: Due, first_missed: datetime | None
    ) -> None:
        """The audit log and the ``run.missed`` event, in the claim's transaction
        (so exactly once across hub processes)."""
        payload = {
            "policy_id": policy.id,
            "policy": policy.name,
            "run_id": run_id,
            "scheduled_at": d.scheduled_at.isoformat(),
            "missed_count": d.missed_count,
            "first_missed": first_missed.isoformat() if first_missed else None,
        }
        s.add(
            AuditEntry(
                at=datetime.now(UTC),
                token_name="scheduler",
                method="POST",
                route="scheduler",
                path=f"/scheduler/policies/{policy.id}/runs/{run_id}"[:1000],
                target={k: str(v)[:200] for k, v in payload.items() if v is not None},
                status=202,
            )
        )
        events.emit(s, events.RUN_MISSED, payload, policy_id=policy.id)
        log.warning(
            "policy missed runs policy=%s missed=%d first_missed=%s run_id=%s",
            policy.name,
            d.missed_count,
            payload["first_missed"],
            run_id,
        )

    # ------------------------------------------------------------- thread

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()
        log.info("scheduler started interval=%.1fs name=%s", self.interval, self.name)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick(self.clock.now())
            except Exception:
                log.exception("scheduler tick failed (next one in %.1fs)", self.interval)
            if self._stop.is_set():
                break
            self.clock.sleep(self.interval)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
