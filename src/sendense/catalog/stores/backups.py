"""Queries of the backups table(s)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, func, select, true, tuple_
from sqlalchemy.orm import Session

from sendense.catalog.models import Backup, Vm, VmDisk
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
        below, which send 5,000 ids back). Ties (the disks of one backup
        run) go to the greatest id, so every query answers the same row.
        """
        if vm_ids is not None and not vm_ids:
            return {}
        only = () if repository_ids is None else (Backup.repository_id.in_(repository_ids),)
        if self.s.get_bind().dialect.name == "postgresql":
            newest = (
                select(Backup.__table__)
                .where(Backup.vm_id == Vm.id, Backup.status == "completed", *only)
                .order_by(Backup.created_at.desc(), Backup.id.desc())
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
            .order_by(Backup.created_at.desc(), Backup.id.desc())
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

    def chain_vm(self, *, name: str | None = None, vm_id: str | None = None) -> Sequence[Any]:
        """What a chain answer needs of a VM (by ``name`` or ``vm_id``): one
        Core row per disk (``id``, ``name``, ``tags``, ``disk_index``,
        ``disk_key``; no disk columns for a VM without disks), by disk.
        Empty when there is no such VM."""
        if name is not None:
            return self.s.execute(_CHAIN_VM_BY_NAME, {"name": name}).all()
        return self.s.execute(_CHAIN_VM_BY_ID, {"vm_id": vm_id}).all()

    def chain_rows(
        self, vm_id: str, disk_index: int | None = None, repository_id: str | None = None
    ) -> Sequence[Any]:
        """The completed restore points of a VM's disks (of ``disk_index``
        only, if given), oldest first per disk, as Core rows of the columns a
        chain shows: one statement for every disk, no ORM objects."""
        q = select(*CHAIN_ROW).where(_B.c.vm_id == vm_id, _B.c.status == "completed")
        if disk_index is not None:
            q = q.where(_B.c.disk_index == disk_index)
        if repository_id:
            q = q.where(_B.c.repository_id == repository_id)
        return self.s.execute(q.order_by(_B.c.disk_index, _B.c.created_at, _B.c.id)).all()

    def key_at(self, f: BackupFilter, offset: int) -> tuple[datetime, str] | None:
        """The list position (``created_at``, ``id``) of the row at ``offset``;
        None past the end. From the index alone."""
        row = self.s.execute(
            select(_B.c.created_at, _B.c.id)
            .where(*f.conditions())
            .order_by(_B.c.created_at.desc(), _B.c.id.desc())
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
        newest_first = (_B.c.created_at.desc(), _B.c.id.desc())
        conds = f.conditions()
        if start is not None:  # a seek in the index instead of skipping rows
            conds.append(tuple_(_B.c.created_at, _B.c.id) <= tuple_(*start))
        ids = (
            select(_B.c.id)
            .where(*conds)
            .order_by(*newest_first)
            .limit(limit)
            .offset(offset)
            .scalar_subquery()
        )
        return self.s.execute(
            select(*BACKUP_ROW[:2])
            .select_from(_B.join(_V, _V.c.id == _B.c.vm_id))
            .where(_B.c.id.in_(ids))
            .order_by(*newest_first)
        ).all()

    def count(self, f: BackupFilter) -> int:
        return self.s.scalar(select(func.count()).select_from(_B).where(*f.conditions())) or 0

    def row(self, backup_id: str) -> Row[Any] | None:
        """One backup as a Core row (columns, ``vm_name``, ``vm_tags``)."""
        return self.s.execute(_BACKUP_BY_ID, {"backup_id": backup_id}).first()


# The read paths select table columns, not ORM attributes: a statement of
# plain columns skips the ORM's compile and loading steps (a third of the
# CPU of a backup's details on PostgreSQL; bench/api_bench.py), and the
# hottest ones are built once, with bound parameters.
_B, _V, _D = Backup.__table__, Vm.__table__, VmDisk.__table__
# The columns of a backup row as lists and details read them.
BACKUP_ROW = (_B, _V.c.name.label("vm_name"), _V.c.tags.label("vm_tags"))
# ... and as a chain shows them.
CHAIN_ROW = (
    _B.c.id,
    _B.c.disk_index,
    _B.c.repository_id,
    _B.c.backup_type,
    _B.c.parent_id,
    _B.c.file_path,
    _B.c.size_on_disk,
    _B.c.bytes_transferred,
    _B.c.change_id,
    _B.c.synthetic,
    _B.c.verify_status,
    _B.c.immutable_until,
    _B.c.created_at,
)
_BACKUP_BY_ID = (
    select(*BACKUP_ROW)
    .select_from(_B.join(_V, _V.c.id == _B.c.vm_id))
    .where(_B.c.id == bindparam("backup_id"))
)
_CHAIN_VM = select(_V.c.id, _V.c.name, _V.c.tags, _D.c.disk_index, _D.c.disk_key).select_from(
    _V.outerjoin(_D, _D.c.vm_id == _V.c.id)
)
_CHAIN_VM_BY_NAME = _CHAIN_VM.where(_V.c.name == bindparam("name")).order_by(_D.c.disk_index)
_CHAIN_VM_BY_ID = _CHAIN_VM.where(_V.c.id == bindparam("vm_id")).order_by(_D.c.disk_index)


@dataclass(frozen=True)
class BackupFilter:
    """What a backups list is filtered by (hashable: a cache key of its count)."""

    vm_id: str | None = None
    vm_name: str | None = None  # the VM of that name (none: no rows)
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
            conds.append(_B.c.vm_id == self.vm_id)
        if self.vm_name:
            conds.append(
                _B.c.vm_id == select(_V.c.id).where(_V.c.name == self.vm_name).scalar_subquery()
            )
        if self.vm_ids is not None:
            conds.append(_B.c.vm_id.in_(sorted(self.vm_ids)))
        if self.repository_id:
            conds.append(_B.c.repository_id == self.repository_id)
        if self.repository_ids is not None:
            conds.append(_B.c.repository_id.in_(self.repository_ids))
        if self.verify_status == "never":
            conds.append(_B.c.verify_status.is_(None))
        elif self.verify_status:
            conds.append(_B.c.verify_status == self.verify_status)
        if self.backup_type:
            conds.append(_B.c.backup_type == self.backup_type)
        if self.status:
            conds.append(_B.c.status == self.status)
        if self.disk_index is not None:
            conds.append(_B.c.disk_index == self.disk_index)
        if self.since:
            conds.append(_B.c.created_at >= self.since)
        if self.until:
            conds.append(_B.c.created_at <= self.until)
        return conds
