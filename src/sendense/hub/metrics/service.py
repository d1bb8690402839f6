"""``GET /metrics``: the catalog as Prometheus gauges.

What comes from the catalog is read in one transaction and reused while the
catalog is unchanged (`CatalogCache`: 50,000 jobs and 100,000 restore
points cost about 120 ms on SQLite to read, nothing to reuse); repository
capacity (statvfs) is read at every scrape, with no session open.

Every family is a gauge: restore points and jobs can be deleted (retention,
``DELETE``), so no figure here is guaranteed to only grow. ``rate()`` needs a
counter; ``delta()`` or ``increase()`` over a gauge that rarely shrinks are
the practical queries (docs/guide.md, "Notifications and metrics").

========================================== ============================ ==========================
family                                     labels                       what
========================================== ============================ ==========================
sendense_jobs                              kind, status                 jobs in the catalog
sendense_backup_transferred_bytes          repository_id                bytes moved by completed
                                                                        restore points there
sendense_vm_last_success_timestamp_seconds vm_id[, vm]                  end of the VM's latest
                                                                        completed backup job
sendense_repository_total_bytes            repository_id, name          filesystem size (online)
sendense_repository_used_bytes             repository_id, name          used on that filesystem
sendense_repository_available_bytes        repository_id, name          free for the hub
sendense_repository_backup_bytes           repository_id, name          on disk for its restore
                                                                        points (catalog)
sendense_repository_online                 repository_id, name          1 reachable, 0 not
sendense_scheduler_lag_seconds                                          how late the latest
                                                                        scheduled runs were claimed
sendense_scheduler_overdue_seconds                                      how long the most overdue
                                                                        scheduled run has waited
sendense_scheduler_queued_vms                                           VMs waiting in run queues
sendense_scheduler_oldest_queued_seconds                                age of the oldest of them
sendense_policy_runs                       status                       policy runs
sendense_policy_runs_missed                                             scheduled runs missed
                                                                        (downtime), summed
sendense_webhook_deliveries                status                       the outbox
sendense_build_info                        version                      1
========================================== ============================ ==========================

Who sees what: the whole hub for an unscoped token (viewer or more) or the
``metrics_token`` setting; a scoped token (a tenant) sees the job, byte,
VM and repository figures of its own VMs and repositories only, and none of
the hub-wide ones (scheduler, policy runs, webhooks). Never a credential:
labels are ids, kinds, statuses, repository names and (see below) VM names.

VM names (``vm`` label) follow the ``metrics_vm_names`` setting: ``auto``
shows them unless the catalog holds a live scoped token (a hub serving
several tenants, whose scrapes may end up in a shared Prometheus),
``always`` or ``never``. ``vm_id`` is always there.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sendense import __version__
from sendense.catalog.models import (
    ApiToken,
    Backup,
    BackupJob,
    Policy,
    PolicyRun,
    PolicyRunVm,
    Repository,
    Vm,
    WebhookDelivery,
)
from sendense.catalog.stores import RepositoryStore
from sendense.core.access import Principal
from sendense.core.errors import Error
from sendense.engine import inventory
from sendense.hub.state import HubState
from sendense.policy.schedule import Schedule
from sendense.scheduler.loop import since

# Scheduled runs whose claim delay makes the lag figure.
LAG_RUNS = 20


@functools.lru_cache(maxsize=1024)
def _schedule(expression: str, timezone: str) -> Schedule:
    return Schedule.parse(expression, timezone)


def vm_names_shown(s: Session, setting: str, now: datetime) -> bool:
    if setting == "always":
        return True
    if setting == "never":
        return False
    rows = s.execute(
        select(ApiToken.scope, ApiToken.expires_at).where(ApiToken.revoked_at.is_(None))
    )
    return not any(
        scope is not None and (expires is None or expires > now) for scope, expires in rows
    )


@dataclass
class Figures:
    """What a scrape reads from the catalog, for one caller (cached while the
    catalog is unchanged: `CatalogCache`)."""

    jobs: list[tuple[str, str, int]] = field(default_factory=list)
    last_success: list[tuple[str, str | None, float]] = field(default_factory=list)
    show_names: bool = True
    repositories: list[Repository] = field(default_factory=list)
    # repository id -> (restore points' bytes on disk, bytes they moved)
    usage: dict[str, tuple[int, int]] = field(default_factory=dict)
    hub_wide: dict[str, Any] | None = None


def read_figures(s: Session, who: Principal, vm_names: str, now: datetime) -> Figures:
    f = Figures()
    vms = s.execute(select(Vm.id, Vm.name, Vm.tags)).all()
    visible = None if who.scope is None else who.visible_vm_ids(vms)
    names = {vm_id: name for vm_id, name, _ in vms}
    f.show_names = vm_names_shown(s, vm_names, now)

    q = select(BackupJob.kind, BackupJob.status, func.count()).group_by(
        BackupJob.kind, BackupJob.status
    )
    if visible is not None:
        q = q.where(BackupJob.vm_id.in_(visible))
    f.jobs = [(kind, status, int(n)) for kind, status, n in s.execute(q).all()]

    last_q = (
        select(BackupJob.vm_id, func.max(BackupJob.finished_at))
        .where(
            BackupJob.kind == "backup",
            BackupJob.status == "completed",
            BackupJob.vm_id.is_not(None),
        )
        .group_by(BackupJob.vm_id)
    )
    if visible is not None:
        last_q = last_q.where(BackupJob.vm_id.in_(visible))
    f.last_success = [
        (vm_id, names.get(vm_id), finished.timestamp())
        for vm_id, finished in s.execute(last_q).all()
        if vm_id is not None and finished is not None
    ]

    f.repositories = [r for r in RepositoryStore(s).all() if who.can_see_repository(r.id)]
    usage_q = (
        select(
            Backup.repository_id,
            func.coalesce(func.sum(Backup.size_on_disk), 0),
            func.coalesce(func.sum(Backup.bytes_transferred), 0),
        )
        .where(Backup.status == "completed")
        .group_by(Backup.repository_id)
    )
    if visible is not None:
        usage_q = usage_q.where(Backup.vm_id.in_(visible))
    f.usage = {r: (int(on_disk), int(moved)) for r, on_disk, moved in s.execute(usage_q).all()}
    if who.scope is None:
        f.hub_wide = _hub_wide(s, now)
    return f


def _hub_wide(s: Session, now: datetime) -> dict[str, Any]:
    recent = s.execute(
        select(PolicyRun.created_at, PolicyRun.scheduled_at)
        .where(PolicyRun.trigger == "schedule")
        .order_by(PolicyRun.created_at.desc())
        .limit(LAG_RUNS)
    ).all()
    lag = max(((created - scheduled).total_seconds() for created, scheduled in recent), default=0.0)
    queued, oldest = s.execute(
        select(func.count(), func.min(PolicyRunVm.created_at)).where(PolicyRunVm.status == "queued")
    ).one()
    earliest: datetime | None = None
    for expression, zone, last, created in s.execute(
        select(Policy.schedule, Policy.timezone, Policy.last_scheduled_at, Policy.created_at).where(
            Policy.enabled.is_(True)
        )
    ).all():
        try:
            first = _schedule(expression, zone or "UTC").next_run(since(last, created))
        except Error:
            continue  # the scheduler logs it
        if first is not None and (earliest is None or first < earliest):
            earliest = first
    runs = s.execute(select(PolicyRun.status, func.count()).group_by(PolicyRun.status)).all()
    missed = s.scalar(select(func.coalesce(func.sum(PolicyRun.missed_count), 0)))
    deliveries = s.execute(
        select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
    ).all()
    return {
        "lag": max(lag, 0.0),
        "queued": int(queued or 0),
        "oldest_queued_at": oldest,
        "earliest_due_at": earliest,
        "runs": [(status, int(n)) for status, n in runs],
        "missed": int(missed or 0),
        "deliveries": [(status, int(n)) for status, n in deliveries],
    }


class CatalogCollector:
    """A prometheus_client collector over the catalog, for one caller."""

    def __init__(self, st: HubState, who: Principal) -> None:
        self.st = st
        self.who = who

    def _figures(self, now: datetime) -> Figures:
        setting = str(self.st.settings.metrics_vm_names)

        def compute() -> Figures:
            with self.st.db.session() as s:
                return read_figures(s, self.who, setting, now)

        cache = getattr(self.st, "cache", None)
        if cache is None:
            return compute()
        return cache.get(("metrics", self.who.scope, setting), compute)

    def collect(self) -> Iterator[Metric]:
        now = datetime.now(UTC)
        f = self._figures(now)
        jobs = GaugeMetricFamily(
            "sendense_jobs", "Jobs in the catalog by kind and status", labels=["kind", "status"]
        )
        for kind, status, n in f.jobs:
            jobs.add_metric([kind, status], n)
        yield jobs

        last = GaugeMetricFamily(
            "sendense_vm_last_success_timestamp_seconds",
            "End of the VM's latest completed backup job (Unix time)",
            labels=["vm_id", "vm"] if f.show_names else ["vm_id"],
        )
        for vm_id, name, at in f.last_success:
            last.add_metric([vm_id, name or ""] if f.show_names else [vm_id], at)
        yield last

        moved = GaugeMetricFamily(
            "sendense_backup_transferred_bytes",
            "Bytes moved by the completed restore points in each repository",
            labels=["repository_id"],
        )
        for repo in f.repositories:
            if repo.id in f.usage:
                moved.add_metric([repo.id], f.usage[repo.id][1])
        yield moved

        if f.hub_wide is not None:
            yield from self._hub_wide(f.hub_wide, now)
        # statvfs at each scrape (never cached), with no session open.
        yield from self._repositories(f.repositories, f.usage)
        info = GaugeMetricFamily("sendense_build_info", "The hub's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

    def _repositories(
        self, repos: list[Repository], usage: dict[str, tuple[int, int]]
    ) -> Iterator[Metric]:
        labels = ["repository_id", "name"]
        help_of = {
            "total": "Size of the repository's filesystem",
            "used": "Bytes used on the repository's filesystem",
            "available": "Bytes free for the hub on the repository's filesystem",
        }
        families = {
            key: GaugeMetricFamily(f"sendense_repository_{key}_bytes", text, labels=labels)
            for key, text in help_of.items()
        }
        backup_bytes = GaugeMetricFamily(
            "sendense_repository_backup_bytes",
            "Bytes on disk of the repository's completed restore points (catalog)",
            labels=labels,
        )
        online = GaugeMetricFamily(
            "sendense_repository_online", "1: the repository is reachable", labels=labels
        )
        for repo in repos:
            values = [repo.id, repo.name]
            up, _ = inventory.repository_status(repo)
            online.add_metric(values, 1 if up else 0)
            backup_bytes.add_metric(values, usage.get(repo.id, (0, 0))[0])
            if not up:
                continue
            capacity: dict[str, Any] = inventory.repository_capacity(repo)
            for key, family in families.items():
                if capacity.get(f"{key}_bytes") is not None:
                    family.add_metric(values, int(capacity[f"{key}_bytes"]))
        yield from (*families.values(), backup_bytes, online)

    def _hub_wide(self, h: dict[str, Any], now: datetime) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "sendense_scheduler_lag_seconds",
            f"Largest delay between the scheduled time and the claim of the latest {LAG_RUNS} "
            "scheduled policy runs",
            value=h["lag"],
        )
        yield GaugeMetricFamily(
            "sendense_scheduler_queued_vms", "VMs waiting in policy run queues", value=h["queued"]
        )
        oldest = h["oldest_queued_at"]
        yield GaugeMetricFamily(
            "sendense_scheduler_oldest_queued_seconds",
            "Age of the oldest VM waiting in a policy run queue (0: none)",
            value=max((now - oldest).total_seconds(), 0.0) if oldest is not None else 0.0,
        )
        due = h["earliest_due_at"]
        yield GaugeMetricFamily(
            "sendense_scheduler_overdue_seconds",
            "How long the most overdue scheduled run of an enabled policy has waited to be "
            "claimed (0: none due); grows while no scheduler runs",
            value=max((now - due).total_seconds(), 0.0) if due is not None else 0.0,
        )
        runs = GaugeMetricFamily("sendense_policy_runs", "Policy runs by status", labels=["status"])
        for status, n in h["runs"]:
            runs.add_metric([status], n)
        yield runs
        yield GaugeMetricFamily(
            "sendense_policy_runs_missed",
            "Scheduled policy runs missed while no hub ran (each stood for by one run)",
            value=h["missed"],
        )
        deliveries = GaugeMetricFamily(
            "sendense_webhook_deliveries", "Webhook deliveries by status", labels=["status"]
        )
        for status, n in h["deliveries"]:
            deliveries.add_metric([status], n)
        yield deliveries


def render(st: HubState, who: Principal) -> bytes:
    """The Prometheus text exposition of what ``who`` may see."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CatalogCollector(st, who))  # type: ignore[arg-type]
    return bytes(generate_latest(registry))
