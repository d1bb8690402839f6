"""Queries of the sources table(s), and what uses a source (or a node):
its VMs, their restore points and their jobs (for removal)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import ColumnElement, delete, func, or_, select, update
from sqlalchemy.orm import Session

from sendense.catalog.models import Backup, BackupHold, BackupJob, Source, Vm
from sendense.catalog.stores.common import ACTIVE

# Backup rows that are no restore point: their files are gone (engine/backup.py
# removes them when a job fails or is cancelled); only the record is left.
NOT_A_RESTORE_POINT = ("failed", "cancelled")


class SourceStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, source_id: str) -> Source | None:
        return self.s.get(Source, source_id)

    def by_name(self, name: str) -> Source | None:
        return self.s.scalar(select(Source).where(Source.name == name))

    def all(self) -> Sequence[Source]:
        return self.s.scalars(select(Source).order_by(Source.name)).all()

    def of_node(self, node_id: str) -> Sequence[Source]:
        return self.s.scalars(
            select(Source).where(Source.node_id == node_id).order_by(Source.name)
        ).all()

    def vms(self, source_ids: Sequence[str]) -> Sequence[Vm]:
        return self.s.scalars(
            select(Vm).where(Vm.source_id.in_(source_ids)).order_by(Vm.name)
        ).all()

    def restore_points_per_vm(self, vm_ids: Sequence[str]) -> dict[str, int]:
        """vm_id -> number of restore points (any backup not failed/cancelled)."""
        rows = self.s.execute(
            select(Backup.vm_id, func.count())
            .where(Backup.vm_id.in_(vm_ids), Backup.status.not_in(NOT_A_RESTORE_POINT))
            .group_by(Backup.vm_id)
        ).all()
        return {vm_id: int(n) for vm_id, n in rows}

    def active_jobs(self, vm_ids: Sequence[str], node_id: str | None = None) -> Sequence[BackupJob]:
        """Pending or running jobs of these VMs (or on this node)."""
        cond: ColumnElement[bool] = BackupJob.vm_id.in_(vm_ids)
        if node_id is not None:
            cond = or_(cond, BackupJob.node_id == node_id)
        return self.s.scalars(
            select(BackupJob).where(cond, BackupJob.status.in_(ACTIVE)).order_by(BackupJob.id)
        ).all()

    def drop_vms(self, vm_ids: Sequence[str]) -> int:
        """Remove VMs that have no restore point and no active job: their
        failed/cancelled backup records go, their ended jobs stay (history)
        without the VM. Returns the number of backup records removed."""
        if not vm_ids:
            return 0
        dead = select(Backup.id).where(Backup.vm_id.in_(vm_ids))
        self.s.execute(delete(BackupHold).where(BackupHold.backup_id.in_(dead)))
        self.s.execute(update(Backup).where(Backup.parent_id.in_(dead)).values(parent_id=None))
        n = len(self.s.scalars(dead).all())
        self.s.execute(delete(Backup).where(Backup.vm_id.in_(vm_ids)))
        self.s.execute(update(BackupJob).where(BackupJob.vm_id.in_(vm_ids)).values(vm_id=None))
        for vm in self.s.scalars(select(Vm).where(Vm.id.in_(vm_ids))).all():
            self.s.delete(vm)  # its disks with it (cascade)
        return n

    def drop(self, source: Source) -> None:
        self.s.delete(source)
