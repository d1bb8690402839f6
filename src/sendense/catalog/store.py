"""Catalog queries. Services call these; nothing else writes SQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from sendense.catalog.models import Backup, BackupJob, Node, Repository, Source, Vm, VmDisk

ACTIVE = ("pending", "running")


class NodeStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, node_id: str) -> Node | None:
        return self.s.get(Node, node_id)

    def by_name(self, name: str) -> Node | None:
        return self.s.scalar(select(Node).where(Node.name == name))

    def all(self) -> Sequence[Node]:
        return self.s.scalars(select(Node).order_by(Node.name)).all()


class SourceStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, source_id: str) -> Source | None:
        return self.s.get(Source, source_id)

    def by_name(self, name: str) -> Source | None:
        return self.s.scalar(select(Source).where(Source.name == name))

    def all(self) -> Sequence[Source]:
        return self.s.scalars(select(Source).order_by(Source.name)).all()


class VmStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def by_name(self, name: str) -> Vm | None:
        return self.s.scalar(select(Vm).where(Vm.name == name).options(selectinload(Vm.disks)))

    def get(self, vm_id: str) -> Vm | None:
        return self.s.scalar(select(Vm).where(Vm.id == vm_id).options(selectinload(Vm.disks)))

    def all(self) -> Sequence[Vm]:
        return self.s.scalars(select(Vm).options(selectinload(Vm.disks)).order_by(Vm.name)).all()


class RepositoryStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, repo_id: str) -> Repository | None:
        return self.s.get(Repository, repo_id)

    def all(self) -> Sequence[Repository]:
        return self.s.scalars(select(Repository).order_by(Repository.name)).all()


class JobStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, job_id: str) -> BackupJob | None:
        return self.s.scalar(
            select(BackupJob)
            .where(BackupJob.id == job_id)
            .options(selectinload(BackupJob.backups), selectinload(BackupJob.vm))
        )

    def active(self) -> Sequence[BackupJob]:
        return self.s.scalars(
            select(BackupJob)
            .where(BackupJob.status.in_(ACTIVE))
            .options(selectinload(BackupJob.backups))
        ).all()

    def list(
        self,
        *,
        status: str | None = None,
        vm_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[Sequence[BackupJob], int]:
        q = select(BackupJob)
        if status:
            q = q.where(BackupJob.status == status)
        if vm_id:
            q = q.where(BackupJob.vm_id == vm_id)
        total = self.s.scalar(select(func.count()).select_from(q.subquery())) or 0
        rows = self.s.scalars(
            q.options(selectinload(BackupJob.backups), selectinload(BackupJob.vm))
            .order_by(BackupJob.created_at.desc())
            .limit(limit)
            .offset(offset)
        ).all()
        return rows, total


class BackupStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, backup_id: str) -> Backup | None:
        return self.s.get(Backup, backup_id)

    def active_for_vm(self, vm_id: str) -> Sequence[Backup]:
        return self.s.scalars(
            select(Backup).where(Backup.vm_id == vm_id, Backup.status.in_(ACTIVE))
        ).all()

    def latest_completed(self, vm_disk_id: str, repository_id: str) -> Backup | None:
        return self.s.scalar(
            select(Backup)
            .where(
                Backup.vm_disk_id == vm_disk_id,
                Backup.repository_id == repository_id,
                Backup.status == "completed",
            )
            .order_by(Backup.created_at.desc(), Backup.id.desc())
            .limit(1)
        )

    def latest_for_vm(self, vm_id: str) -> Backup | None:
        return self.s.scalar(
            select(Backup)
            .where(Backup.vm_id == vm_id, Backup.status == "completed")
            .order_by(Backup.created_at.desc())
            .limit(1)
        )

    def children(self, backup_id: str) -> Sequence[Backup]:
        return self.s.scalars(select(Backup).where(Backup.parent_id == backup_id)).all()

    def chain(self, vm_id: str, disk_index: int, repository_id: str | None = None) -> list[Backup]:
        q = select(Backup).where(
            Backup.vm_id == vm_id, Backup.disk_index == disk_index, Backup.status == "completed"
        )
        if repository_id:
            q = q.where(Backup.repository_id == repository_id)
        return list(self.s.scalars(q.order_by(Backup.created_at, Backup.id)).all())

    def list(
        self,
        *,
        vm_id: str | None = None,
        repository_id: str | None = None,
        backup_type: str | None = None,
        status: str | None = None,
        disk_index: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[Sequence[Backup], int]:
        q = select(Backup)
        conds: list[Any] = []
        if vm_id:
            conds.append(Backup.vm_id == vm_id)
        if repository_id:
            conds.append(Backup.repository_id == repository_id)
        if backup_type:
            conds.append(Backup.backup_type == backup_type)
        if status:
            conds.append(Backup.status == status)
        if disk_index is not None:
            conds.append(Backup.disk_index == disk_index)
        if since:
            conds.append(Backup.created_at >= since)
        if until:
            conds.append(Backup.created_at <= until)
        if conds:
            q = q.where(*conds)
        total = self.s.scalar(select(func.count()).select_from(q.subquery())) or 0
        rows = self.s.scalars(
            q.options(selectinload(Backup.vm))
            .order_by(Backup.created_at.desc(), Backup.id)
            .limit(limit)
            .offset(offset)
        ).all()
        return rows, total


def disk_of(vm: Vm, index: int) -> VmDisk | None:
    for d in vm.disks:
        if d.disk_index == index:
            return d
    return None
