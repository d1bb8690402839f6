"""Queries of the vms table(s)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from sendense.catalog.models import Vm, VmDisk


class VmStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def by_name(self, name: str) -> Vm | None:
        return self.s.scalar(select(Vm).where(Vm.name == name).options(selectinload(Vm.disks)))

    def get(self, vm_id: str) -> Vm | None:
        return self.s.scalar(select(Vm).where(Vm.id == vm_id).options(selectinload(Vm.disks)))

    def all(self) -> Sequence[Vm]:
        return self.s.scalars(select(Vm).options(selectinload(Vm.disks)).order_by(Vm.name)).all()


def disk_of(vm: Vm, index: int) -> VmDisk | None:
    for d in vm.disks:
        if d.disk_index == index:
            return d
    return None
