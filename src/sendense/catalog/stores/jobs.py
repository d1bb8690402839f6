"""Queries of the jobs table(s)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from sendense.catalog.models import BackupJob
from sendense.catalog.stores.common import ACTIVE


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

    def active_of_kind(self, vm_id: str, kind: str) -> BackupJob | None:
        """A pending or running job of ``kind`` on the VM, if any."""
        return self.s.scalar(
            select(BackupJob)
            .where(BackupJob.vm_id == vm_id, BackupJob.kind == kind, BackupJob.status.in_(ACTIVE))
            .limit(1)
        )

    def list(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        vm_id: str | None = None,
        vm_ids: set[str] | None = None,
        repository_ids: Sequence[str] | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[Sequence[BackupJob], int]:
        q = select(BackupJob)
        if status:
            q = q.where(BackupJob.status == status)
        if kind:
            q = q.where(BackupJob.kind == kind)
        if vm_id:
            q = q.where(BackupJob.vm_id == vm_id)
        if vm_ids is not None:  # a scoped caller: only jobs of these VMs
            q = q.where(BackupJob.vm_id.in_(sorted(vm_ids)))
        if repository_ids is not None:  # ... into these repositories
            q = q.where(BackupJob.repository_id.in_(repository_ids))
        total = self.s.scalar(select(func.count()).select_from(q.subquery())) or 0
        rows = self.s.scalars(
            q.options(selectinload(BackupJob.backups), selectinload(BackupJob.vm))
            .order_by(BackupJob.created_at.desc(), BackupJob.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
        return rows, total
