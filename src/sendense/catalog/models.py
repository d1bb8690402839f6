"""Catalog tables (SQLAlchemy 2 declarative models).

Ids are UUID strings so that several hubs sharing one PostgreSQL catalog never
collide. Times are timezone-aware UTC. A job row is always written before the
backup rows that reference it (one transaction, see ``engine/backup.py``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every database (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime()}


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    url: Mapped[str] = mapped_column(String(500))
    # The node's bearer token, encrypted with the hub's secret key.
    token_encrypted: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    # SHA-256 (hex) of the node's TLS certificate, pinned at registration, and
    # the certificate itself (PEM, public): the hub trusts it for this node only.
    fingerprint: Mapped[str | None] = mapped_column(String(64), default=None)
    certificate: Mapped[str | None] = mapped_column(Text, default=None)
    # Backup jobs that may run on this node at once (None: the hub's default,
    # SENDENSE_NODE_JOB_LIMIT); further jobs wait in the queue.
    max_jobs: Mapped[int | None] = mapped_column(Integer, default=None)


class Source(Base):
    __tablename__ = "sources"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"))
    type: Mapped[str] = mapped_column(String(20))
    # Non-secret part of the connection config, returned by the API.
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Secret fields (passwords, tokens) as encrypted JSON; never returned.
    secret_encrypted: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    node: Mapped[Node] = relationship()


class Vm(Base):
    __tablename__ = "vms"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source_id: Mapped[str] = mapped_column(ForeignKey("sources.id"))
    # Where the node reaches the VM (QMP socket path for qemu).
    path: Mapped[str] = mapped_column(String(1000))
    discovered_at: Mapped[datetime] = mapped_column(default=utcnow)
    # {"key": "value"}: policies and scoped tokens select VMs by tag.
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)

    source: Mapped[Source] = relationship()
    disks: Mapped[list[VmDisk]] = relationship(
        back_populates="vm", order_by="VmDisk.disk_index", cascade="all, delete-orphan"
    )


class VmDisk(Base):
    __tablename__ = "vm_disks"
    __table_args__ = (UniqueConstraint("vm_id", "disk_index"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"))
    disk_index: Mapped[int] = mapped_column(Integer)
    disk_key: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(200))
    capacity_bytes: Mapped[int] = mapped_column(BigInteger)
    size_gb: Mapped[float] = mapped_column()
    path: Mapped[str] = mapped_column(String(1000), default="")
    # Connector-specific handle of the disk (the QEMU block node name).
    node_name: Mapped[str] = mapped_column(String(200), default="")

    vm: Mapped[Vm] = relationship(back_populates="disks")


class Repository(Base):
    __tablename__ = "repositories"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    type: Mapped[str] = mapped_column(String(20), default="local")
    path: Mapped[str] = mapped_column(String(1000))
    immutable: Mapped[bool] = mapped_column(Boolean, default=False)
    retention_days: Mapped[int] = mapped_column(Integer, default=0)
    # Backups are QCOW2 with LUKS encryption; the key is in `RepositoryKey`.
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)
    # Type-specific settings (nfs/cifs: server, share, mount options); no secrets.
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Secret part of the config (a cifs password), encrypted; never returned.
    secret_encrypted: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(default=None)


class BackupJob(Base):
    """One job of any kind (``backup``, ``consolidate``, ``verify``, ``rescan``).

    ``owner`` is the hub process that runs it and ``lease_until`` how long that
    claim holds without renewal (engine/lifecycle.py): another hub process never
    finishes, cancels or recovers a job whose lease is live.
    """

    __tablename__ = "backup_jobs"
    # Lists are newest first with the id as tie-break: one index serves the
    # order and the tie-break (migration 0003).
    __table_args__ = (Index("ix_backup_jobs_created_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(20), default="backup")
    vm_id: Mapped[str | None] = mapped_column(ForeignKey("vms.id"), default=None, index=True)
    repository_id: Mapped[str | None] = mapped_column(ForeignKey("repositories.id"), default=None)
    node_id: Mapped[str | None] = mapped_column(ForeignKey("nodes.id"), default=None)
    status: Mapped[str] = mapped_column(String(20), default="pending", index=True)
    step: Mapped[str] = mapped_column(String(100), default="queued")
    requested_type: Mapped[str] = mapped_column(String(20))
    # Per disk progress: {"2000": {"bytes_done", "bytes_total", "rate", ...}}.
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    messages: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error_code: Mapped[str | None] = mapped_column(String(100), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    created_by: Mapped[str] = mapped_column(String(200), default="admin")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    timeout_at: Mapped[datetime | None] = mapped_column(default=None)
    # The hub process that owns the job (host, pid, instance id), for recovery.
    owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    # Set by any hub; the owner acts on it (cancel crosses hub processes).
    cancel_requested_at: Mapped[datetime | None] = mapped_column(default=None)
    # What the job was asked and planned to do (kind-specific), and its outcome.
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)

    vm: Mapped[Vm | None] = relationship()
    backups: Mapped[list[Backup]] = relationship(back_populates="job", order_by="Backup.disk_index")

    @property
    def vm_name(self) -> str | None:
        """As a Core row of `JobStore` reads carries it (hub/views.py takes both)."""
        return self.vm.name if self.vm else None


class Backup(Base):
    __tablename__ = "backups"
    # Indexes by the queries that use them (migration 0003, measured with
    # bench/api_bench.py): a single-column index on status matches nearly
    # every row and made SQLite pick it over the order of the list.
    __table_args__ = (
        Index("ix_backups_created_id", "created_at", "id"),  # lists, newest first
        Index("ix_backups_status_type", "status", "backup_type", "created_at", "id"),
        Index("ix_backups_vm_disk", "vm_id", "disk_index", "status", "created_at"),  # chains
        Index("ix_backups_vm_status", "vm_id", "status", "created_at"),  # last backup per VM
        Index("ix_backups_disk_latest", "vm_disk_id", "status", "created_at"),  # parent
        Index("ix_backups_parent_id", "parent_id"),  # dependents of a delete
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("backup_jobs.id"), index=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"))
    vm_disk_id: Mapped[str] = mapped_column(ForeignKey("vm_disks.id"))
    disk_index: Mapped[int] = mapped_column(Integer)
    disk_key: Mapped[int] = mapped_column(Integer)
    repository_id: Mapped[str] = mapped_column(ForeignKey("repositories.id"), index=True)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("backups.id"), default=None)
    backup_type: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default="pending")
    file_path: Mapped[str] = mapped_column(String(1000))
    nbd_export_name: Mapped[str] = mapped_column(String(200))
    nbd_port: Mapped[int | None] = mapped_column(Integer, default=None)
    nbd_pid: Mapped[int | None] = mapped_column(Integer, default=None)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_transferred: Mapped[int] = mapped_column(BigInteger, default=0)
    size_on_disk: Mapped[int] = mapped_column(BigInteger, default=0)
    change_id: Mapped[str | None] = mapped_column(String(300), default=None)
    previous_change_id: Mapped[str | None] = mapped_column(String(300), default=None)
    digest: Mapped[str | None] = mapped_column(String(200), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    immutable_until: Mapped[datetime | None] = mapped_column(default=None)
    # A consolidated base: made by merging older restore points, not copied.
    synthetic: Mapped[bool] = mapped_column(Boolean, default=False)
    verify_status: Mapped[str | None] = mapped_column(String(20), default=None)
    verified_at: Mapped[datetime | None] = mapped_column(default=None)
    verify_error: Mapped[str | None] = mapped_column(Text, default=None)

    job: Mapped[BackupJob] = relationship(back_populates="backups")
    vm: Mapped[Vm] = relationship()
    repository: Mapped[Repository] = relationship()

    @property
    def vm_name(self) -> str | None:
        """As a Core row of `BackupStore` reads carries it (hub/views.py takes both)."""
        return self.vm.name if self.vm else None


class BackupHold(Base):
    """Something that uses a restore point right now (a job, a restore session).

    A held backup cannot be deleted or merged away (409 ``in_use``). Holds are
    written in the same transaction as their holder and dropped when it ends.
    """

    __tablename__ = "backup_holds"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    backup_id: Mapped[str] = mapped_column(ForeignKey("backups.id"), index=True)
    holder_type: Mapped[str] = mapped_column(String(20))
    holder_id: Mapped[str] = mapped_column(String(36), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """An API token: only the SHA-256 of the secret is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # {"vms": [names or "tag:key=value"], "repositories": [ids]}; null: everything.
    scope: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200), default="admin")
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)


class AuditEntry(Base):
    """Who did what, when, with what result: every mutating or refused request."""

    __tablename__ = "audit_log"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    token_id: Mapped[str | None] = mapped_column(String(36), default=None)
    token_name: Mapped[str | None] = mapped_column(String(200), default=None, index=True)
    method: Mapped[str] = mapped_column(String(10))
    route: Mapped[str] = mapped_column(String(300), index=True)
    path: Mapped[str] = mapped_column(String(1000))
    target: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[int] = mapped_column(Integer)
    client: Mapped[str | None] = mapped_column(String(100), default=None)


class Policy(Base):
    """What to protect, when, where, and what to keep (SPEC §7).

    ``selector`` is ``{"vms": [names], "tags": {key: value}}``: a VM matches
    when it is named or carries every listed tag. ``retention`` holds the
    ``keep_*`` counts of ``sendense.policy.retention.RetentionPolicy``;
    ``window`` is ``{"start": "HH:MM", "end": "HH:MM"}`` in ``timezone`` or
    null. ``last_scheduled_at`` is the newest scheduled time the scheduler
    has claimed: runs missed after downtime are those after it.
    """

    __tablename__ = "policies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    selector: Mapped[dict[str, Any]] = mapped_column(default=dict)
    repository_id: Mapped[str] = mapped_column(ForeignKey("repositories.id"))
    schedule: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(100), default="UTC")
    full_every: Mapped[int | None] = mapped_column(Integer, default=None)
    retention: Mapped[dict[str, Any]] = mapped_column(default=dict)
    verify_after: Mapped[bool] = mapped_column(Boolean, default=False)
    window: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_by: Mapped[str] = mapped_column(String(200), default="admin")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(default=None)
    last_scheduled_at: Mapped[datetime | None] = mapped_column(default=None)


class PolicyRun(Base):
    """One run of a policy: scheduled (claimed once by any hub), caught up, or manual.

    The unique ``(policy_id, scheduled_at)`` is the claim: of several hub
    processes on one catalog, only the one whose insert succeeds runs it.
    ``trigger`` is ``schedule``, ``missed`` (one run standing for
    ``missed_count`` missed ones after downtime) or ``manual``.
    """

    __tablename__ = "policy_runs"
    __table_args__ = (
        UniqueConstraint("policy_id", "scheduled_at", name="uq_policy_runs_policy_scheduled"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    policy_id: Mapped[str] = mapped_column(ForeignKey("policies.id"), index=True)
    scheduled_at: Mapped[datetime] = mapped_column()
    trigger: Mapped[str] = mapped_column(String(20), default="schedule")
    missed_count: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(20), default="running")
    claimed_by: Mapped[str | None] = mapped_column(String(200), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)


class PolicyRunVm(Base):
    """One VM of a policy run: the queue the scheduler drains.

    ``status``: ``queued`` (waiting: node limit, busy VM, outside the window),
    ``started`` (``job_id`` set), ``skipped`` (with ``reason``), ``failed``
    (could not start, with ``reason``). ``not_before`` delays a retry.
    """

    __tablename__ = "policy_run_vms"
    __table_args__ = (Index("ix_policy_run_vms_status", "status", "not_before"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    run_id: Mapped[str] = mapped_column(ForeignKey("policy_runs.id"), index=True)
    policy_id: Mapped[str] = mapped_column(ForeignKey("policies.id"), index=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"), index=True)
    node_id: Mapped[str | None] = mapped_column(ForeignKey("nodes.id"), default=None)
    backup_type: Mapped[str] = mapped_column(String(20), default="incremental")
    status: Mapped[str] = mapped_column(String(20), default="queued")
    job_id: Mapped[str | None] = mapped_column(String(36), default=None, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime | None] = mapped_column(default=None)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(default=None)


class Webhook(Base):
    """A JSON POST on job events, for one policy or (``policy_id`` null) for all.

    ``events`` lists ``job.failed``, ``job.completed``, ``run.missed``; the
    optional secret (sent as a header) is stored encrypted and never answered.
    """

    __tablename__ = "webhooks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    policy_id: Mapped[str | None] = mapped_column(
        ForeignKey("policies.id"), default=None, index=True
    )
    url: Mapped[str] = mapped_column(String(2000))
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    secret_encrypted: Mapped[str | None] = mapped_column(Text, default=None)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[str] = mapped_column(String(200), default="admin")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """The outbox: one event for one webhook, retried with backoff until delivered.

    Written in the transaction that records the event, so a hub that stops
    before sending delivers it after restart (any hub on the catalog may).
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        UniqueConstraint("webhook_id", "event_key", name="uq_webhook_deliveries_event"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id"), index=True)
    event: Mapped[str] = mapped_column(String(50))
    # What happened, once: e.g. "job.failed:<job id>"; a second hub recording
    # the same event for the same webhook fails on the unique constraint.
    event_key: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)


class ConsoleSessionRecord(Base):
    """A web console sign-in (console/session.py): the cookie names it by a
    random id (stored here hashed); signing out revokes it, so a copied
    cookie stops working at once. ``token_id`` null: the bootstrap token."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_id: Mapped[str | None] = mapped_column(String(36), default=None, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class RepositoryKey(Base):
    """An encrypted repository's data key, wrapped with the hub's master key
    (a file outside the catalog, settings ``master_key_file``)."""

    __tablename__ = "repository_keys"

    repository_id: Mapped[str] = mapped_column(
        ForeignKey("repositories.id", ondelete="CASCADE"), primary_key=True
    )
    key_id: Mapped[str] = mapped_column(String(64))
    wrapped_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Hub(Base):
    """A hub process sharing the catalog: ``id`` is its lifecycle owner string
    (``host/pid/instance``). It renews ``heartbeat_at`` with its job leases;
    from another host it is dead once the heartbeat is older than the lease."""

    __tablename__ = "hubs"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(default=None)


class NbdPort(Base):
    """An NBD port a hub process serves a target on. Inserting the row is the
    claim: the primary key ``(host, port)`` lets one hub win."""

    __tablename__ = "nbd_ports"

    host: Mapped[str] = mapped_column(String(200), primary_key=True)
    port: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    backup_id: Mapped[str | None] = mapped_column(String(36), default=None)
    lease_until: Mapped[datetime] = mapped_column()


class CatalogTopic(Base):
    """A change counter: triggers bump ``version`` when a row the topic's
    answers depend on is committed (catalog/topics.py)."""

    __tablename__ = "catalog_topics"

    topic: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class VmChange(Base):
    """The topic ``vms`` version at which a VM's rows (the VM, its disks, its
    completed restore points) last changed; written by triggers
    (catalog/topics.py). No foreign key: a deleted VM's row stays."""

    __tablename__ = "vm_changes"

    vm_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, index=True)
