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
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BackupJob(Base):
    __tablename__ = "backup_jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(20), default="backup")
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"))
    repository_id: Mapped[str] = mapped_column(ForeignKey("repositories.id"))
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"))
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
    # The hub process that owns the job (its pid and boot id), for crash recovery.
    owner: Mapped[str | None] = mapped_column(String(200), default=None)

    vm: Mapped[Vm] = relationship()
    backups: Mapped[list[Backup]] = relationship(back_populates="job", order_by="Backup.disk_index")


class Backup(Base):
    __tablename__ = "backups"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("backup_jobs.id"), index=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"), index=True)
    vm_disk_id: Mapped[str] = mapped_column(ForeignKey("vm_disks.id"))
    disk_index: Mapped[int] = mapped_column(Integer)
    disk_key: Mapped[int] = mapped_column(Integer)
    repository_id: Mapped[str] = mapped_column(ForeignKey("repositories.id"), index=True)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("backups.id"), default=None)
    backup_type: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default="pending", index=True)
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
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    immutable_until: Mapped[datetime | None] = mapped_column(default=None)

    job: Mapped[BackupJob] = relationship(back_populates="backups")
    vm: Mapped[Vm] = relationship()
    repository: Mapped[Repository] = relationship()
