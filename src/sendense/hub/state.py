"""Everything one hub process holds: settings, catalog, secrets, ports, engine.

Each hub process (each API worker process too) registers in the catalog's
``hubs`` table at start and renews its heartbeat with its job leases
(engine/hubs.py); on SQLite a second hub is refused at start. On PostgreSQL
its NBD ports are claimed in the catalog (nbd/ports.py), and every tick it
takes over the jobs and releases the ports of hub processes that died.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sendense.auth import ensure_token
from sendense.catalog.cache import CatalogCache
from sendense.catalog.db import Database
from sendense.engine import hubs
from sendense.engine.backup import BackupEngine
from sendense.engine.consolidate import ConsolidateJob
from sendense.engine.delete import recover_deletes
from sendense.engine.inventory import (
    ensure_default_repository,
    mount_repositories,
    seal_source_secrets,
)
from sendense.engine.lifecycle import JobLifecycle, LocalJob
from sendense.engine.locks import LockSweeper
from sendense.engine.rescan import RescanJob
from sendense.engine.retention import RetentionJob
from sendense.engine.verify import VerifyJob
from sendense.hub.audit.middleware import AuditWriter
from sendense.hub.nodes.health import NodeHealthMonitor
from sendense.nbd.ports import PortAllocator
from sendense.notify import Backoff, WebhookSender
from sendense.notify.sealed import seal_stored_urls
from sendense.restore.disk import RestoreJob
from sendense.restore.export import ExportJob
from sendense.restore.sessions import MountJob, SessionPools
from sendense.scheduler.loop import Scheduler
from sendense.secretbox import SecretBox
from sendense.settings import HubSettings

log = logging.getLogger(__name__)

# Factories of the job kinds the hub runs itself (engine/<kind>.py), given the
# hub's state: each returns a `LocalJob`. Filled as kinds land.
JOB_KINDS: list[Callable[[HubState], LocalJob]] = [
    ConsolidateJob,
    VerifyJob,
    RescanJob,
    RestoreJob,
    ExportJob,
    MountJob,
    RetentionJob,
]


@dataclass
class HubState:
    settings: HubSettings
    db: Database
    secrets: SecretBox
    ports: PortAllocator
    engine: BackupEngine
    admin_token: str
    lifecycle: JobLifecycle
    locks: LockSweeper | None = None
    node_health: NodeHealthMonitor | None = None
    audit: AuditWriter | None = None
    # Costly answers reused while the catalog is unchanged (catalog/cache.py).
    cache: CatalogCache = None  # type: ignore[assignment]  # set by open()
    # This process's filesystem workers of restore sessions (restore/sessions.py).
    restore_pools: SessionPools = None  # type: ignore[assignment]  # set by open()
    # Records job ends as webhook events and sends the outbox (notify/sender.py).
    webhooks: WebhookSender | None = None
    # The policy scheduler (scheduler/loop.py): in API worker 0 only, when
    # settings.scheduler; hub hosts sharing a catalog rely on its claims.
    scheduler: Scheduler | None = None

    @classmethod
    def open(cls, settings: HubSettings) -> HubState:
        data_dir = settings.data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        # Tokens, the secret key and the catalog live here: owner only.
        data_dir.chmod(0o700)
        settings.data_dir = data_dir
        token = ensure_token(data_dir / "admin.token")
        db = Database(settings.catalog_url)
        db.upgrade()
        lifecycle = JobLifecycle(db, lease_seconds=settings.job_lease)
        sqlite = db.url.get_backend_name() == "sqlite"
        # In the registry of hub processes (engine/hubs.py). SQLite serves one
        # hub: its first API worker refuses to start beside another hub.
        hubs.register(
            db, lifecycle.owner, lease=lifecycle.lease, single=sqlite and settings.worker_index == 0
        )
        secrets = SecretBox(data_dir / "secret.key")
        if sqlite:
            # One hub: its API worker processes split the range among them.
            ports = PortAllocator(
                settings.nbd_port_first,
                settings.nbd_port_last,
                settings.nbd_bind,
                stride=settings.worker_count,
                offset=settings.worker_index,
            )
        else:
            # Several hubs, maybe on one host: every port claimed in the catalog.
            ports = PortAllocator(
                settings.nbd_port_first,
                settings.nbd_port_last,
                settings.nbd_bind,
                db=db,
                owner=lifecycle.owner,
                lease_seconds=settings.job_lease,
            )
        engine = BackupEngine(db, settings, ports, secrets, lifecycle)
        state = cls(settings, db, secrets, ports, engine, token, lifecycle)
        state.cache = CatalogCache(db)
        state.restore_pools = SessionPools(db)
        if not settings.restore_dirs:  # the default place of whole-disk restores
            (data_dir / "restores").mkdir(mode=0o700, exist_ok=True)
        with db.session() as s:
            ensure_default_repository(s, data_dir / "repositories" / "default")
        seal_source_secrets(db, secrets)  # credentials only ever encrypted at rest
        seal_stored_urls(db, secrets)  # webhook URL passwords of rows from before sealing
        mount_repositories(db, secrets, data_dir / "run")  # shares the hub mounts itself
        for register in JOB_KINDS:
            lifecycle.register(register(state))
        recover_deletes(db)  # deletes a dead hub left half done: files, then rows
        resolved = engine.recover() + lifecycle.recover_local()
        if resolved:
            log.warning("resolved jobs left running by a previous hub: %s", resolved)
        ports.release_dead()  # after recovery: ports of adopted jobs are ours now
        lifecycle.start_renewing(state.tick)
        engine.dispatcher.start()  # queued backups: claimed when a node has a slot
        # Immutable attributes follow the catalog's locks (now, then periodically).
        state.locks = LockSweeper(db, settings.lock_sweep_interval)
        state.locks.start()
        # GET /nodes reads node health from this cache, refreshed in the background.
        state.node_health = NodeHealthMonitor(db, secrets, interval=settings.node_health_interval)
        state.node_health.start()
        state.audit = AuditWriter(db, settings.audit_retention_days)
        if settings.scheduler and settings.worker_index == 0:
            state.scheduler = Scheduler(state)
            state.scheduler.start()
        if settings.webhooks and settings.worker_index == 0:  # one sender per hub host
            state.webhooks = WebhookSender(
                db,
                secrets,
                interval=settings.webhook_interval,
                timeout=settings.webhook_timeout,
                backoff=Backoff(
                    settings.webhook_backoff,
                    settings.webhook_backoff_max,
                    settings.webhook_max_attempts,
                ),
                retention_days=settings.webhook_retention_days,
            )
            state.webhooks.start()
        return state

    def tick(self) -> None:
        """Every third of the lease, after the job leases are renewed: the
        heartbeat and port claims too, then what dead hubs left."""
        hubs.heartbeat(self.db, self.lifecycle.owner)
        self.ports.renew()
        self.take_over_orphans()
        self.ports.release_dead()

    def take_over_orphans(self) -> None:
        """Jobs whose hub process died while this one runs (several hubs on
        one catalog): adopt, finish or fail them as at start."""
        resolved = self.engine.recover(sweep_pidfiles=False) + self.lifecycle.recover_local()
        if resolved:
            log.warning("took over jobs of a hub process that is gone: %s", resolved)

    def close(self) -> None:
        if self.webhooks is not None:
            self.webhooks.stop()
        if self.scheduler is not None:
            self.scheduler.stop()
        self.engine.dispatcher.stop()
        if self.restore_pools is not None:
            self.restore_pools.shutdown()
        if self.audit is not None:
            self.audit.close()
        if self.node_health is not None:
            self.node_health.stop()
        if self.locks is not None:
            self.locks.stop()
        self.engine.shutdown()
        try:
            hubs.stopped(self.db, self.lifecycle.owner)  # other hubs need not wait
        except Exception:
            log.exception("could not record this hub's stop in the catalog")
        self.db.dispose()
