"""When a policy runs: 5-field cron expressions in a time zone, due runs, windows.

Pure helpers over `cronsim <https://github.com/cuu508/cronsim>`_ (maintained,
Debian cron semantics: day-of-month and day-of-week are OR-ed unless one of
them starts with ``*``; a daily job at a local time skipped by a DST jump
runs once at the first valid minute, and once only in the repeated hour).
Nothing here reads the clock or the catalog: the scheduler passes ``now``
and the last run times.

- `Schedule.parse(expression, timezone)`: validates (400 ``invalid_request``
  naming the field), `Schedule.next_runs(after, count)`.
- `due(schedule, last_run, now)`: the run to start now, if any. Missed runs
  collapse to one: after a downtime the policy runs once, for its newest
  scheduled time, and the `DueRun` says how many runs that one stands for::

      last_run                                now     (x: scheduled times)
         |-------------x------x------x-------|
                       ^ first_missed^ scheduled_at, missed = 2

- `Window.parse({"start": "HH:MM", "end": "HH:MM"})`, `Window.contains(now, tz)`:
  a start later than the end wraps midnight (22:00-06:00).

All datetimes in and out are timezone-aware; results are in UTC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError

from sendense.core.errors import InvalidRequest
from sendense.policy.retention import zone

FIELDS = "minute hour day-of-month month day-of-week"
# Missed runs are counted up to this many (a per-minute schedule after a
# month of downtime would otherwise iterate 43,200 times on start).
MISSED_COUNT_LIMIT = 1000


def _aware(t: datetime, name: str) -> datetime:
    if t.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware")
    return t


@dataclass(frozen=True)
class Schedule:
    """A validated 5-field cron expression and the time zone it is read in."""

    expression: str
    tz: ZoneInfo

    @classmethod
    def parse(cls, expression: str, timezone: str | ZoneInfo | None = None) -> Schedule:
        """Validate ``expression`` (exactly 5 fields) and ``timezone`` (IANA
        name, default UTC); `InvalidRequest` with ``field`` = ``schedule`` or
        ``timezone`` and a message saying what is wrong."""
        tz = zone(timezone)
        text = " ".join(str(expression or "").split())
        fields = text.split(" ") if text else []
        if len(fields) != 5:
            raise InvalidRequest(
                f"schedule {expression!r} has {len(fields)} field(s); a cron expression "
                f"has 5: {FIELDS} (e.g. '0 2 * * *': every day at 02:00)",
                field="schedule",
            )
        try:
            it = CronSim(text, datetime(2000, 1, 1, tzinfo=tz))
        except CronSimError as e:
            raise InvalidRequest(
                f"schedule {expression!r}: {e} (fields: {FIELDS})", field="schedule"
            ) from e
        try:
            next(it)
        except StopIteration as e:
            raise InvalidRequest(
                f"schedule {expression!r} never runs (no matching date)", field="schedule"
            ) from e
        return cls(text, tz)

    def describe(self) -> str:
        """A sentence for people (``At 02:00``), best effort."""
        try:
            return str(CronSim(self.expression, datetime.now(self.tz)).explain())
        except Exception:  # explain() is best effort in cronsim
            return self.expression

    def next_run(self, after: datetime) -> datetime | None:
        """The first scheduled time strictly after ``after`` (None: never again)."""
        it = CronSim(self.expression, _aware(after, "after").astimezone(self.tz))
        try:
            return next(it).astimezone(UTC)
        except StopIteration:
            return None

    def next_runs(self, after: datetime, count: int = 3) -> list[datetime]:
        """The next ``count`` scheduled times strictly after ``after``, in UTC."""
        it = CronSim(self.expression, _aware(after, "after").astimezone(self.tz))
        out: list[datetime] = []
        for t in it:
            out.append(t.astimezone(UTC))
            if len(out) >= count:
                break
        return out

    def latest_run(self, at: datetime) -> datetime | None:
        """The newest scheduled time at or before ``at`` (None: none in 50 years)."""
        # cronsim steps back one second before matching; start one second
        # later so that ``at`` itself counts.
        start = _aware(at, "at").replace(microsecond=0) + timedelta(seconds=1)
        it = CronSim(self.expression, start.astimezone(self.tz), reverse=True)
        try:
            return next(it).astimezone(UTC)
        except StopIteration:
            return None


@dataclass(frozen=True)
class DueRun:
    """A run to start now: its scheduled time, and the runs it stands for.

    ``missed``: scheduled times after the last run and before
    ``scheduled_at`` that did not run (collapsed into this one), counted up
    to `MISSED_COUNT_LIMIT`; ``first_missed``: the oldest of them.
    """

    scheduled_at: datetime
    missed: int = 0
    first_missed: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheduled_at": self.scheduled_at.isoformat(),
            "missed": self.missed,
            "first_missed": self.first_missed.isoformat() if self.first_missed else None,
        }


def due(schedule: Schedule, last_run: datetime, now: datetime) -> DueRun | None:
    """The run due at ``now`` given the last one, or None.

    ``last_run``: the scheduled time of the last run (or, for a policy that
    never ran, when it was created or enabled: a new policy does not run for
    times before it existed). One forward step when nothing is due, so the
    scheduler can call this for every policy on every tick.
    """
    first = schedule.next_run(last_run)
    if first is None or first > _aware(now, "now"):
        return None
    latest = schedule.latest_run(now)
    assert latest is not None and latest >= first
    if latest == first:
        return DueRun(first)
    missed = 1
    it = CronSim(schedule.expression, first.astimezone(schedule.tz))
    for t in it:
        if t.astimezone(UTC) >= latest or missed >= MISSED_COUNT_LIMIT:
            break
        missed += 1
    return DueRun(latest, missed=missed, first_missed=first)


def due_runs(
    schedules: Mapping[str, Schedule], last_runs: Mapping[str, datetime], now: datetime
) -> dict[str, DueRun]:
    """`due` for many policies (keyed alike): only the ones due now."""
    out = {}
    for key, schedule in schedules.items():
        run = due(schedule, last_runs[key], now)
        if run is not None:
            out[key] = run
    return out


@dataclass(frozen=True)
class Window:
    """Local hours in which a policy's jobs may start (``start`` inclusive,
    ``end`` exclusive); ``start > end`` wraps midnight, ``start == end`` is
    the whole day."""

    start: time
    end: time

    @classmethod
    def parse(cls, window: Mapping[str, Any] | None) -> Window | None:
        """From ``{"start": "HH:MM", "end": "HH:MM"}`` (None: no window)."""
        if window is None:
            return None
        try:
            return cls(_hhmm(window["start"]), _hhmm(window["end"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidRequest(
                f"window {dict(window)!r} must be {{'start': 'HH:MM', 'end': 'HH:MM'}}",
                field="window",
            ) from e

    def contains(self, now: datetime, tz: str | ZoneInfo | None = None) -> bool:
        local = _aware(now, "now").astimezone(zone(tz)).time().replace(tzinfo=None)
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def to_dict(self) -> dict[str, str]:
        return {"start": self.start.strftime("%H:%M"), "end": self.end.strftime("%H:%M")}


def _hhmm(text: Any) -> time:
    hours, _, minutes = str(text).partition(":")
    if len(hours) != 2 or len(minutes) != 2 or not (hours + minutes).isdigit():
        raise ValueError(text)
    return time(int(hours), int(minutes))
