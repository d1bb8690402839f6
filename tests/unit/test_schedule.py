"""Schedules (policy/schedule.py): cron validation, next runs in a time zone,
due runs with missed runs collapsed to one, windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from sendense.core.errors import InvalidRequest
from sendense.policy.schedule import (
    MISSED_COUNT_LIMIT,
    DueRun,
    Schedule,
    Window,
    due,
    due_runs,
)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("", "0 field(s)"),
        ("* * * *", "4 field(s)"),
        ("0 * * * * *", "6 field(s)"),
        ("@daily", "1 field(s)"),
        ("61 * * * *", "Bad minute"),
        ("0 25 * * *", "Bad hour"),
        ("0 0 32 * *", "Bad day-of-month"),
        ("0 0 * 13 *", "Bad month"),
        ("0 0 * * 9", "Bad day-of-week"),
        ("0 0 31 2 *", "Bad day-of-month"),
        ("x y z w v", "Bad minute"),
    ],
)
def test_bad_expressions_are_invalid_requests_naming_the_field(expression: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        Schedule.parse(expression)
    assert e.value.details == {"field": "schedule"}
    assert words in e.value.message
    assert "minute hour day-of-month month day-of-week" in e.value.message


def test_unknown_time_zone() -> None:
    with pytest.raises(InvalidRequest) as e:
        Schedule.parse("0 2 * * *", "Europe/Atlantis")
    assert e.value.details == {"field": "timezone"}


def test_whitespace_is_normalized() -> None:
    assert Schedule.parse("  0   2 * *  * ").expression == "0 2 * * *"


@pytest.mark.parametrize(
    ("expression", "tz", "after", "expected"),
    [
        (
            "0 2 * * *",
            "UTC",
            "2026-11-23T01:00:00",
            ["2026-11-23T02:00:00", "2026-11-24T02:00:00", "2026-11-25T02:00:00"],
        ),
        # strictly after: a run at exactly ``after`` is not next
        (
            "*/15 * * * *",
            "UTC",
            "2026-11-23T10:15:00",
            ["2026-11-23T10:30:00", "2026-11-23T10:45:00", "2026-11-23T11:00:00"],
        ),
        # 02:00 in Berlin is 01:00 UTC in winter
        (
            "0 2 * * *",
            "Europe/Berlin",
            "2026-11-23T00:00:00",
            ["2026-11-23T01:00:00", "2026-11-24T01:00:00", "2026-11-25T01:00:00"],
        ),
        # across the spring DST jump (02:00-03:00 does not exist on 2026-03-29):
        # the job runs once at the first valid minute, like Debian cron
        (
            "30 2 * * *",
            "Europe/Berlin",
            "2026-03-27T12:00:00",
            ["2026-03-28T01:30:00", "2026-03-29T01:00:00", "2026-03-30T00:30:00"],
        ),
        # Mondays and Thursdays (2026-11-23 is a Monday)
        (
            "0 22 * * 1,4",
            "UTC",
            "2026-11-23T00:00:00",
            ["2026-11-23T22:00:00", "2026-11-26T22:00:00", "2026-11-30T22:00:00"],
        ),
    ],
)
def test_next_runs(expression: str, tz: str, after: str, expected: list[str]) -> None:
    got = Schedule.parse(expression, tz).next_runs(utc(after), 3)
    assert got == [utc(t) for t in expected]
    assert all(t.tzinfo == UTC for t in got)


def test_latest_run_includes_now() -> None:
    s = Schedule.parse("0 * * * *")
    assert s.latest_run(utc("2026-11-23T10:00:00")) == utc("2026-11-23T10:00:00")
    assert s.latest_run(utc("2026-11-23T10:59:59.5")) == utc("2026-11-23T10:00:00")


@pytest.mark.parametrize(
    ("last_run", "now", "expected"),
    [
        # not yet
        ("2026-11-23T10:00:00", "2026-11-23T10:59:59", None),
        # on time
        ("2026-11-23T10:00:00", "2026-11-23T11:00:00", DueRun(utc("2026-11-23T11:00:00"))),
        ("2026-11-23T10:00:00", "2026-11-23T11:00:30", DueRun(utc("2026-11-23T11:00:00"))),
        # a downtime of three and a half hours: three runs collapse into one
        (
            "2026-11-23T10:00:00",
            "2026-11-23T14:30:00",
            DueRun(utc("2026-11-23T14:00:00"), missed=3, first_missed=utc("2026-11-23T11:00:00")),
        ),
        # already ran for the newest scheduled time: nothing until the next
        ("2026-11-23T14:00:00", "2026-11-23T14:30:00", None),
    ],
)
def test_due(last_run: str, now: str, expected: DueRun | None) -> None:
    assert due(Schedule.parse("0 * * * *"), utc(last_run), utc(now)) == expected


def test_missed_runs_are_counted_up_to_a_limit() -> None:
    run = due(Schedule.parse("* * * * *"), utc("2026-01-01T00:00:00"), utc("2026-06-01T00:00:00"))
    assert run is not None
    assert run.scheduled_at == utc("2026-06-01T00:00:00")
    assert run.missed == MISSED_COUNT_LIMIT
    assert run.to_dict()["first_missed"] == "2026-01-01T00:01:00+00:00"


def test_due_runs_of_many_policies_in_their_time_zones() -> None:
    schedules = {
        "utc-2am": Schedule.parse("0 2 * * *"),
        "berlin-2am": Schedule.parse("0 2 * * *", "Europe/Berlin"),
        "hourly": Schedule.parse("0 * * * *"),
    }
    last = utc("2026-11-22T23:30:00")
    now = utc("2026-11-23T01:30:00")
    got = due_runs(schedules, dict.fromkeys(schedules, last), now)
    assert set(got) == {"berlin-2am", "hourly"}
    assert got["berlin-2am"] == DueRun(utc("2026-11-23T01:00:00"))
    assert got["hourly"].missed == 1


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError):
        Schedule.parse("0 * * * *").next_run(datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("window", "local", "inside"),
    [
        ({"start": "01:00", "end": "05:00"}, "00:59", False),
        ({"start": "01:00", "end": "05:00"}, "01:00", True),
        ({"start": "01:00", "end": "05:00"}, "04:59", True),
        ({"start": "01:00", "end": "05:00"}, "05:00", False),
        ({"start": "22:00", "end": "06:00"}, "23:00", True),
        ({"start": "22:00", "end": "06:00"}, "05:00", True),
        ({"start": "22:00", "end": "06:00"}, "12:00", False),
        ({"start": "00:00", "end": "00:00"}, "12:00", True),
    ],
)
def test_windows(window: dict, local: str, inside: bool) -> None:
    w = Window.parse(window)
    assert w is not None
    # Berlin is UTC+1 in November
    now = utc(f"2026-11-23T{local}:00") - timedelta(hours=1)
    assert w.contains(now, "Europe/Berlin") is inside
    assert w.to_dict() == window


@pytest.mark.parametrize(
    "bad",
    [{"start": "1:00", "end": "05:00"}, {"start": "25:00", "end": "05:00"}, {"start": "01:00"}],
)
def test_bad_windows(bad: dict) -> None:
    with pytest.raises(InvalidRequest) as e:
        Window.parse(bad)
    assert e.value.details == {"field": "window"}


def test_due_set_of_1000_policies_is_cheap() -> None:
    import time

    schedules = {f"p{i}": Schedule.parse(f"{i % 60} {i % 24} * * *") for i in range(1000)}
    now = utc("2026-11-23T12:00:00")
    last = {k: now - timedelta(minutes=1) for k in schedules}
    start = time.perf_counter()
    due_runs(schedules, last, now)
    assert time.perf_counter() - start < 2  # the benchmark's target is 100 ms, quiet machine
