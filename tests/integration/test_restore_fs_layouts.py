"""Layouts real guests have and the basic test disks do not: MBR logical
partitions inside an extended partition, ext4 directories indexed as hash
trees (what the kernel makes of a big directory; ``mkfs -d`` writes them
linear, ``e2fsck -D`` indexes them), an ext4 file in many pieces (an extent
tree with index blocks) and an XFS directory in B-tree form. (``mkfs.xfs
-p`` writes every file whole, holes filled, in one extent: no XFS file in
many pieces can be made here without mounting.)"""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

import pytest

from fixtures import disks
from fixtures.disks import MiB
from sendense.restore.fs import FsWorker

pytestmark = pytest.mark.skipif(
    bool(disks.tools_missing()), reason=f"missing tools: {disks.tools_missing()}"
)

S = 2048  # sectors per MiB


def test_mbr_logical_partitions_are_numbered_after_the_primary_ones(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_bytes(b"hello\n")
    disks.build_ext4(tmp_path / "a.img", tree, size=16 * MiB, label="primary")
    disks.build_ext4(tmp_path / "b.img", tree, size=16 * MiB, label="logical1")
    disks.build_fat(tmp_path / "c.img", tree, size=16 * MiB, label="LOGICAL2", fat_bits=16)
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(64 * MiB)
    table = (
        "label: dos\nunit: sectors\n\n"
        f"start={S}, size={16 * S}, type=83\n"
        f"start={18 * S}, size={40 * S}, type=5\n"  # extended: the two below are logical
        f"start={19 * S}, size={16 * S}, type=83\n"
        f"start={37 * S}, size={16 * S}, type=e\n"
    )
    proc = subprocess.run(["sfdisk", "-q", str(disk)], input=table, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for image, sector in (("a.img", S), ("b.img", 19 * S), ("c.img", 37 * S)):
        dd = ["dd", f"if={tmp_path / image}", f"of={disk}", "bs=512", f"seek={sector}"]
        subprocess.run([*dd, "conv=notrunc,sparse", "status=none"], check=True)
    with FsWorker(disk) as w:
        parts = w.partitions()
        # the extended partition itself is a container, not listed; the
        # logical ones follow the primary ones (Linux would call them 5 and 6)
        assert [(p.index, p.offset, p.filesystem, p.label) for p in parts] == [
            (1, 1 * MiB, "ext", "primary"),
            (2, 19 * MiB, "ext", "logical1"),
            (3, 37 * MiB, "fat", "LOGICAL2"),
        ]
        for p in parts:
            assert w.read(p.index, "/hello.txt", 0, 100) == b"hello\n"


def fragmented(path: Path, pieces: int, seed: int) -> str:
    """A sparse file of ``pieces`` 8 KiB islands 256 KiB apart (one extent
    each); its sha256."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(pieces * 256 * 1024)
        for i in range(pieces):
            f.seek(i * 256 * 1024)
            f.write(rng.randbytes(8192))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_hash_tree_directories_and_files_in_many_pieces(tmp_path: Path, fs: str) -> None:
    tree = tmp_path / "tree"
    (tree / "big").mkdir(parents=True)
    names = {f"entry-{i:05d}-{'x' * (i % 40)}.txt" for i in range(3000)}
    for name in names:
        (tree / "big" / name).write_bytes(name.encode())
    want = fragmented(tree / "frag.bin", 200, 1)
    image = tmp_path / f"{fs}.img"
    if fs == "ext4":
        disks.build_ext4(image, tree, size=64 * MiB)
        subprocess.run(["e2fsck", "-fyD", str(image)], capture_output=True)  # index directories
        htree = subprocess.run(
            ["debugfs", "-R", "htree /big", str(image)], capture_output=True, text=True
        ).stdout
        assert "Root node dump" in htree  # /big is a hash tree now
        extents = subprocess.run(
            ["debugfs", "-R", "stat /frag.bin", str(image)], capture_output=True, text=True
        ).stdout
        assert "(ETB" in extents  # the extent tree has index blocks
    else:
        disks.build_xfs(image, tree)
        fmt = subprocess.run(
            ["xfs_db", "-r", "-c", "path /big", "-c", "p core.format", str(image)],
            capture_output=True,
            text=True,
        ).stdout
        assert "btree" in fmt, fmt  # a node directory, B-tree data fork
    with FsWorker(image) as w:
        assert {e.name for e in w.walk(0, "/big")} == names
        sample = sorted(names)[::250]
        for name in sample:
            assert w.read(0, f"/big/{name}", 0, 100) == name.encode()
        got = hashlib.sha256(b"".join(w.iter_file(0, "/frag.bin"))).hexdigest()
        assert got == want
        assert w.stat(0, "/frag.bin").size == 200 * 256 * 1024
