"""Reads only the console needs (the dashboard's counts), scoped like the API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

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
            q = (
                select(BackupJob.status, func.count())
                .where(BackupJob.created_at >= now - span)
                .where(BackupJob.status.in_(list(BUCKETS)))
                .group_by(BackupJob.status)
            )
            if vm_ids is not None:
                q = q.where(BackupJob.vm_id.in_(vm_ids))
                if who.scope is not None:
                    q = q.where(BackupJob.repository_id.in_(sorted(who.scope.repositories)))
            counts = {"ok": 0, "warning": 0, "failed": 0}
            for status, n in s.execute(q).all():
                counts[BUCKETS[status]] += int(n)
            out.append({"label": label, **counts})
    return out


def rpo_misses(st: Any, who: Principal) -> list[dict[str, Any]] | None:
    """VMs whose last successful backup is older than their policy allows;
    None while the hub has no policies (issue 7): the dashboard says so."""
    return None
