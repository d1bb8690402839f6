"""Queries of the vms table(s)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, select
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

    def rows(self) -> Sequence[Row[Any]]:
        """Every VM as a Core row, by name."""
        return self.s.execute(select(Vm.__table__).order_by(Vm.name)).all()

    def disk_rows(self) -> Sequence[Row[Any]]:
        """Every VM's disks as Core rows, by VM and index."""
        return self.s.execute(
            select(VmDisk.__table__).order_by(VmDisk.vm_id, VmDisk.disk_index)
        ).all()

    def all(self) -> Sequence[Vm]:
        return self.s.scalars(select(Vm).options(selectinload(Vm.disks)).order_by(Vm.name)).all()


def disk_of(vm: Vm, index: int) -> VmDisk | None:
    for d in vm.disks:
        if d.disk_index == index:
            return d
    return None
