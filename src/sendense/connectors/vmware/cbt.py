"""Changed block tracking: which areas of a disk to read.

``QueryChangedDiskAreas(snapshot, deviceKey, startOffset, changeId)`` answers
a `DiskChangeInfo` covering ``[startOffset, startOffset + length)`` of the
disk, with the changed areas inside it; vSphere may cover less than the whole
disk in one answer, so the caller asks again from ``startOffset + length``
until the disk's end::

    disk   |0 ......................................................... capacity|
    answer |startOffset ............ +length)
    areas      [start,+length)   [start,+length)
    next                                  |startOffset ....... +length)  ...

``changeId="*"`` asks for every allocated area (thin disks; a thick disk
answers the whole disk); a change id of an earlier snapshot asks for what
changed since. vSphere rejects a change id it no longer knows (CBT was reset,
the VM moved or a disk was resized) with a fault: the caller reads the disk in
full then, and says why.
"""

from __future__ import annotations

from typing import Any

from pyVmomi import vmodl

from sendense.connectors.vmware.session import Session, fault_message, wrap_fault
from sendense.core.errors import Error


class ChangeIdRejected(Error):
    code = "change_id_rejected"


def merge_areas(areas: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with touching or overlapping areas joined."""
    out: list[tuple[int, int]] = []
    for start, length in sorted(a for a in areas if a[1] > 0):
        if out and start <= out[-1][0] + out[-1][1]:
            prev_start, prev_len = out[-1]
            out[-1] = (prev_start, max(prev_len, start + length - prev_start))
        else:
            out.append((start, length))
    return out


def changed_areas(
    session: Session, vm: Any, snapshot: Any, key: int, capacity: int, change_id: str
) -> list[tuple[int, int]]:
    """Areas of disk ``key`` changed since ``change_id`` ("*": allocated), as
    of ``snapshot``, clipped to the disk; `ChangeIdRejected` when vSphere no
    longer knows ``change_id``."""
    areas: list[tuple[int, int]] = []
    offset = 0
    while offset < capacity:
        try:
            info = vm.QueryChangedDiskAreas(
                snapshot=snapshot, deviceKey=key, startOffset=offset, changeId=change_id
            )
        except (vmodl.fault.InvalidArgument, vmodl.fault.NotSupported) as e:
            if change_id == "*":
                raise wrap_fault(f"QueryChangedDiskAreas on disk {key}", e) from None
            raise ChangeIdRejected(
                f"vSphere does not know change id {change_id} of disk {key} any more "
                f"(CBT reset, VM moved or disk resized): {fault_message(e)}"
            ) from None
        except vmodl.MethodFault as e:
            if change_id != "*" and "changeId" in fault_message(e):
                raise ChangeIdRejected(
                    f"vSphere rejected change id {change_id} of disk {key}: {fault_message(e)}"
                ) from None
            raise wrap_fault(f"QueryChangedDiskAreas on disk {key}", e) from None
        except Exception as e:
            raise wrap_fault(f"QueryChangedDiskAreas on disk {key}", e) from None
        for a in info.changedArea or []:
            start, length = int(a.start), int(a.length)
            end = min(start + length, capacity)
            if end > start:
                areas.append((start, end - start))
        nxt = int(info.startOffset) + int(info.length)
        if nxt <= offset:
            raise Error(
                f"QueryChangedDiskAreas on disk {key} made no progress at offset {offset}",
                code="vsphere_cbt_error",
            )
        offset = nxt
    return merge_areas(areas)
