"""Queries of the backups table(s)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, func, select, true, tuple_
from sqlalchemy.orm import Session

from sendense.catalog.models import Backup, Vm
from sendense.catalog.stores.common import ACTIVE


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

    def latest_for_vm(
        self, vm_id: str, repository_ids: Sequence[str] | None = None
    ) -> Backup | None:
        q = select(Backup).where(Backup.vm_id == vm_id, Backup.status == "completed")
        if repository_ids is not None:
            q = q.where(Backup.repository_id.in_(repository_ids))
        return self.s.scalar(q.order_by(Backup.created_at.desc()).limit(1))

    def latest_rows(
        self, vm_ids: Sequence[str] | None = None, repository_ids: Sequence[str] | None = None
    ) -> dict[str, Row[Any]]:
        """The newest completed backup of each VM (of ``vm_ids``, default all),
        as Core rows with ``vm_name``.

        One index probe per VM (``ix_backups_vm_status``); a GROUP BY over
        every completed backup was 5x slower at 100,000 backups (measured
        with bench/api_bench.py). PostgreSQL: one statement, a LATERAL
        subquery per VM (5,000 VMs: about half the time of the two steps
        below, which send 5,000 ids back).
        """
        if vm_ids is not None and not vm_ids:
            return {}
        only = () if repository_ids is None else (Backup.repository_id.in_(repository_ids),)
        if self.s.get_bind().dialect.name == "postgresql":
            newest = (
                select(Backup.__table__)
                .where(Backup.vm_id == Vm.id, Backup.status == "completed", *only)
                .order_by(Backup.created_at.desc())
                .limit(1)
                .lateral("newest")
            )
            q = select(newest, Vm.name.label("vm_name")).select_from(Vm).join(newest, true())
            if vm_ids is not None:
                q = q.where(Vm.id.in_(vm_ids))
            return {r.vm_id: r for r in self.s.execute(q)}
        newest_id = (
            select(Backup.id)
            .where(Backup.vm_id == Vm.id, Backup.status == "completed", *only)
            .order_by(Backup.created_at.desc())
            .limit(1)
            .correlate(Vm)
            .scalar_subquery()
        )
        q = select(Vm.id, newest_id)
        if vm_ids is not None:
            q = q.where(Vm.id.in_(vm_ids))
        # Two steps: inside one statement (``id IN (SELECT newest FROM vms)``)
        # SQLite scanned the backups instead of probing the index per VM (170 ms).
        ids = [bid for _, bid in self.s.execute(q) if bid]
        if not ids:
            return {}
        rows = self.s.execute(
            select(Backup.__table__, Vm.name.label("vm_name"))
            .join(Vm, Vm.id == Backup.vm_id)
            .where(Backup.id.in_(ids))
        ).all()
        return {r.vm_id: r for r in rows}

    def children(self, backup_id: str) -> Sequence[Backup]:
        return self.s.scalars(select(Backup).where(Backup.parent_id == backup_id)).all()

    def chain(self, vm_id: str, disk_index: int, repository_id: str | None = None) -> list[Backup]:
        q = select(Backup).where(
            Backup.vm_id == vm_id, Backup.disk_index == disk_index, Backup.status == "completed"
        )
        if repository_id:
            q = q.where(Backup.repository_id == repository_id)
        return list(self.s.scalars(q.order_by(Backup.created_at, Backup.id)).all())

    def key_at(self, f: BackupFilter, offset: int) -> tuple[datetime, str] | None:
        """The list position (``created_at``, ``id``) of the row at ``offset``;
        None past the end. From the index alone."""
        row = self.s.execute(
            select(Backup.created_at, Backup.id)
            .where(*f.conditions())
            .order_by(Backup.created_at.desc(), Backup.id.desc())
            .limit(1)
            .offset(offset)
        ).first()
        return None if row is None else (row[0], row[1])

    def page(
        self,
        f: BackupFilter,
        *,
        limit: int = 100,
        offset: int = 0,
        start: tuple[datetime, str] | None = None,
    ) -> Sequence[Row[Any]]:
        """One page of the list, newest first (``id`` breaks ties), as Core rows
        with the backups columns plus ``vm_name``.

        The page's ids come from the index alone (``ix_backups_created_id`` or
        the index of the filter, both ending in ``created_at, id``); only those
        rows are read whole. Reading whole rows while skipping ``offset`` of
        them cost 2.0 ms instead of 0.8 at offset 50,000 (SQLite). Core rows
        instead of ORM objects: building 100 objects and their VMs was two
        thirds of a list's CPU (bench/api_bench.py). ``start``: the position
        of the first row (`key_at`), which replaces ``offset``.
        """
        newest_first = (Backup.created_at.desc(), Backup.id.desc())
        conds = f.conditions()
        if start is not None:  # a seek in the index instead of skipping rows
            conds.append(tuple_(Backup.created_at, Backup.id) <= tuple_(*start))
        ids = (
            select(Backup.id)
            .where(*conds)
            .order_by(*newest_first)
            .limit(limit)
            .offset(offset)
            .scalar_subquery()
        )
        return self.s.execute(
            select(Backup.__table__, Vm.name.label("vm_name"))
            .join(Vm, Vm.id == Backup.vm_id)
            .where(Backup.id.in_(ids))
            .order_by(*newest_first)
        ).all()

    def count(self, f: BackupFilter) -> int:
        return self.s.scalar(select(func.count()).select_from(Backup).where(*f.conditions())) or 0

    def row(self, backup_id: str) -> Row[Any] | None:
        """One backup as a Core row (columns, ``vm_name``, ``vm_tags``)."""
        return self.s.execute(
            select(*BACKUP_ROW).join(Vm, Vm.id == Backup.vm_id).where(Backup.id == backup_id)
        ).first()

    def rows_of_job(self, job_ids: Sequence[str]) -> Sequence[Any]:
        """The restore points of these jobs (Core rows), by job and disk."""
        if not job_ids:
            return []
        return self.s.execute(
            select(
                Backup.job_id,
                Backup.id,
                Backup.disk_index,
                Backup.disk_key,
                Backup.backup_type,
                Backup.status,
            )
            .where(Backup.job_id.in_(job_ids))
            .order_by(Backup.job_id, Backup.disk_index)
        ).all()


# The columns of a backup row as lists and details read them.
BACKUP_ROW = (Backup.__table__, Vm.name.label("vm_name"), Vm.tags.label("vm_tags"))


@dataclass(frozen=True)
class BackupFilter:
    """What a backups list is filtered by (hashable: a cache key of its count)."""

    vm_id: str | None = None
    vm_ids: frozenset[str] | None = None  # a scoped caller: only these VMs
    repository_id: str | None = None
    repository_ids: tuple[str, ...] | None = None  # a scoped caller: only these
    backup_type: str | None = None
    status: str | None = None
    verify_status: str | None = None  # "never": not verified yet
    disk_index: int | None = None
    since: datetime | None = None
    until: datetime | None = None

    def conditions(self) -> list[Any]:
        conds: list[Any] = []
        if self.vm_id:
            conds.append(Backup.vm_id == self.vm_id)
        if self.vm_ids is not None:
            conds.append(Backup.vm_id.in_(sorted(self.vm_ids)))
        if self.repository_id:
            conds.append(Backup.repository_id == self.repository_id)
        if self.repository_ids is not None:
            conds.append(Backup.repository_id.in_(self.repository_ids))
        if self.verify_status == "never":
            conds.append(Backup.verify_status.is_(None))
        elif self.verify_status:
            conds.append(Backup.verify_status == self.verify_status)
        if self.backup_type:
            conds.append(Backup.backup_type == self.backup_type)
        if self.status:
            conds.append(Backup.status == self.status)
        if self.disk_index is not None:
            conds.append(Backup.disk_index == self.disk_index)
        if self.since:
            conds.append(Backup.created_at >= self.since)
        if self.until:
            conds.append(Backup.created_at <= self.until)
        return conds
