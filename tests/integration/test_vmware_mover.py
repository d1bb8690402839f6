"""The data mover with changed areas given as a list (what the vmware
connector gets from CBT's QueryChangedDiskAreas), between real qemu-nbd
exports: only those areas move, the rest of the target is its backing file."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import nbd

from sendense.mover.copy import DirtyExtents, Mover
from sendense.mover.digest import BlockHashList
from sendense.mover.verify import digest_of_image
from sendense.qemu import img
from sendense.qemu.nbd_server import QemuNbdServer

SIZE = (16 << 20) + 4096  # not a multiple of the 64 KiB block
BLOCK = 64 << 10


def test_dirty_extents_within_clips_to_the_window() -> None:
    d = DirtyExtents([(0, 10), (100, 50), (1000, 5)])
    assert [(e.offset, e.length) for e in d.within(5, 120)] == [(5, 5), (100, 20)]
    assert [(e.offset, e.length) for e in d.within(150, 1000)] == []
    assert [(e.offset, e.length) for e in d.within(0, 2000)] == [(0, 10), (100, 50), (1000, 5)]


def test_incremental_copies_only_the_listed_areas(tmp_path: Path) -> None:
    rng = random.Random(8)
    before = tmp_path / "before.raw"
    before.write_bytes(b"")
    with open(before, "r+b") as f:
        f.truncate(SIZE)
        for _ in range(20):
            f.seek(rng.randrange(0, SIZE - BLOCK))
            f.write(rng.randbytes(BLOCK))
    after = tmp_path / "after.raw"
    shutil.copyfile(before, after)
    changed = [(3 * BLOCK + 100, 10), (40 * BLOCK, 3 * BLOCK), (SIZE - 4096, 4096)]
    with open(after, "r+b") as f:
        for offset, length in changed:
            f.seek(offset)
            f.write(rng.randbytes(length))
        f.seek(100 * BLOCK)  # a change to zeroes must reach the target too
        f.write(bytes(BLOCK))
    changed.append((100 * BLOCK, BLOCK))
    changed.sort()

    parent = tmp_path / "parent.qcow2"
    img.convert(str(before), str(parent), src_fmt="raw")
    child = tmp_path / "child.qcow2"
    img.create(str(child), SIZE, backing=str(parent), backing_fmt="qcow2")
    prev_hashes = tmp_path / "prev.x3"
    with QemuNbdServer(str(before), fmt="raw", socket_path=str(tmp_path / "p.sock")) as s:
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(s.url)
        Mover(h, None, SIZE, hashes=BlockHashList(prev_hashes, SIZE)).run()
    with (
        QemuNbdServer(
            str(after), fmt="raw", socket_path=str(tmp_path / "s.sock"), read_only=True
        ) as s,
        QemuNbdServer(str(child), socket_path=str(tmp_path / "d.sock")) as d,
    ):
        src = nbd.NBD()
        src.add_meta_context("base:allocation")
        src.connect_uri(s.url)
        dst = nbd.NBD()
        dst.connect_uri(d.url)
        result = Mover(
            src,
            dst,
            SIZE,
            dirty_extents=changed,
            target_is_zero=False,
            hashes=BlockHashList(tmp_path / "new.x3", SIZE, base=prev_hashes),
        ).run()
    assert img.compare(str(child), str(after))
    assert result.digest == digest_of_image(str(after), fmt="raw")
    # Whole 64 KiB blocks around each changed area, nothing else.
    assert result.data_bytes + result.zero_bytes == BLOCK + 3 * BLOCK + 4096 + BLOCK
