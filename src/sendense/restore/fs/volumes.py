"""Partitions of a disk and the filesystem in each, found in the worker.

Filesystems are recognised by their magic numbers first, on the whole disk:
a disk without a partition table whose content is one filesystem is
partition index 0. (This order matters: a FAT boot sector ends in 0x55AA like
an MBR, and dissect's MBR parser would read its code bytes as partitions.)
Otherwise dissect.volume reads the table (GPT before MBR, since a GPT disk
carries a protective MBR); partitions are numbered from 1 in the order the
table lists them, extended-partition containers and empty slots left out.

dissect counts a GPT partition one sector short; `find_volumes` corrects it.

LVM physical volumes are recognised and reported without a filesystem: the
``lvm`` tools cannot write a volume group onto a plain file here (they need
a loop device, hence root), so no LVM reading is claimed until it is tested.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dissect.volume.disk import Disk

from sendense.restore.fs.models import FsPartition
from sendense.restore.fs.source import BlockReader, OffsetView

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
    if head[512:520] == b"LABELONE":
        return "lvm2"
    return None


def _volume(
    reader: BlockReader, index: int, offset: int, size: int, table: str, ptype: str
) -> Volume:
    view = OffsetView(reader, offset, size)
    found = detect_filesystem(view)
    warnings = []
    filesystem: str | None = found
    if found == "lvm2" or ptype.lower() in (GPT_LVM, f"0x{MBR_LVM:02x}"):
        filesystem = None
        warnings.append("an LVM physical volume: logical volumes are not read yet")
    elif found == "exfat":
        filesystem = None
        warnings.append("an exFAT filesystem: not read yet")
    info = FsPartition(
        index=index,
        offset=offset,
        size=view.size,
        table=table,
        type=ptype,
        filesystem=filesystem,
        label=None,
        warnings=warnings,
    )
    return Volume(info, view)


def find_volumes(reader: BlockReader) -> list[Volume]:
    whole = OffsetView(reader, 0, reader.size)
    if detect_filesystem(whole) not in (None, "lvm2"):
        return [_volume(reader, 0, 0, reader.size, "none", "")]
    try:
        disk = Disk(reader)
    except Exception:
        if detect_filesystem(whole) == "lvm2":
            return [_volume(reader, 0, 0, reader.size, "none", "")]
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
        volumes.append(_volume(reader, len(volumes) + 1, int(part.offset), size, table, type_name))
    return volumes
