"""Policy benchmark: the scheduler's tick and retention planning at scale.

Run by ``make bench-policy`` (and ``make bench``). Pure CPU, no processes:

1. the due set: 1,000 policies (a mix of cron schedules and time zones)
   whose last scheduled time is up to a day old; the scheduler computes
   which are due (``sendense.scheduler.loop.due_set``, its cache kept across
   ticks as the loop keeps it) at ``--rounds`` ticks five minutes apart
   (so later ticks find some due), each due policy then claimed.
   ``due_set_first_ms`` is the first tick (cold cache, half the policies
   due with up to a day of missed runs counted:
   the tick after a day of downtime), ``due_set_restart_ms`` a cold cache
   with nothing missed (a hub restart), ``due_set_ms`` the median tick
   (target < 100 ms), ``due_set_max_ms`` the worst;
2. matching: each tick's due policies' selectors against 10,000 VMs with
   tags (``sendense.scheduler.selector.selector_matches``): ``match_ms``
   for a later tick, ``match_first_ms`` for the tick after downtime;
3. retention planning over 100,000 restore points: 1,000 disks of 100
   points each (a full every 24, incrementals reading through the previous
   point, some immutable, some held), ``plan_retention`` with a GFS policy
   for every disk: ``retention_plan_ms`` (target < 1,000 ms), the median of
   ``--rounds``.

Last line (``key=value``): ``due_set_ms= retention_plan_ms=`` and the
figures behind them.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

from sendense.policy.retention import RestorePoint, RetentionRules, plan_retention  # noqa: E402

SCHEDULES = (
    "0 * * * *",
    "*/15 * * * *",
    "30 1 * * *",
    "0 22 * * 1-5",
    "0 3 * * 0",
    "0 */4 * * *",
    "5 4 1 * *",
    "*/5 9-17 * * 1-5",
)
ZONES = ("UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo", "Australia/Sydney")


def say(msg: str) -> None:
    print(f"[policy] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policies", type=int, default=1000)
    p.add_argument("--vms", type=int, default=10_000)
    p.add_argument("--disks", type=int, default=1000)
    p.add_argument("--points", type=int, default=100)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seed", type=int, default=7)
    return p.parse_args(argv)


def disk_points(n: int, disk: int, now: datetime, rng: random.Random) -> list[RestorePoint]:
    """One disk's restore points, hourly, newest ``now``: a full every 24."""
    points: list[RestorePoint] = []
    parent: str | None = None
    for i in range(n):
        at = now - timedelta(hours=n - 1 - i, minutes=rng.randrange(10))
        if i % 24 == 0:
            parent = None
        bid = f"d{disk}-b{i}"
        locked = at + timedelta(days=3) if rng.random() < 0.05 else None
        holds = ("restore s1",) if rng.random() < 0.01 else ()
        points.append(RestorePoint(bid, at, parent, immutable_until=locked, holds=holds))
        parent = bid
    return points


def bench_retention(args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    disks = [disk_points(args.points, d, now, rng) for d in range(args.disks)]
    rules = RetentionRules(keep_last=12, keep_daily=2, keep_weekly=4, keep_monthly=6)
    times, removed = [], 0
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        removed = 0
        for d, points in enumerate(disks):
            plan = plan_retention(points, rules, now, "Europe/Paris", disk_id=d)
            removed += len(plan.remove)
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "retention_points": args.disks * args.points,
        "retention_removed": removed,
        "retention_plan_ms": statistics.median(times),
        "retention_plan_max_ms": max(times),
    }


def bench_due_set(args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    from sendense.scheduler.loop import DueCache, PolicyTiming, due_set
    from sendense.scheduler.selector import selector_matches

    now = datetime(2026, 11, 23, 12, 0, 30, tzinfo=UTC)
    policies = {
        f"p{i}": PolicyTiming(
            f"p{i}",
            rng.choice(SCHEDULES),
            rng.choice(ZONES),
            now - timedelta(minutes=rng.randrange(1, 24 * 60)),
        )
        for i in range(args.policies)
    }
    keys = ("env", "tier", "site")
    vms = [
        (f"vm{i}", {k: f"{k}{rng.randrange(8)}" for k in keys if rng.random() < 0.8})
        for i in range(args.vms)
    ]
    selectors = {
        pid: {"vms": [f"vm{rng.randrange(args.vms)}" for _ in range(3)], "tags": {}}
        if rng.random() < 0.3
        else {"vms": [], "tags": {"env": f"env{rng.randrange(8)}"}}
        for pid in policies
    }
    # A hub (re)started with nothing missed: a cold cache, no policy due.
    from sendense.policy.schedule import Schedule

    fresh = [
        p._replace(last=Schedule.parse(p.schedule, p.timezone).latest_run(now) or p.last)
        for p in policies.values()
    ]
    t0 = time.perf_counter()
    due_set(fresh, now, DueCache())
    restart_ms = (time.perf_counter() - t0) * 1000
    # As the scheduler runs it: one cache kept across ticks,
    # each due policy claimed (its last scheduled time moves to the run's).
    cache = DueCache()
    ticks, due_counts, matches = [], [], []
    for r in range(args.rounds):
        tick = now + timedelta(minutes=5 * r)
        t0 = time.perf_counter()
        due = due_set(policies.values(), tick, cache)
        ticks.append((time.perf_counter() - t0) * 1000)
        due_counts.append(len(due))
        t0 = time.perf_counter()
        matched = 0
        for d in due:
            selector = selectors[d.policy_id]
            matched += sum(1 for name, tags in vms if selector_matches(selector, name, tags))
        matches.append((time.perf_counter() - t0) * 1000)
        for d in due:
            policies[d.policy_id] = policies[d.policy_id]._replace(last=d.scheduled_at)
    return {
        "due_set_ms": statistics.median(ticks),
        "due_set_first_ms": ticks[0],
        "due_set_restart_ms": restart_ms,
        "due_set_max_ms": max(ticks),
        "due_policies_first": due_counts[0],
        "due_policies_later": statistics.median(due_counts[1:] or due_counts),
        "match_ms": statistics.median(matches[1:] or matches),
        "match_first_ms": matches[0],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    say(f"due set: {args.policies} policies, {args.vms} VMs, {args.rounds} ticks")
    results = bench_due_set(args, rng)
    say(f"retention: {args.disks} disks x {args.points} points, {args.rounds} rounds")
    results.update(bench_retention(args, rng))
    out = ROOT / "bench" / "results" / f"policy-{time.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(
        f"due_set_ms={results['due_set_ms']:.1f} "
        f"due_set_restart_ms={results['due_set_restart_ms']:.1f} "
        f"due_set_first_ms={results['due_set_first_ms']:.1f} "
        f"due_set_max_ms={results['due_set_max_ms']:.1f} "
        f"due_policies_first={results['due_policies_first']} "
        f"due_policies_later={results['due_policies_later']:g} match_ms={results['match_ms']:.1f} "
        f"match_first_ms={results['match_first_ms']:.0f} "
        f"retention_plan_ms={results['retention_plan_ms']:.0f} "
        f"retention_plan_max_ms={results['retention_plan_max_ms']:.0f} "
        f"retention_points={results['retention_points']} "
        f"retention_removed={results['retention_removed']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
