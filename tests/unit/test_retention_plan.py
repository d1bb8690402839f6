"""Retention planning (policy/retention.py): the rules, then the chains.

The rule tables follow restic's ``ApplyPolicy`` (newest first, one keep per
bucket while counts last, the oldest point while counts are left). The chain
tables check that every removal is an action the engine can execute:
`execute` below replays a plan on the points as engine/delete.py and
engine/consolidate.py would (a delete only of a leaf, a merge only of the
oldest run of a chain into an unlocked next point), and fails otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendense.core.errors import InvalidRequest
from sendense.policy.retention import (
    RestorePoint,
    RetentionPlan,
    RetentionRules,
    apply_rules,
    plan_retention,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def linear(
    times: Sequence[str], *, fulls: Sequence[int] = (0,), **extra: dict
) -> list[RestorePoint]:
    """Points p0, p1, ... at ``times``; each an incremental of the one before,
    except the indexes in ``fulls``."""
    points = []
    for i, t in enumerate(times):
        parent = None if i in fulls else f"p{i - 1}"
        points.append(RestorePoint(f"p{i}", at(t), parent, **extra.get(f"p{i}", {})))
    return points


def kept_ids(points: Sequence[RestorePoint], rules: RetentionRules, tz: str = "UTC") -> list[str]:
    keep, _ = apply_rules(points, rules, tz)
    return sorted(keep, key=lambda x: int(x[1:]))


# ------------------------------------------------------------------ rules

HOURS = [f"2026-11-{d:02d}T{h:02d}:30:00" for d in range(1, 23) for h in (1, 13)]  # p0..p43


@pytest.mark.parametrize(
    ("rules", "times", "expected"),
    [
        # keep_last: the newest n
        (RetentionRules(keep_last=2), HOURS[:5], ["p3", "p4"]),
        (RetentionRules(keep_last=10), HOURS[:3], ["p0", "p1", "p2"]),
        # keep_daily: the newest of each of the newest n days
        (RetentionRules(keep_daily=3), HOURS[:10], ["p5", "p7", "p9"]),
        # counts left at the oldest point: it is kept too (restic)
        (RetentionRules(keep_daily=5), HOURS[:4], ["p0", "p1", "p3"]),
        # keep_hourly: two points in one hour are one bucket
        (
            RetentionRules(keep_hourly=2),
            ["2026-11-01T10:05:00", "2026-11-01T10:55:00", "2026-11-01T11:10:00"],
            ["p1", "p2"],
        ),
        # keep_weekly: ISO weeks (Monday 2026-11-16 starts week 47)
        (
            RetentionRules(keep_weekly=2),
            [
                "2026-11-08T10:00:00",
                "2026-11-14T10:00:00",
                "2026-11-15T10:00:00",
                "2026-11-16T10:00:00",
                "2026-11-20T10:00:00",
            ],
            ["p2", "p4"],
        ),
        # keep_monthly / keep_yearly
        (
            RetentionRules(keep_monthly=2),
            [
                "2026-09-30T10:00:00",
                "2026-10-01T10:00:00",
                "2026-10-31T10:00:00",
                "2026-11-01T10:00:00",
            ],
            ["p2", "p3"],
        ),
        (
            RetentionRules(keep_yearly=1, keep_last=1),
            ["2024-12-31T10:00:00", "2025-06-01T10:00:00", "2026-01-01T10:00:00"],
            ["p2"],
        ),
        # rules combine: a point kept by any rule is kept
        (RetentionRules(keep_last=1, keep_daily=2), HOURS[:6], ["p3", "p5"]),
        (RetentionRules(keep_last=3, keep_weekly=1), HOURS[:12], ["p9", "p10", "p11"]),
        (
            RetentionRules(keep_daily=2, keep_monthly=3),
            [
                "2026-09-10T10:00:00",
                "2026-10-10T10:00:00",
                "2026-10-20T10:00:00",
                "2026-11-21T10:00:00",
                "2026-11-22T10:00:00",
            ],
            ["p0", "p2", "p3", "p4"],
        ),
        # -1: every bucket
        (RetentionRules(keep_daily=-1), HOURS[:6], ["p0", "p1", "p3", "p5"]),
        # no rule at all: nothing is removed
        (RetentionRules(), HOURS[:3], ["p0", "p1", "p2"]),
    ],
)
def test_rules(rules: RetentionRules, times: list[str], expected: list[str]) -> None:
    assert kept_ids(linear(times), rules) == expected


def test_buckets_are_local_days_of_the_policy_time_zone() -> None:
    # 23:30 UTC is the next day in Berlin, and the same day in New York.
    points = linear(["2026-11-01T20:00:00", "2026-11-01T23:30:00", "2026-11-02T10:00:00"])
    rules = RetentionRules(keep_daily=2)
    assert kept_ids(points, rules, "UTC") == ["p1", "p2"]
    assert kept_ids(points, rules, "Europe/Berlin") == ["p0", "p2"]
    assert kept_ids(points, rules, "America/New_York") == ["p1", "p2"]


def test_reasons_name_every_rule_and_bucket() -> None:
    keep, remove = apply_rules(linear(HOURS[:4]), RetentionRules(keep_last=1, keep_daily=1))
    assert keep == {"p3": ["last #1", "daily 2026-11-02"]}
    assert remove == ["p2", "p1", "p0"]
    keep, _ = apply_rules(linear(HOURS[:2]), RetentionRules(keep_daily=5))
    assert keep["p0"] == ["daily 2026-11-01 (oldest point)"]


@pytest.mark.parametrize(
    "bad",
    [{"keep_last": -2}, {"keep_daily": "3"}, {"keep_last": True}, {"keep_forever": 1}],
)
def test_bad_rules_are_invalid_requests(bad: dict) -> None:
    with pytest.raises(InvalidRequest):
        RetentionRules.from_dict(bad)


def test_unknown_time_zone_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as e:
        plan_retention(linear(HOURS[:2]), RetentionRules(keep_last=1), NOW, "Mars/Olympus")
    assert e.value.details["field"] == "timezone"


# ----------------------------------------------------------------- chains


def execute(
    points: Sequence[RestorePoint], plan: RetentionPlan, now: datetime
) -> list[RestorePoint]:
    """Replay ``plan`` as the engine would; fail on anything it would refuse."""
    live = {p.backup_id: p for p in points}

    def kids(pid: str) -> list[str]:
        return [p.backup_id for p in live.values() if p.parent_backup_id == pid]

    for step in plan.steps():
        for pid in step.backup_ids:
            p = live[pid]
            assert not p.locked_at(now) and not p.holds, f"{pid} is locked or held"
        if step.action == "delete":
            (pid,) = step.backup_ids
            assert kids(pid) == [], f"delete of {pid}, which has dependents"
            del live[pid]
            continue
        run, into = list(step.backup_ids), step.into
        assert into is not None
        assert live[run[0]].parent_backup_id not in live, "a merge starts at a chain's base"
        for older, newer in zip(run, [*run[1:], into], strict=True):
            assert kids(older) == [newer], f"{older} is not a link of one chain"
        assert not live[into].locked_at(now), f"merge into locked {into}"
        for pid in run:
            del live[pid]
        live[into] = dataclasses.replace(live[into], parent_backup_id=None)
    return list(live.values())


def summary(plan: RetentionPlan) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"keep": [k.backup_id for k in plan.keep]}
    for r in plan.remove:
        out.setdefault(r.action if r.action == "delete" else f"into {r.into}", []).append(
            r.backup_id
        )
    out["locked"] = sorted(x.backup_id for x in plan.locked)
    return {k: sorted(v, key=lambda x: int(x[1:])) for k, v in out.items()}


LOCK = {"immutable_until": NOW + timedelta(days=3)}
EXPIRED = {"immutable_until": NOW - timedelta(days=3)}
HELD = {"holds": ("job j1",)}
T5 = HOURS[:5]  # five points over three days
T8 = HOURS[:8]


@pytest.mark.parametrize(
    ("name", "points", "rules", "expected"),
    [
        (
            "full + 4 incrementals, keep_last=2: the oldest three merge into p3",
            linear(T5),
            RetentionRules(keep_last=2),
            {"keep": ["p3", "p4"], "into p3": ["p0", "p1", "p2"], "locked": []},
        ),
        (
            "an older chain the rules remove entirely is deleted",
            linear(T8, fulls=(0, 4)),
            RetentionRules(keep_last=2),
            {
                "keep": ["p6", "p7"],
                "delete": ["p0", "p1", "p2", "p3"],
                "into p6": ["p4", "p5"],
                "locked": [],
            },
        ),
        (
            "two chains: each one's oldest point merges, middle points stay",
            linear(T8, fulls=(0, 4)),
            RetentionRules(keep_last=1, keep_daily=4),
            # days: p0 p1 | p2 p3 | p4 p5 | p6 p7 -> daily keeps p1 p3 p5 p7
            {
                "keep": ["p1", "p2", "p3", "p5", "p6", "p7"],
                "into p1": ["p0"],
                "into p5": ["p4"],
                "locked": [],
            },
        ),
        (
            "a point in the middle of a chain stays: only the oldest merge",
            linear(T5),
            RetentionRules(keep_last=1, keep_daily=3),
            # p0 p1 | p2 p3 | p4 -> daily keeps p1 p3 p4; p2 is read by p3
            {"keep": ["p1", "p2", "p3", "p4"], "into p1": ["p0"], "locked": []},
        ),
        (
            "a locked point is kept and listed; the run below it stays too",
            linear(T5, p1=LOCK),
            RetentionRules(keep_last=2),
            {"keep": ["p0", "p2", "p3", "p4"], "locked": ["p1"]},
        ),
        (
            "immutability + consolidation: expired layers merge into the newest of them",
            linear(T5, p0=EXPIRED, p1=EXPIRED, p2=EXPIRED, p3=LOCK, p4=LOCK),
            RetentionRules(keep_last=2),
            {"keep": ["p2", "p3", "p4"], "into p2": ["p0", "p1"], "locked": []},
        ),
        (
            "a kept point with a live lock is kept; what its lock protects is not removed",
            linear(T5, p3=LOCK, p4=LOCK),
            RetentionRules(keep_last=1),
            {"keep": ["p2", "p4"], "into p2": ["p0", "p1"], "locked": ["p3"]},
        ),
        (
            "an expired lock is no lock",
            linear(T5, p0=EXPIRED, p3=EXPIRED),
            RetentionRules(keep_last=1),
            {"keep": ["p4"], "into p4": ["p0", "p1", "p2", "p3"], "locked": []},
        ),
        (
            "a held point is listed locked, and its chain is not merged meanwhile",
            linear(T5, p4=HELD),
            RetentionRules(keep_last=2),
            {"keep": ["p3", "p4"], "locked": ["p0", "p1", "p2"]},
        ),
        (
            "a held point blocks its chain's merge, not the deletion of a leaf above it",
            linear(T8, fulls=(0, 4), p2=HELD),
            RetentionRules(keep_last=4),
            {"keep": ["p4", "p5", "p6", "p7"], "delete": ["p3"], "locked": ["p0", "p1", "p2"]},
        ),
        (
            "no rule: nothing is removed",
            linear(T5),
            RetentionRules(),
            {"keep": ["p0", "p1", "p2", "p3", "p4"], "locked": []},
        ),
        (
            "a branch: the run stops where two chains part",
            [
                RestorePoint("p0", at(T5[0])),
                RestorePoint("p1", at(T5[1]), "p0"),
                RestorePoint("p2", at(T5[2]), "p1"),
                RestorePoint("p3", at(T5[3]), "p1"),
                RestorePoint("p4", at(T5[4]), "p3"),
            ],
            RetentionRules(keep_last=1),
            {"keep": ["p4"], "delete": ["p2"], "into p4": ["p0", "p1", "p3"], "locked": []},
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_chains(
    name: str, points: list[RestorePoint], rules: RetentionRules, expected: dict
) -> None:
    plan = plan_retention(points, rules, NOW)
    assert summary(plan) == expected, name
    left = execute(points, plan, NOW)
    check_invariants(points, rules, "UTC", plan, left)


def test_plan_serializes_to_the_api_shape() -> None:
    plan = plan_retention(linear(T5, p1=LOCK), RetentionRules(keep_last=2), NOW, disk_id=1)
    body = plan.to_dict()
    assert body["disk_id"] == 1
    assert body["keep"][0] == {"backup_id": "p4", "reasons": ["last #1"]}
    assert body["locked"] == [
        {
            "backup_id": "p1",
            "reason": body["locked"][0]["reason"],
            "immutable_until": (NOW + timedelta(days=3)).isoformat(),
            "held_by": [],
        }
    ]
    assert "immutable until" in body["locked"][0]["reason"]
    chain_kept = {k["backup_id"]: k["reasons"] for k in body["keep"]}["p0"]
    assert "p1" in chain_kept[0] and "locked" in chain_kept[0]
    body = plan_retention(linear(T5), RetentionRules(keep_last=2), NOW).to_dict()
    assert body["remove"][0] == {
        "backup_id": "p2",
        "action": "consolidate",
        "reason": body["remove"][0]["reason"],
        "into": "p3",
    }
    assert [r["backup_id"] for r in body["remove"]] == ["p2", "p1", "p0"]


def test_plan_round_trips_through_its_dict() -> None:
    plan = plan_retention(linear(T8, fulls=(0, 4), p5=LOCK), RetentionRules(keep_last=1), NOW)
    again = RetentionPlan.from_dict(plan.to_dict())
    assert again == plan
    assert again.steps() == plan.steps()


def test_steps_delete_newest_first_then_merge() -> None:
    plan = plan_retention(linear(T8, fulls=(0, 4)), RetentionRules(keep_last=2), NOW)
    steps = plan.steps()
    assert [(s.action, s.backup_ids, s.into) for s in steps] == [
        ("delete", ("p3",), None),
        ("delete", ("p2",), None),
        ("delete", ("p1",), None),
        ("delete", ("p0",), None),
        ("consolidate", ("p4", "p5"), "p6"),
    ]


# --------------------------------------------------------------- property


def check_invariants(
    points: Sequence[RestorePoint],
    rules: RetentionRules,
    tz: str,
    plan: RetentionPlan,
    left: Sequence[RestorePoint],
) -> None:
    ids = {p.backup_id for p in points}
    ruled, _ = apply_rules(points, rules, tz)
    staying = {p.backup_id for p in left}
    planned = (
        [k.backup_id for k in plan.keep]
        + [r.backup_id for r in plan.remove]
        + [x.backup_id for x in plan.locked]
    )
    # every point is in exactly one list
    assert sorted(planned) == sorted(ids)
    # every point kept by a rule is kept, nothing locked or held is removed
    assert set(ruled) <= {k.backup_id for k in plan.keep}
    for p in points:
        if p.locked_at(NOW) or p.holds:
            assert p.backup_id in staying, p
    # what was planned to go went, and nothing else
    assert staying == ids - {r.backup_id for r in plan.remove}
    # no point that stays lost an ancestor it reads through
    by_id = {p.backup_id: p for p in left}
    for p in left:
        if p.parent_backup_id is not None:
            assert p.parent_backup_id in by_id, f"{p.backup_id} lost {p.parent_backup_id}"


@st.composite
def histories(draw: st.DrawFn) -> list[RestorePoint]:
    """Backups at random intervals, a full every few runs (or only the first),
    some locked (expired or not), some held; sometimes a branch."""
    count = draw(st.integers(1, 30))
    full_every = draw(st.sampled_from([0, 1, 3, 7]))
    t = NOW - timedelta(days=400)
    points: list[RestorePoint] = []
    for i in range(count):
        t += timedelta(minutes=draw(st.sampled_from([30, 90, 600, 1440, 5000, 20000])))
        full = i == 0 or (full_every and i % full_every == 0)
        parent = None if full else points[-1].backup_id
        if parent and len(points) > 2 and draw(st.integers(0, 20)) == 0:
            parent = points[-2].backup_id  # a branch
        lock = draw(st.sampled_from([None, None, None, -2, 2]))
        held = draw(st.integers(0, 15)) == 0
        points.append(
            RestorePoint(
                f"p{i}",
                t,
                parent,
                immutable_until=None if lock is None else NOW + timedelta(days=lock),
                holds=("job j",) if held else (),
            )
        )
    return points


rule_counts = st.sampled_from([0, 0, 0, 1, 2, 3, 5, -1])


@given(
    histories(),
    st.builds(
        RetentionRules,
        keep_last=rule_counts,
        keep_hourly=rule_counts,
        keep_daily=rule_counts,
        keep_weekly=rule_counts,
        keep_monthly=rule_counts,
        keep_yearly=rule_counts,
    ),
    st.sampled_from(["UTC", "Europe/Berlin", "Pacific/Auckland"]),
)
@settings(max_examples=400, deadline=None)
def test_property_plans_are_safe_and_idempotent(
    points: list[RestorePoint], rules: RetentionRules, tz: str
) -> None:
    plan = plan_retention(points, rules, NOW, tz)
    left = execute(points, plan, NOW)
    check_invariants(points, rules, tz, plan, left)
    staying = {p.backup_id for p in left}
    # planning again after the plan was executed removes nothing new
    again = plan_retention(left, rules, NOW, tz)
    assert again.remove == [], again.remove
    assert {k.backup_id for k in again.keep} | {x.backup_id for x in again.locked} == staying


def test_plans_100k_points_quickly() -> None:
    import time

    t0 = datetime(2000, 1, 1, tzinfo=UTC)
    points = [
        RestorePoint(f"b{i}", t0 + timedelta(hours=2 * i), None if i % 50 == 0 else f"b{i - 1}")
        for i in range(100_000)
    ]
    rules = RetentionRules(
        keep_last=7, keep_daily=14, keep_weekly=8, keep_monthly=12, keep_yearly=5
    )
    start = time.perf_counter()
    plan = plan_retention(points, rules, NOW, "Europe/Berlin")
    took = time.perf_counter() - start
    assert len(plan.keep) + len(plan.remove) + len(plan.locked) == 100_000
    assert took < 5, took  # the benchmark's target is 1 s on a quiet machine
