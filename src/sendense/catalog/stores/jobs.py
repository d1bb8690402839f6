"""Queries of the jobs table(s)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import Row, and_, bindparam, func, select
from sqlalchemy.orm import Session, selectinload

from sendense.catalog.models import Backup, BackupJob, Vm
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

    def row_with_backups(self, job_id: str) -> tuple[Row[Any] | None, list[Any]]:
        """One job as a Core row (its columns, ``vm_name``, ``vm_tags``) and
        the restore points of a backup job (`JOB_BACKUP_ROW`) by disk, in
        one statement: a job's details are the hottest request of all."""
        rows = self.s.execute(_JOB_WITH_BACKUPS, {"job_id": job_id}).all()
        if not rows:
            return None, []
        backups = [
            _JobBackup(job_id, r.b_id, r.b_disk_index, r.b_disk_key, r.b_backup_type, r.b_status)
            for r in rows
            if r.b_id is not None
        ]
        return rows[0], backups

    def page(
        self, f: JobFilter, *, limit: int = 50, offset: int = 0
    ) -> tuple[Sequence[Row[Any]], Sequence[Any]]:
        """One page of jobs, newest first (``id`` breaks ties), as Core rows
        with ``vm_name`` (see `BackupStore.page`: ids from the index, then
        whole rows), and the restore points of those jobs (``job_id``, ``id``,
        ``disk_index``, ``disk_key``, ``backup_type``, ``status``) by job and
        disk. Both select by the same id subquery: no IN list of 50 ids to
        build (a fifth of the request's CPU)."""
        newest_first = (_J.c.created_at.desc(), _J.c.id.desc())
        ids = (
            select(_J.c.id)
            .where(*f.conditions())
            .order_by(*newest_first)
            .limit(limit)
            .offset(offset)
            .scalar_subquery()
        )
        jobs = self.s.execute(
            select(*JOB_ROW[:2])
            .select_from(_J.outerjoin(_V, _V.c.id == _J.c.vm_id))
            .where(_J.c.id.in_(ids))
            .order_by(*newest_first)
        ).all()
        backups = self.s.execute(
            select(*JOB_BACKUP_ROW)
            .where(_B.c.job_id.in_(ids))
            .order_by(_B.c.job_id, _B.c.disk_index)
        ).all()
        return jobs, backups

    def count(self, f: JobFilter) -> int:
        return self.s.scalar(select(func.count()).select_from(_J).where(*f.conditions())) or 0


# The read paths select table columns, not ORM attributes: a statement of
# plain columns skips the ORM's compile and loading steps (a third of the
# CPU of a job's details on PostgreSQL; bench/api_bench.py), and the hottest
# ones are built once, with bound parameters.
_J, _V, _B = BackupJob.__table__, Vm.__table__, Backup.__table__
JOB_ROW = (_J, _V.c.name.label("vm_name"), _V.c.tags.label("vm_tags"))
# A job's restore points as a job's answer shows them.
JOB_BACKUP_ROW = (
    _B.c.job_id,
    _B.c.id,
    _B.c.disk_index,
    _B.c.disk_key,
    _B.c.backup_type,
    _B.c.status,
)
_JOB_WITH_BACKUPS = (
    select(
        *JOB_ROW,
        _B.c.id.label("b_id"),
        _B.c.disk_index.label("b_disk_index"),
        _B.c.disk_key.label("b_disk_key"),
        _B.c.backup_type.label("b_backup_type"),
        _B.c.status.label("b_status"),
    )
    .select_from(
        _J.outerjoin(_V, _V.c.id == _J.c.vm_id).outerjoin(
            _B, and_(_B.c.job_id == _J.c.id, _J.c.kind == "backup")
        )
    )
    .where(_J.c.id == bindparam("job_id"))
    .order_by(_B.c.disk_index)
)


class _JobBackup(NamedTuple):
    """A restore point of a job, as `JOB_BACKUP_ROW` names its columns."""

    job_id: str
    id: str
    disk_index: int
    disk_key: int
    backup_type: str
    status: str


@dataclass(frozen=True)
class JobFilter:
    """What a jobs list is filtered by (hashable: a cache key of its count)."""

    status: str | None = None
    kind: str | None = None
    vm_id: str | None = None
    vm_ids: frozenset[str] | None = None  # a scoped caller: only jobs of these VMs
    repository_ids: tuple[str, ...] | None = None  # ... into these repositories

    def conditions(self) -> list[Any]:
        conds: list[Any] = []
        if self.status:
            conds.append(_J.c.status == self.status)
        if self.kind:
            conds.append(_J.c.kind == self.kind)
        if self.vm_id:
            conds.append(_J.c.vm_id == self.vm_id)
        if self.vm_ids is not None:
            conds.append(_J.c.vm_id.in_(sorted(self.vm_ids)))
        if self.repository_ids is not None:
            conds.append(_J.c.repository_id.in_(self.repository_ids))
        return conds
