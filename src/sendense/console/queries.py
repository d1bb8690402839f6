"""Reads only the console needs (the dashboard's counts), scoped like the API."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, literal_column, select

from sendense.catalog.models import BackupJob
from sendense.core.access import Principal
from sendense.hub.backups.service import visible_vm_ids

# Summary buckets, as Proxmox Backup Server shows its tasks: a cancelled job
# ended without its result, which a person should look at, but nothing failed.
BUCKETS = {"completed": "ok", "cancelled": "warning", "failed": "failed"}


def task_summary(st: Any, who: Principal, now: datetime | None = None) -> list[dict[str, Any]]:
    """Jobs that ended in the last 24 hours and 7 days: ok / warning / failed."""
    now = now or datetime.now(UTC)
    out = []
    with st.db.session() as s:
        vm_ids = visible_vm_ids(s, who)
        for label, span in (("Last 24 hours", timedelta(days=1)), ("Last 7 days", timedelta(7))):
            # Grouped by an expression, not the column: grouping by ``status``
            # makes SQLite walk the status index over every job ever (30-100 ms
            # at 50,000 jobs) instead of the created_at range.
            status = BackupJob.status.op("||")(literal_column("''"))
            q = (
                select(status, func.count())
                .where(BackupJob.created_at >= now - span)
                .group_by(status)
            )
            if vm_ids is not None:
                q = q.where(BackupJob.vm_id.in_(vm_ids))
                if who.scope is not None:
                    q = q.where(BackupJob.repository_id.in_(sorted(who.scope.repositories)))
            counts = {"ok": 0, "warning": 0, "failed": 0}
            for status, n in s.execute(q).all():
                if status in BUCKETS:
                    counts[BUCKETS[status]] += int(n)
            out.append({"label": label, **counts})
    return out


def rpo_misses(st: Any, who: Principal, now: datetime | None = None) -> list[dict[str, Any]]:
    """VMs whose last successful backup is older than their policy allows.

    A VM under an enabled policy misses its RPO when its policy's most recent
    scheduled run that should have ended by now (scheduled at least `GRACE`
    ago) is newer than the VM's last completed backup, or the VM has none.
    A policy created after that run is not held to it yet.
    """
    from sendense.hub.policies import service as policies
    from sendense.hub.vms import service as vms
    from sendense.policy.schedule import Schedule

    now = now or datetime.now(UTC)
    found = policies.list_policies(st, who, name=None, limit=1000, offset=0)["policies"]
    enabled = [p for p in found if p["enabled"] and p["matched_vms"]]
    if not enabled:
        return []
    every = json.loads(vms.list_vms_json(st, who))["vms"]  # cached per catalog generation
    last = {v["name"]: v["last_backup"] for v in every}
    misses: dict[str, dict[str, Any]] = {}
    for p in enabled:
        due = Schedule.parse(p["schedule"], p["timezone"]).latest_run(now - GRACE)
        created = _when(p["created_at"])
        if due is None or (created is not None and created > due):
            continue
        for name in p["matched_vms"]:
            backup = last.get(name)
            at = _when(backup["created_at"]) if backup else None
            if at is not None and at >= due:
                continue
            if name not in misses or due > misses[name]["due"]:
                misses[name] = {
                    "vm_name": name,
                    "policy": p["name"],
                    "policy_id": p["policy_id"],
                    "due": due,
                    "last_backup_at": at,
                }
    return sorted(misses.values(), key=lambda m: (m["last_backup_at"] is not None, m["vm_name"]))


# How long a scheduled run may take before a VM without its backup counts as late.
GRACE = timedelta(hours=1)


def _when(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


# ------------------------------------------------------------------ charts

CHART_DAYS = 30


def _day(value: Any) -> str:
    return str(value)[:10]


def _days(now: datetime, days: int) -> list[str]:
    start = (now - timedelta(days=days - 1)).date()
    return [(start + timedelta(days=i)).isoformat() for i in range(days)]


def vm_history(st: Any, vm_id: str, now: datetime | None = None) -> dict[str, Any]:
    """Per day of the last `CHART_DAYS`: bytes the VM's completed restore
    points take (by the day they were taken) and the time its backup jobs
    ran. ``{"days": [...], "bytes": [...], "seconds": [...]}``."""
    from sendense.catalog.models import Backup

    now = now or datetime.now(UTC)
    days = _days(now, CHART_DAYS)
    since = datetime.fromisoformat(days[0]).replace(tzinfo=UTC)
    size = {d: 0 for d in days}
    seconds = {d: 0.0 for d in days}
    with st.db.session() as s:
        q = (
            select(func.date(Backup.created_at), func.sum(Backup.size_on_disk))
            .where(Backup.vm_id == vm_id, Backup.status == "completed")
            .where(Backup.created_at >= since)
            .group_by(func.date(Backup.created_at))
        )
        for day, total in s.execute(q).all():
            if _day(day) in size:
                size[_day(day)] = int(total or 0)
        jobs = select(BackupJob.created_at, BackupJob.started_at, BackupJob.finished_at).where(
            BackupJob.vm_id == vm_id,
            BackupJob.kind == "backup",
            BackupJob.status == "completed",
            BackupJob.created_at >= since,
        )
        for created, started, finished in s.execute(jobs).all():
            if started and finished and _day(created) in seconds:
                seconds[_day(created)] += (finished - started).total_seconds()
    return {
        "days": days,
        "bytes": [size[d] for d in days],
        "seconds": [round(seconds[d], 1) for d in days],
    }


def repository_history(st: Any, repository_id: str, now: datetime | None = None) -> dict[str, Any]:
    """Per day of the last `CHART_DAYS`: bytes held by the repository's
    restore points that exist today, counted from the day each was taken
    (deleted and merged points are gone from the catalog, so this is how
    today's contents built up, not a record of past usage). Reused while the
    catalog is unchanged (the sum before the window reads every backup)."""
    now = now or datetime.now(UTC)
    days = _days(now, CHART_DAYS)
    with st.db.session() as s:
        generation = st.db.generation(s)
        held: list[int] = st.cache.get(
            ("console.repository_history", repository_id, days[0]),
            lambda: _held_by_day(s, repository_id, days),
            generation,
        )
    return {"days": days, "bytes": held}


def _held_by_day(s: Any, repository_id: str, days: list[str]) -> list[int]:
    from sendense.catalog.models import Backup

    since = datetime.fromisoformat(days[0]).replace(tzinfo=UTC)
    mine = (Backup.repository_id == repository_id, Backup.status == "completed")
    base = s.scalar(
        select(func.coalesce(func.sum(Backup.size_on_disk), 0)).where(
            *mine, Backup.created_at < since
        )
    )
    q = (
        select(func.date(Backup.created_at), func.sum(Backup.size_on_disk))
        .where(*mine, Backup.created_at >= since)
        .group_by(func.date(Backup.created_at))
    )
    added = {_day(d): int(t or 0) for d, t in s.execute(q).all()}
    total = int(base or 0)
    held = []
    for d in days:
        total += added.get(d, 0)
        held.append(total)
    return held


# ------------------------------------------------------- light repository reads


def repository_choices(st: Any, who: Principal) -> list[dict[str, Any]]:
    """Repositories a caller may pick (id, name, free space): no usage sums."""
    from sendense.catalog.stores.repositories import RepositoryStore
    from sendense.engine import inventory

    with st.db.session() as s:
        rows = [r for r in RepositoryStore(s).all() if who.can_see_repository(r.id)]
        s.expunge_all()
    out = []
    for r in rows:  # statvfs with no session open (a share may be slow)
        online, _ = inventory.repository_status(r)
        capacity = inventory.repository_capacity(r) if online else {}
        out.append(
            {
                "repository_id": r.id,
                "name": r.name,
                "online": online,
                "immutable": r.immutable,
                "available_bytes": capacity.get("available_bytes"),
            }
        )
    return out


def repository_usage(st: Any, who: Principal) -> list[dict[str, Any]]:
    """The dashboard's bars: capacity (statvfs) and the restore points' count
    and bytes (one sum over every backup, reused while the catalog is unchanged)."""
    from sendense.catalog.stores.repositories import RepositoryStore
    from sendense.engine import inventory

    with st.db.session() as s:
        generation = st.db.generation(s)
        usage = st.cache.get(
            ("console.repository_usage",), lambda: RepositoryStore(s).usage(), generation
        )
        rows = [r for r in RepositoryStore(s).all() if who.can_see_repository(r.id)]
        s.expunge_all()
    out = []
    for r in rows:
        online, why = inventory.repository_status(r)
        capacity: dict[str, Any] = (
            inventory.repository_capacity(r)
            if online
            else {"total_bytes": None, "used_bytes": None, "available_bytes": None}
        )
        count, size = usage.get(r.id, (0, 0))
        out.append(
            {
                "repository_id": r.id,
                "name": r.name,
                "immutable": r.immutable,
                "online": online,
                "status_message": why,
                "backup_count": count,
                "backup_bytes": size,
                **capacity,
            }
        )
    return out


def repository_details(st: Any, who: Principal) -> list[dict[str, Any]]:
    """What ``GET /api/v1/repositories`` answers (the hub's own view of each
    repository), with its two catalog-wide sums reused: the restore points'
    count and bytes while the catalog is unchanged, the live locks for a
    minute at most (a lock ends with time, not with a commit). At 100,000
    backups the two sums cost 90-170 ms per request otherwise."""
    from sendense.catalog.stores.repositories import RepositoryStore
    from sendense.hub.repositories import service as repositories

    now = datetime.now(UTC)
    minute = now.replace(second=0, microsecond=0)
    with st.db.session() as s:
        generation = st.db.generation(s)
        store = RepositoryStore(s)
        usage = st.cache.get(("console.repository_usage",), store.usage, generation)
        rows = []
        for r in store.all():
            if not who.can_see_repository(r.id):
                continue
            locks = st.cache.get(
                ("console.repository_locks", r.id, minute),
                lambda r=r: store.live_locks(r.id, now),
                generation,
            )
            rows.append((r, usage.get(r.id, (0, 0)), locks))
        s.expunge_all()
    # statvfs and the attribute probe with no session open (a share may be slow).
    return [repositories._view(st, r, u, locks) for r, u, locks in rows]


def policies_by_vm(st: Any, who: Principal) -> dict[str, list[dict[str, Any]]]:
    """For each VM name, the policies (id, name, enabled) that select it now;
    reused while the catalog is unchanged (one selector check per VM and
    policy)."""
    from sendense.hub.policies import service as policies

    def compute() -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        offset = 0
        while True:
            page = policies.list_policies(st, who, name=None, limit=1000, offset=offset)
            for p in page["policies"]:
                for name in p["matched_vms"]:
                    out.setdefault(name, []).append(
                        {"policy_id": p["policy_id"], "name": p["name"], "enabled": p["enabled"]}
                    )
            offset += len(page["policies"])
            if not page["policies"] or offset >= page["total"]:
                return out

    generation = st.db.generation()
    found: dict[str, list[dict[str, Any]]] = st.cache.get(
        ("console.policies_by_vm", who.scope), compute, generation
    )
    return found
