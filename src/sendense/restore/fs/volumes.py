"""Partitions of a disk and the filesystem in each, found in the worker.

Filesystems are recognised by their magic numbers first, on the whole disk:
a disk without a partition table whose content is one filesystem is
partition index 0. (This order matters: a FAT boot sector ends in 0x55AA like
an MBR, and dissect's MBR parser would read its code bytes as partitions.)
Otherwise dissect.volume reads the table (GPT before MBR, since a GPT disk
carries a protective MBR); partitions are numbered from 1 in the order the
table lists them, extended-partition containers and empty slots left out.

dissect counts a GPT partition one sector short; `find_volumes` corrects it.

LVM2: physical volumes (a partition, or a whole disk) are read with
dissect.volume's metadata parser; their visible logical volumes follow the
partitions as more entries (``table`` "lvm", ``type`` "VG/LV"). Only linear
volumes are read (every segment "striped" with one stripe: what ``lvcreate``
makes by default, also when a volume grew in pieces); the data path is
Sendense's own extent map (`MappedView`), not dissect's stream. Other
segment types (striped over several PVs, mirror, RAID, thin, cache) are
listed with a warning and no filesystem. The ``lvm`` tools refuse to write a
volume group onto a plain file (they need a loop device, hence root), so the
test volume groups are written byte by byte by tests/fixtures/disks.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from dissect.volume.disk import Disk

from sendense.restore.fs.models import FsPartition
from sendense.restore.fs.source import BlockReader, MappedView, OffsetView

GPT_LVM = "e6d6d379-f507-44c2-a23c-238f2a3df928"
MBR_EXTENDED = {0x05, 0x0F, 0x85}
MBR_LVM = 0x8E


@dataclass
class Volume:
    info: FsPartition
    view: OffsetView


def detect_filesystem(view: OffsetView) -> str | None:
    head = view.pread(0, 4096)
    if len(head) < 2048:
        return None
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[:4] == b"XFSB":
        return "xfs"
    if head[1080:1082] == b"\x53\xef":
        return "ext"
    if head[3:11] == b"EXFAT   ":
        return "exfat"
    if head[510:512] == b"\x55\xaa" and head[0] in (0xEB, 0xE9):
        bytes_per_sector, sectors_per_cluster, reserved, fats = struct.unpack_from(
            "<HBHB", head, 11
        )
        if (
            bytes_per_sector in (512, 1024, 2048, 4096)
            and sectors_per_cluster in (1, 2, 4, 8, 16, 32, 64, 128)
            and reserved > 0
            and fats > 0
        ):
            return "fat"
    if any(head[i * 512 : i * 512 + 8] == b"LABELONE" for i in range(4)):
        return "lvm2"  # the label is in one of the first four sectors (LVM2 label.h)
    return None


def _volume(reader: BlockReader, index: int, view: OffsetView, table: str, ptype: str) -> Volume:
    found = detect_filesystem(view)
    warnings = []
    filesystem: str | None = found
    if found == "lvm2":
        filesystem = None
    elif found == "exfat":
        filesystem = None
        warnings.append("an exFAT filesystem: not read yet")
    elif found is None and ptype.lower() in (GPT_LVM, f"0x{MBR_LVM:02x}"):
        warnings.append("an LVM partition without a physical volume label")
    info = FsPartition(
        index=index,
        offset=view.offset,
        size=view.size,
        table=table,
        type=ptype,
        filesystem=filesystem,
        label=None,
        warnings=warnings,
    )
    return Volume(info, view)


def find_volumes(reader: BlockReader) -> list[Volume]:
    volumes = _table_volumes(reader)
    pvs = [v for v in volumes if detect_filesystem(v.view) == "lvm2"]
    if pvs:
        volumes.extend(
            _logical_volumes(reader, pvs, first_index=max(v.info.index for v in volumes) + 1)
        )
    return volumes


def _table_volumes(reader: BlockReader) -> list[Volume]:
    whole = OffsetView(reader, 0, reader.size)
    if detect_filesystem(whole) is not None:
        return [_volume(reader, 0, whole, "none", "")]
    try:
        disk = Disk(reader)
    except Exception:
        return []
    table = type(disk.scheme).__name__.lower()
    volumes: list[Volume] = []
    for part in disk.partitions:
        ptype = part.type
        if isinstance(ptype, int):
            if ptype == 0 or ptype in MBR_EXTENDED:
                continue
            type_name = f"0x{ptype:02x}"
        else:
            type_name = str(ptype)
        size = int(part.size)
        raw = getattr(part, "raw", None)
        if table == "gpt" and raw is not None:
            # dissect.volume 3.18 counts a GPT partition one sector short:
            # LastLBA is inclusive (UEFI 2.10, 5.3.3), it uses last - first.
            size = (int(raw.last_lba) - int(raw.first_lba) + 1) * disk.sector_size
        view = OffsetView(reader, int(part.offset), size)
        volumes.append(_volume(reader, len(volumes) + 1, view, table, type_name))
    return volumes


def _logical_volumes(reader: BlockReader, pvs: list[Volume], first_index: int) -> list[Volume]:
    """The visible logical volumes of the volume groups on ``pvs``."""
    from dissect.volume.lvm import LVM2, LVM2Device

    groups: dict[str, list[tuple[Volume, Any]]] = {}
    for pv in pvs:
        try:
            device = LVM2Device(pv.view)
            vg_name = next(k for k, v in (device.metadata or {}).items() if isinstance(v, dict))
        except Exception as e:
            pv.info.warnings.append(
                f"an LVM physical volume whose metadata cannot be read: {e}"[:300]
            )
            continue
        groups.setdefault(vg_name, []).append((pv, device))
        pv.info.warnings.append(f"an LVM physical volume of volume group {vg_name}")
    out: list[Volume] = []
    for vg_name, members in groups.items():
        lvm = LVM2([device for _, device in members])
        by_id = {device.id: (pv, device) for pv, device in members}
        extent_size = int(lvm.vg.extent_size) * 512
        for lv in lvm.vg.lv:
            if not lv.is_visible:
                continue
            index = first_index + len(out)
            size = sum(int(seg.extent_count) for seg in lv.segments) * extent_size
            extents, problem = _linear_extents(lv, by_id, extent_size)
            view = MappedView(reader, extents or [], size)
            if problem is None:
                volume = _volume(reader, index, view, "lvm", f"{vg_name}/{lv.name}")
            else:
                info = FsPartition(
                    index, 0, size, "lvm", f"{vg_name}/{lv.name}", None, None, [problem]
                )
                volume = Volume(info, view)
            if extents:
                volume.info = _with_offset(volume.info, extents[0][2])
            out.append(volume)
    return out


def _linear_extents(
    lv: Any, by_id: dict[str, tuple[Volume, Any]], extent_size: int
) -> tuple[list[tuple[int, int, int]] | None, str | None]:
    """(volume offset, length, disk offset) of every segment of a linear LV,
    or why it cannot be read."""
    extents = []
    for seg in lv.segments:
        if seg.type != "striped" or int(getattr(seg, "stripe_count", 0)) != 1:
            return None, f"an LVM {seg.type} volume: only linear volumes are read yet"
        pv_name, pv_extent = seg.stripes[0]
        pv_meta = lv.vg.physical_volumes.get(pv_name)
        found = by_id.get(pv_meta.id.replace("-", "")) if pv_meta is not None else None
        if found is None:
            return (
                None,
                f"the LVM volume lies (partly) on a physical volume not on this disk ({pv_name})",
            )
        pv, device = found
        areas = device._data_area_descriptors
        if len(areas) != 1:
            return None, "an LVM physical volume with several data areas: not read yet"
        disk_offset = pv.view.offset + int(areas[0].offset) + int(pv_extent) * extent_size
        length = int(seg.extent_count) * extent_size
        if disk_offset + length > pv.view.offset + pv.view.size:
            return None, "an LVM segment ends past its physical volume"
        extents.append((int(seg.start_extent) * extent_size, length, disk_offset))
    return extents, None


def _with_offset(info: FsPartition, offset: int) -> FsPartition:
    return FsPartition(
        info.index,
        offset,
        info.size,
        info.table,
        info.type,
        info.filesystem,
        info.label,
        info.warnings,
    )
