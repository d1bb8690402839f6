"""Queries of the vms table(s)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, func, select
from sqlalchemy.orm import Session, selectinload

from sendense.catalog.models import Vm, VmDisk


class VmStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def by_name(self, name: str) -> Vm | None:
        return self.s.scalar(select(Vm).where(Vm.name == name).options(selectinload(Vm.disks)))

    def get(self, vm_id: str) -> Vm | None:
        return self.s.scalar(select(Vm).where(Vm.id == vm_id).options(selectinload(Vm.disks)))

    def id_of(self, name: str) -> str | None:
        """The id of the VM of that name (one index probe, no ORM object)."""
        return self.s.scalar(select(Vm.id).where(Vm.name == name))

    def rows(
        self,
        name: str | None = None,
        *,
        limit: int | None = None,
        offset: int = 0,
        ids: Sequence[str] | None = None,
    ) -> Sequence[Row[Any]]:
        """VMs as Core rows, by name: all of them, those whose name contains
        ``name`` (any case), a page of those (``limit``, ``offset``), or the
        VMs of ``ids``."""
        q = select(Vm.__table__)
        if name:
            q = q.where(_name_contains(name))
        if ids is not None:
            q = q.where(Vm.id.in_(ids))
        q = q.order_by(Vm.name).offset(offset or None)
        return self.s.execute(q if limit is None else q.limit(limit)).all()

    def count(self, name: str | None = None) -> int:
        """How many VMs there are (whose name contains ``name``, any case)."""
        q = select(func.count()).select_from(Vm)
        return int(self.s.scalar(q.where(_name_contains(name)) if name else q) or 0)

    def keys(self, name: str | None = None) -> Sequence[Row[Any]]:
        """``(id, name, tags)`` of every VM (whose name contains ``name``),
        by name: what a scope is checked against, without the rest."""
        q = select(Vm.id, Vm.name, Vm.tags).order_by(Vm.name)
        return self.s.execute(q.where(_name_contains(name)) if name else q).all()

    def ids_by_name(self) -> list[str]:
        """Every VM's id, by name."""
        return list(self.s.scalars(select(Vm.id).order_by(Vm.name)))

    def disk_rows(self, vm_ids: Sequence[str] | None = None) -> Sequence[Row[Any]]:
        """The disks of every VM (or of ``vm_ids``) as Core rows, by VM and index."""
        q = select(VmDisk.__table__)
        if vm_ids is not None:
            q = q.where(VmDisk.vm_id.in_(vm_ids))
        return self.s.execute(q.order_by(VmDisk.vm_id, VmDisk.disk_index)).all()

    def all(self) -> Sequence[Vm]:
        return self.s.scalars(select(Vm).options(selectinload(Vm.disks)).order_by(Vm.name)).all()


def disk_of(vm: Vm, index: int) -> VmDisk | None:
    for d in vm.disks:
        if d.disk_index == index:
            return d
    return None


def _name_contains(name: str) -> Any:
    """The VM's name contains ``name``, whatever the case (``%`` and ``_``
    are taken literally)."""
    return func.lower(Vm.name).contains(name.lower(), autoescape=True)
