"""Retention: which restore points of a disk stay, and how the others go.

Two stages, both pure (no catalog, no files, no clock but ``now``):

1. **The rules** (`apply_rules`), restic's ``ApplyPolicy`` semantics
   (restic ``internal/restic/snapshot_policy.go``). Points are sorted newest
   first. Each rule has a count and a bucket: ``keep_last`` (every point is its
   own bucket), ``keep_hourly`` (the local hour), ``keep_daily`` (the local
   day), ``keep_weekly`` (the ISO week), ``keep_monthly``, ``keep_yearly``.
   Walking newest to oldest, a rule keeps a point when its bucket differs from
   the last bucket the rule kept, and counts one down; at zero the rule stops.
   A rule that still has counts left at the oldest point keeps that point too
   (the longest history the counts allow). A point kept by any rule is kept,
   with every rule that kept it as a reason. ``-1`` means "keep every bucket";
   no rule at all keeps everything (an empty policy never removes). Buckets
   are computed in the policy's time zone: a backup at 23:30 UTC is on the
   next day in Europe/Berlin.

2. **The chains** (`plan_retention`). A restore point is one QCOW2 layer;
   newer points of its chain read through it. What the rules remove becomes
   an action the engine can execute without breaking a chain::

       P1 ─ P2 ─ P3 ─ P4 ─ P5        a chain, oldest first; K = kept by a rule
       R    R    K    R    K         R = the rules remove it

       P1, P2  consolidate into P3   (the oldest points of a chain merge into
                                      the next point, which becomes a
                                      synthetic full: engine/consolidate.py)
       P4      kept, "needed by P5"  (a point in the middle of a chain cannot
                                      go: only the oldest points merge)

       F6 ─ I7 ─ I8                  an older chain the rules remove entirely
       R    R    R                   delete I8, I7, F6 (leaves, newest first:
                                      engine/delete.py)

   - ``delete``: the point and everything newer that reads through it go (its
     whole subtree is removed by the rules); executed newest first, so each
     is a leaf when deleted.
   - ``consolidate``: the point belongs to the oldest run of removed points
     of a chain (``P1 .. Pk``, each with one surviving child); they merge
     into ``P(k+1)``, whose file is replaced. ``P(k+1)`` must not be locked
     (its file is replaced), so under a lock the run merges into its own
     newest unlocked point instead, which stays as the new base.
   - ``locked``: the rules remove it, but it is immutable until a time after
     ``now``, or something uses it (a job, a restore session); it is kept and
     listed as locked. Points below it that it reads through stay with it.

   Immutability plus consolidation (an immutable repository locks every new
   layer for its retention days): only layers whose lock expired are merged,
   into the newest of them, which becomes the new base; the locked layers
   above read through that base, unchanged.

Re-planning after a plan was executed removes nothing more (the rules keep
the same points when only unkept points went, and what stayed for a chain
still stays for it): retention can run after every backup.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sendense.core.errors import InvalidRequest

RULES = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")

Action = Literal["delete", "consolidate"]


@dataclass(frozen=True)
class RetentionRules:
    """How many buckets of each kind to keep (0: the rule is off, -1: all)."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0

    def __post_init__(self) -> None:
        for name in RULES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < -1:
                raise InvalidRequest(
                    f"retention.{name} must be an integer >= -1 (-1: keep all)", field=name
                )

    @classmethod
    def from_dict(cls, rules: Mapping[str, Any] | None) -> RetentionRules:
        """From a policy's ``retention`` object; unknown keys are an error, None is 0."""
        rules = dict(rules or {})
        unknown = sorted(set(rules) - set(RULES))
        if unknown:
            raise InvalidRequest(
                f"unknown retention rule(s) {unknown}; known: {list(RULES)}", fields=unknown
            )
        return cls(**{k: v if v is not None else 0 for k, v in rules.items()})

    @property
    def empty(self) -> bool:
        """No rule at all: everything is kept."""
        return all(getattr(self, name) == 0 for name in RULES)

    def describe(self) -> str:
        on = [f"{name}={getattr(self, name)}" for name in RULES if getattr(self, name)]
        return ", ".join(on) or "no rules"


@dataclass(frozen=True)
class RestorePoint:
    """One restore point of one disk, as the planner needs it.

    ``parent_backup_id``: the point it reads through (None for a full, or
    when the parent is not a restore point the planner was given).
    ``holds``: who uses it now (``"job <id>"``, ``"restore <id>"``).
    """

    backup_id: str
    created_at: datetime
    parent_backup_id: str | None = None
    immutable_until: datetime | None = None
    holds: tuple[str, ...] = ()

    def locked_at(self, now: datetime) -> bool:
        return self.immutable_until is not None and self.immutable_until > now


@dataclass(frozen=True)
class Kept:
    backup_id: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Removal:
    """``into``: for a consolidation, the point the run merges into."""

    backup_id: str
    action: Action
    reason: str
    into: str | None = None


@dataclass(frozen=True)
class Locked:
    backup_id: str
    reason: str
    immutable_until: datetime | None = None
    held_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class Step:
    """One unit of execution: delete one leaf, or merge a run into ``into``."""

    action: Action
    backup_ids: tuple[str, ...]
    into: str | None = None


@dataclass
class RetentionPlan:
    """Keep (with reasons), remove (with an action), locked; for one disk."""

    keep: list[Kept] = field(default_factory=list)
    remove: list[Removal] = field(default_factory=list)
    locked: list[Locked] = field(default_factory=list)
    disk_id: int | None = None

    def steps(self) -> list[Step]:
        """The order of execution: deletes newest first (each a leaf by
        then), then one consolidation per run, oldest run first."""
        deletes = [Step("delete", (r.backup_id,)) for r in self.remove if r.action == "delete"]
        runs: dict[str, list[str]] = {}
        for r in self.remove:
            if r.action == "consolidate" and r.into is not None:
                runs.setdefault(r.into, []).append(r.backup_id)
        # ``remove`` is newest first; a run is listed from the chain's base up.
        merges = [Step("consolidate", tuple(reversed(ids)), into) for into, ids in runs.items()]
        return [*deletes, *merges]

    @classmethod
    def from_dict(cls, plan: Mapping[str, Any]) -> RetentionPlan:
        """Back from `to_dict` (a job's params): enough to rebuild its `steps`."""
        return cls(
            keep=[
                Kept(k["backup_id"], tuple(k.get("reasons") or ())) for k in plan.get("keep") or []
            ],
            remove=[
                Removal(r["backup_id"], r["action"], r.get("reason") or "", r.get("into"))
                for r in plan.get("remove") or []
            ],
            locked=[
                Locked(
                    x["backup_id"],
                    x.get("reason") or "",
                    datetime.fromisoformat(x["immutable_until"])
                    if x.get("immutable_until")
                    else None,
                    tuple(x.get("held_by") or ()),
                )
                for x in plan.get("locked") or []
            ],
            disk_id=plan.get("disk_id"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The shape of ``POST /api/v1/policies/{id}/retention/plan`` per disk."""
        return {
            "disk_id": self.disk_id,
            "keep": [{"backup_id": k.backup_id, "reasons": list(k.reasons)} for k in self.keep],
            "remove": [
                {
                    "backup_id": r.backup_id,
                    "action": r.action,
                    "reason": r.reason,
                    **({"into": r.into} if r.into else {}),
                }
                for r in self.remove
            ],
            "locked": [
                {
                    "backup_id": x.backup_id,
                    "reason": x.reason,
                    "immutable_until": x.immutable_until.isoformat() if x.immutable_until else None,
                    "held_by": list(x.held_by),
                }
                for x in self.locked
            ],
        }


def zone(tz: str | ZoneInfo | None) -> ZoneInfo:
    """The ZoneInfo of a policy's ``timezone`` (None: UTC); 400 if unknown."""
    if isinstance(tz, ZoneInfo):
        return tz
    try:
        return ZoneInfo(tz or "UTC")
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise InvalidRequest(f"unknown time zone {tz!r}", field="timezone") from e


# ------------------------------------------------------------------ rules


def _bucket(rule: str, t: datetime, nr: int) -> tuple[int, ...]:
    """The bucket of a point for a rule (compared as a tuple: fast)."""
    if rule == "keep_last":
        return (nr,)
    if rule == "keep_hourly":
        return (t.year, t.month, t.day, t.hour)
    if rule == "keep_daily":
        return (t.year, t.month, t.day)
    if rule == "keep_weekly":
        return tuple(t.isocalendar()[:2])
    if rule == "keep_monthly":
        return (t.year, t.month)
    return (t.year,)


def _label(rule: str, bucket: tuple[int, ...]) -> str:
    """A bucket as a person reads it: ``daily 2026-11-23``, ``weekly 2026-W47``."""
    name = rule.removeprefix("keep_")
    if rule == "keep_last":
        return f"last #{bucket[0] + 1}"
    if rule == "keep_weekly":
        return f"weekly {bucket[0]}-W{bucket[1]:02d}"
    text = "-".join(f"{v:02d}" for v in bucket[:3])
    if rule == "keep_hourly":
        text += f" {bucket[3]:02d}:00"
    return f"{name} {text}"


def _newest_first(points: Iterable[RestorePoint]) -> list[RestorePoint]:
    return sorted(points, key=lambda p: (p.created_at, p.backup_id), reverse=True)


def apply_rules(
    points: Sequence[RestorePoint], rules: RetentionRules, tz: str | ZoneInfo | None = None
) -> tuple[dict[str, list[str]], list[str]]:
    """The rules alone: ({kept id: reasons}, [removed ids]), newest first."""
    ordered = _newest_first(points)
    if rules.empty:
        return {p.backup_id: ["no retention rules"] for p in ordered}, []
    where = zone(tz)
    counts = {name: getattr(rules, name) for name in RULES if getattr(rules, name)}
    last: dict[str, tuple[int, ...] | None] = dict.fromkeys(counts)
    keep: dict[str, list[str]] = {}
    remove: list[str] = []
    oldest = len(ordered) - 1
    for nr, p in enumerate(ordered):
        local = p.created_at.astimezone(where)
        reasons = []
        for name, left in counts.items():
            if left == 0:
                continue
            bucket = _bucket(name, local, nr)
            if bucket != last[name] or nr == oldest:
                # restic keeps the oldest point too while a rule has counts left.
                extra = " (oldest point)" if bucket == last[name] else ""
                last[name] = bucket
                if left > 0:
                    counts[name] = left - 1
                reasons.append(_label(name, bucket) + extra)
        if reasons:
            keep[p.backup_id] = reasons
        else:
            remove.append(p.backup_id)
    return keep, remove


# ----------------------------------------------------------------- chains


def plan_retention(
    points: Sequence[RestorePoint],
    rules: RetentionRules,
    now: datetime,
    tz: str | ZoneInfo | None = None,
    *,
    disk_id: int | None = None,
) -> RetentionPlan:
    """The plan for one disk's restore points (all its chains).

    Every point kept by a rule is kept; nothing locked (``immutable_until``
    after ``now``) or held is removed; every point that stays keeps every
    ancestor it reads through, or gets it merged into itself; only actions
    the engine executes are planned (see the module docstring).
    """
    by_id = {p.backup_id: p for p in points}
    ruled, _ = apply_rules(points, rules, tz)
    described = rules.describe()

    def parent(p: RestorePoint) -> str | None:
        return p.parent_backup_id if p.parent_backup_id in by_id else None

    children: dict[str, list[str]] = {pid: [] for pid in by_id}
    for p in points:
        if (up := parent(p)) is not None:
            children[up].append(p.backup_id)

    locked: dict[str, Locked] = {}
    for p in points:
        if p.backup_id in ruled:
            continue
        if p.locked_at(now):
            assert p.immutable_until is not None
            locked[p.backup_id] = Locked(
                p.backup_id,
                f"not kept by any rule ({described}), but immutable until "
                f"{p.immutable_until.isoformat()}",
                immutable_until=p.immutable_until,
                held_by=p.holds,
            )
        elif p.holds:
            locked[p.backup_id] = Locked(
                p.backup_id,
                f"not kept by any rule ({described}), but in use by {', '.join(p.holds)}",
                held_by=p.holds,
            )
    removable = {pid for pid in by_id if pid not in ruled and pid not in locked}

    # A subtree the rules remove entirely goes by deletion (children first).
    deletable: set[str] = set()
    for p in sorted(points, key=lambda x: (x.created_at, x.backup_id), reverse=True):
        pid = p.backup_id
        if pid in removable and all(c in deletable for c in children[pid]):
            deletable.add(pid)

    # The oldest run of each chain goes by consolidation.
    merged: dict[str, str] = {}  # point -> the point its run merges into
    needed_by: dict[str, str] = {}  # point that stays for a chain -> who needs it
    survivors = {pid: [c for c in kids if c not in deletable] for pid, kids in children.items()}
    for root in (p for p in points if parent(p) is None and p.backup_id not in deletable):
        run: list[str] = []
        cur = root.backup_id
        while cur in removable and len(survivors[cur]) == 1:
            run.append(cur)
            cur = survivors[cur][0]
        if not run:
            continue
        holders = _holds_in_tree(root.backup_id, children, by_id)
        if holders:
            for pid in run:
                locked[pid] = Locked(
                    pid,
                    f"not kept by any rule ({described}); its chain is in use by "
                    f"{', '.join(holders)} and cannot be merged now",
                    held_by=tuple(holders),
                )
            continue
        into = cur
        # The new base's file is replaced: it must not be locked. Merge the
        # run into its own newest point instead, which then stays.
        if by_id[into].locked_at(now):
            into = run.pop()
            needed_by[into] = cur
        for pid in run:
            merged[pid] = into

    plan = RetentionPlan(disk_id=disk_id)
    for p in _newest_first(points):
        pid = p.backup_id
        if pid in ruled:
            plan.keep.append(Kept(pid, tuple(ruled[pid])))
        elif pid in locked:
            plan.locked.append(locked[pid])
        elif pid in deletable:
            plan.remove.append(
                Removal(
                    pid,
                    "delete",
                    f"not kept by any rule ({described}); no point that stays reads through it",
                )
            )
        elif pid in merged:
            plan.remove.append(
                Removal(
                    pid,
                    "consolidate",
                    f"not kept by any rule ({described}); merged into {merged[pid]}, "
                    "which becomes a synthetic full",
                    into=merged[pid],
                )
            )
        else:
            user = needed_by.get(pid) or _first_staying_descendant(pid, survivors, removable)
            why = "locked " if user in locked or by_id[user].locked_at(now) else ""
            plan.keep.append(
                Kept(
                    pid,
                    (
                        f"chain: {why}restore point {user} reads through it "
                        "(only the oldest points of a chain can be merged away)",
                    ),
                )
            )
    plan.remove.sort(key=lambda r: (by_id[r.backup_id].created_at, r.backup_id), reverse=True)
    return plan


def _holds_in_tree(
    root: str, children: Mapping[str, list[str]], by_id: Mapping[str, RestorePoint]
) -> list[str]:
    """Everything that uses a point of the chain(s) growing from ``root``:
    a merge takes QEMU's write lock on the whole chain."""
    found: list[str] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        found.extend(h for h in by_id[pid].holds if h not in found)
        stack.extend(children[pid])
    return found


def _first_staying_descendant(
    pid: str,
    survivors: Mapping[str, list[str]],
    removable: set[str],
) -> str:
    """The nearest newer point that stays and reads through ``pid``."""
    cur = pid
    while survivors[cur]:
        cur = survivors[cur][0]
        if cur not in removable:
            break
    return cur
