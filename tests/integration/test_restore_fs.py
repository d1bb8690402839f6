"""Filesystems inside disks, read by the worker processes of restore/fs.

Disks are built without mounting (tests/fixtures/disks.py) from a source
tree; every check compares what the worker reads with the source tree's
manifest (sha256, type, size, link target), never with the parser itself.
First on raw image files, then through ``qemu-nbd -r`` serving a QCOW2 chain
on a unix socket, the way restore sessions read.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures import disks
from fixtures.disks import BIG_FILE, MANY_COUNT, MANY_DIR, Manifest, MiB
from sendense.core.errors import (
    FilesystemCorrupt,
    FsPathNotFound,
    NoFilesystem,
    NotADirectory,
    NotAFile,
    ParserLimit,
    PartitionNotFound,
    PathRefused,
    Unavailable,
)
from sendense.qemu import img
from sendense.qemu.nbd_server import QemuNbdServer
from sendense.restore.fs import FsPool, FsWorker, WorkerLimits, source_for_nbd_socket

pytestmark = pytest.mark.skipif(
    bool(disks.tools_missing()), reason=f"missing tools: {disks.tools_missing()}"
)


@dataclass(frozen=True)
class Case:
    image: Path
    partition: int
    filesystem: str
    manifest: Manifest
    tree: Path


@dataclass(frozen=True)
class Built:
    root: Path
    cases: dict[str, Case]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("disks")
    full = disks.make_tree(root / "tree")
    fat_tree = disks.make_tree(root / "tree_fat", symlinks=False)
    ntfs_tree = disks.make_tree(root / "tree_ntfs", symlinks=False, many=False, nested=False)
    disks.build_ext4(root / "ext4.img", root / "tree")
    disks.build_xfs(root / "xfs.img", root / "tree")
    disks.build_fat(root / "fat.img", root / "tree_fat")
    disks.build_ntfs(root / "ntfs.img", root / "tree_ntfs")
    # ext2 and ext3 (block maps, no extents), ext4 with 4 KiB blocks (the
    # others have 1 KiB at this size) and with inline data, XFS v4 (no CRCs).
    disks.build_ext4(root / "ext2.img", root / "tree", mkfs="mkfs.ext2", label="ext2")
    disks.build_ext4(root / "ext3.img", root / "tree", mkfs="mkfs.ext3", label="ext3")
    disks.build_ext4(root / "ext4-4k.img", root / "tree", options=("-b", "4096"), label="ext4-4k")
    disks.build_ext4(
        root / "ext4-inline.img",
        root / "tree",
        options=("-O", "inline_data", "-I", "256"),
        label="inline",
    )
    disks.build_xfs(root / "xfs-v4.img", root / "tree", options=("-m", "crc=0"), label="xfs-v4")
    small_tree = disks.make_tree(root / "tree_small", symlinks=False, many=False)
    disks.build_fat(root / "fat16.img", root / "tree_fat", fat_bits=16, size=128 * MiB)
    disks.build_fat(root / "fat12.img", root / "tree_small", fat_bits=12, size=64 * MiB)
    disks.build_partitioned(
        root / "gpt.img",
        "gpt",
        [
            disks.PartitionSpec(root / "ext4.img", "linux"),
            disks.PartitionSpec(root / "fat.img", "uefi"),
        ],
    )
    disks.build_partitioned(
        root / "mbr.img",
        "dos",
        [disks.PartitionSpec(root / "ntfs.img", "7"), disks.PartitionSpec(root / "xfs.img", "83")],
    )
    # LVM: a GPT disk with a FAT partition and a physical volume holding the
    # ext4 image as a logical volume in two segments stored in reverse order,
    # and the XFS image as a second one.
    disks.build_lvm_pv(
        root / "pv.img",
        "vgtest",
        [
            disks.LogicalVolumeSpec("root", root / "ext4.img", [(0, 12, 12), (12, 0, 12)]),
            disks.LogicalVolumeSpec("data", root / "xfs.img", [(0, 24, 80)]),
        ],
    )
    disks.build_partitioned(
        root / "lvm.img",
        "gpt",
        [
            disks.PartitionSpec(root / "fat.img", "uefi"),
            disks.PartitionSpec(root / "pv.img", "lvm"),
        ],
    )
    cases = {
        "ext4": Case(root / "ext4.img", 0, "ext", full, root / "tree"),
        "xfs": Case(root / "xfs.img", 0, "xfs", full, root / "tree"),
        "fat": Case(root / "fat.img", 0, "fat", fat_tree, root / "tree_fat"),
        "ntfs": Case(root / "ntfs.img", 0, "ntfs", ntfs_tree, root / "tree_ntfs"),
        "ext2": Case(root / "ext2.img", 0, "ext", full, root / "tree"),
        "ext3": Case(root / "ext3.img", 0, "ext", full, root / "tree"),
        "ext4-4k": Case(root / "ext4-4k.img", 0, "ext", full, root / "tree"),
        "ext4-inline": Case(root / "ext4-inline.img", 0, "ext", full, root / "tree"),
        "xfs-v4": Case(root / "xfs-v4.img", 0, "xfs", full, root / "tree"),
        "fat16": Case(root / "fat16.img", 0, "fat", fat_tree, root / "tree_fat"),
        "fat12": Case(root / "fat12.img", 0, "fat", small_tree, root / "tree_small"),
        "gpt-ext4": Case(root / "gpt.img", 1, "ext", full, root / "tree"),
        "gpt-fat": Case(root / "gpt.img", 2, "fat", fat_tree, root / "tree_fat"),
        "mbr-ntfs": Case(root / "mbr.img", 1, "ntfs", ntfs_tree, root / "tree_ntfs"),
        "mbr-xfs": Case(root / "mbr.img", 2, "xfs", full, root / "tree"),
        "lvm-ext4": Case(root / "lvm.img", 3, "ext", full, root / "tree"),
        "lvm-xfs": Case(root / "lvm.img", 4, "xfs", full, root / "tree"),
    }
    return Built(root, cases)


ALL = [
    "ext4",
    "xfs",
    "fat",
    "fat16",
    "fat12",
    "ntfs",
    "gpt-ext4",
    "gpt-fat",
    "mbr-ntfs",
    "mbr-xfs",
    "lvm-ext4",
    "lvm-xfs",
    "ext2",
    "ext3",
    "ext4-4k",
    "ext4-inline",
    "xfs-v4",
]
WITH_SYMLINKS = [
    "ext4",
    "xfs",
    "gpt-ext4",
    "mbr-xfs",
    "lvm-ext4",
    "lvm-xfs",
    "ext2",
    "ext4-inline",
    "xfs-v4",
]
WITH_MANY = ["ext4", "xfs", "fat", "fat16", "gpt-fat", "mbr-xfs", "ext4-inline"]


@pytest.fixture
def worker_for(built: Built) -> Iterator[object]:
    started: list[FsWorker] = []

    def make(source: str | Path, limits: WorkerLimits | None = None) -> FsWorker:
        worker = FsWorker(source, limits=limits)
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.close()


def sha256_of(worker: FsWorker | FsPool, partition: int, path: str) -> str:
    digest = hashlib.sha256()
    for piece in worker.iter_file(partition, path):
        digest.update(piece)
    return digest.hexdigest()


def check_against_manifest(worker: FsWorker | FsPool, case: Case) -> None:
    """The whole tree: same paths, types, sizes, link targets; file contents
    by sha256 (the 3,000 small files of many/ by a sample of them)."""
    seen = {e.path: e for e in worker.walk(case.partition, "/")}
    expected = case.manifest.items
    if case.filesystem == "ext":
        seen.pop("/lost+found")
    assert set(seen) == set(expected)
    for path, item in expected.items():
        entry = seen[path]
        assert entry.type == item.type, path
        assert entry.name == path.rsplit("/", 1)[1]
        if item.type == "symlink":
            assert entry.target == item.target, path
        if item.type == "file":
            assert entry.size == item.size, path
    sample = (
        random.Random(1).sample(sorted(case.manifest.children(f"/{MANY_DIR}")), 20)
        if MANY_DIR in {p.strip("/") for p in expected}
        else []
    )
    for path, item in case.manifest.files().items():
        if path.startswith(f"/{MANY_DIR}/") and path.rsplit("/", 1)[1] not in sample:
            continue
        assert sha256_of(worker, case.partition, path) == item.sha256, path


# ---------------------------------------------------------------------------
# Raw image files
# ---------------------------------------------------------------------------


def test_partitions_of_tables_and_whole_disks(built: Built, worker_for) -> None:  # type: ignore[no-untyped-def]
    gpt = worker_for(built.root / "gpt.img").partitions()
    assert [(p.index, p.table, p.filesystem, p.label) for p in gpt] == [
        (1, "gpt", "ext", "sendense-ext4"),
        (2, "gpt", "fat", "SENDENSE"),
    ]
    assert gpt[0].offset == 1 * MiB and gpt[0].size == (built.root / "ext4.img").stat().st_size
    mbr = worker_for(built.root / "mbr.img").partitions()
    assert [(p.index, p.table, p.type, p.filesystem, p.label) for p in mbr] == [
        (1, "mbr", "0x07", "ntfs", "sendense-ntfs"),
        (2, "mbr", "0x83", "xfs", "sendense-xfs"),
    ]
    lvm = worker_for(built.root / "lvm.img").partitions()
    assert [(p.index, p.table, p.type, p.filesystem, p.label) for p in lvm] == [
        (1, "gpt", "c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "fat", "SENDENSE"),
        (2, "gpt", "e6d6d379-f507-44c2-a23c-238f2a3df928", None, None),
        (3, "lvm", "vgtest/root", "ext", "sendense-ext4"),
        (4, "lvm", "vgtest/data", "xfs", "sendense-xfs"),
    ]
    assert lvm[1].warnings == ["an LVM physical volume of volume group vgtest"]
    assert lvm[2].size == (built.root / "ext4.img").stat().st_size
    assert lvm[3].size == (built.root / "xfs.img").stat().st_size
    (pv, *lvs) = worker_for(built.root / "pv.img").partitions()  # a whole disk as the PV
    assert (pv.index, pv.filesystem) == (0, None)
    assert [(p.index, p.type, p.filesystem) for p in lvs] == [
        (1, "vgtest/root", "ext"),
        (2, "vgtest/data", "xfs"),
    ]
    for name, fs, label in [
        ("ext4", "ext", "sendense-ext4"),
        ("xfs", "xfs", "sendense-xfs"),
        ("fat", "fat", "SENDENSE"),
    ]:
        (whole,) = worker_for(built.root / f"{name}.img").partitions()
        assert (whole.index, whole.table, whole.filesystem, whole.label, whole.warnings) == (
            0,
            "none",
            fs,
            label,
            [],
        )
        assert whole.size == (built.root / f"{name}.img").stat().st_size


@pytest.mark.parametrize("name", ALL)
def test_tree_matches_source(built: Built, worker_for, name: str) -> None:  # type: ignore[no-untyped-def]
    case = built.cases[name]
    worker = worker_for(case.image)
    check_against_manifest(worker, case)
    assert worker.restarts == 0


@pytest.mark.parametrize("name", ["ext4", "xfs", "fat", "ntfs"])
def test_stat_and_unicode_names(built: Built, worker_for, name: str) -> None:  # type: ignore[no-untyped-def]
    case = built.cases[name]
    worker = worker_for(case.image)
    entry = worker.stat(case.partition, f"/{disks.UNICODE_FILE}")
    assert (entry.name, entry.type, entry.size) == (
        disks.UNICODE_FILE,
        "file",
        case.manifest.items[entry.path].size,
    )
    source = (case.tree / disks.UNICODE_FILE).stat()
    assert entry.mtime is not None
    if case.filesystem == "ext":  # mkfs.ext4 -d keeps the source's mtime
        assert abs(entry.mtime.timestamp() - source.st_mtime) < 2
    if case.filesystem == "ntfs":  # ntfscp writes the time of the copy
        assert source.st_mtime - 2 < entry.mtime.timestamp() < time.time() + 2
    if case.filesystem in ("ext", "xfs"):
        assert (entry.mode, entry.uid, entry.gid) == (0o644, 0, 0)
    else:
        assert (entry.mode, entry.uid, entry.gid) == (None, None, None)
    root = worker.stat(case.partition, "/")
    assert (root.type, root.path) == ("dir", "/")
    empty = worker.stat(case.partition, "//empty.txt/")
    assert (empty.path, empty.size) == ("/empty.txt", 0)
    assert worker.read(case.partition, "/empty.txt", 0, 100) == b""


@pytest.mark.parametrize("name", WITH_MANY)
def test_directory_of_3000_entries_in_pages(built: Built, worker_for, name: str) -> None:  # type: ignore[no-untyped-def]
    case = built.cases[name]
    worker = worker_for(case.image)
    names: list[str] = []
    latencies = []
    for offset in range(0, MANY_COUNT, 1000):
        started = time.monotonic()
        page = worker.list_dir(case.partition, f"/{MANY_DIR}", offset=offset, limit=1000)
        latencies.append(time.monotonic() - started)
        assert page.total == MANY_COUNT
        names.extend(e.name for e in page.entries)
    assert names == sorted(case.manifest.children(f"/{MANY_DIR}"))
    assert worker.list_dir(case.partition, f"/{MANY_DIR}", offset=MANY_COUNT).entries == []
    # A lookup inside the big directory is a dict probe once the directory is read.
    started = time.monotonic()
    for i in range(0, MANY_COUNT, 100):
        assert (
            worker.read(case.partition, f"/{MANY_DIR}/f{i:04d}.txt", 0, 100)
            == f"file {i}\n".encode()
        )
    per_lookup = (time.monotonic() - started) / (MANY_COUNT / 100)
    assert per_lookup < 0.05, f"{per_lookup * 1000:.1f} ms per file in a 3,000-entry directory"
    assert max(latencies) < 2.0


@pytest.mark.parametrize("name", ALL)
def test_ranges(built: Built, worker_for, name: str) -> None:  # type: ignore[no-untyped-def]
    case = built.cases[name]
    worker = worker_for(case.image)
    big = (case.tree / BIG_FILE).read_bytes()
    rng = random.Random(7)
    for _ in range(8):
        offset = rng.randrange(len(big))
        length = rng.randrange(1, 3 * MiB)
        assert (
            worker.read(case.partition, f"/{BIG_FILE}", offset, length)
            == big[offset : offset + length]
        )
    assert (
        b"".join(
            worker.iter_file(case.partition, f"/{BIG_FILE}", offset=5 * MiB + 3, length=9 * MiB)
        )
        == big[5 * MiB + 3 : 14 * MiB + 3]
    )
    assert worker.read(case.partition, f"/{BIG_FILE}", len(big) - 10, 100) == big[-10:]
    assert worker.read(case.partition, f"/{BIG_FILE}", len(big) + 10, 100) == b""
    sparse = (case.tree / "sparse.img").read_bytes()
    assert (
        worker.read(case.partition, "/sparse.img", 0, 2 * MiB) == sparse[: 2 * MiB]
    )  # a hole, then data
    assert worker.read(case.partition, "/sparse.img", 8 * MiB - 5000, 5000) == sparse[-5000:]


@pytest.mark.parametrize("name", WITH_SYMLINKS)
def test_symlinks_stay_inside(built: Built, worker_for, name: str) -> None:  # type: ignore[no-untyped-def]
    case = built.cases[name]
    worker = worker_for(case.image)
    p = case.partition
    link = worker.stat(p, "/links/inside")
    assert (link.type, link.target) == ("symlink", "../hello.txt")
    assert worker.stat(p, "/links/inside", follow=True).path == "/hello.txt"
    assert worker.read(p, "/links/inside", 0, 100) == b"hello, world\n"
    mid = case.manifest.items["/nested/a/mid.txt"]
    assert (
        sha256_of(worker, p, "/links/absolute_inside") == mid.sha256
    )  # absolute = from this filesystem's root
    through = worker.list_dir(p, "/links/dir/a")  # a link to a directory, in the middle of a path
    assert through.path == "/nested/a"
    assert {e.name for e in through.entries} == {"b", "mid.txt"}
    assert (
        worker.stat(p, "/links/outside").target == "../../../../../etc/passwd"
    )  # listing a link is fine
    for path in ("/links/outside", "/links/outside_absolute"):
        with pytest.raises(PathRefused) as refused:
            worker.read(p, path, 0, 10)
        assert refused.value.details["reason"] == "link_escapes"
    with pytest.raises(PathRefused) as loop:
        worker.stat(p, "/links/loop_a", follow=True)
    assert loop.value.details["reason"] == "link_loop"
    assert worker.restarts == 0


@pytest.mark.parametrize("name", ["ext4", "fat", "ntfs", "mbr-xfs"])
def test_traversal_refused(built: Built, worker_for, name: str) -> None:  # type: ignore[no-untyped-def]
    case = built.cases[name]
    worker = worker_for(case.image)
    for path, reason in [
        ("/../etc/passwd", "dotdot"),
        ("../../etc/passwd", "dotdot"),
        ("/nested/../hello.txt", "dotdot"),
        ("/hello.txt/..", "dotdot"),
        ("/hello\x00.txt", "nul"),
        ("/" + "a" * 5000, "too_long"),
    ]:
        for call in (
            lambda p: worker.read(case.partition, p, 0, 10),
            lambda p: worker.list_dir(case.partition, p),
            lambda p: worker.stat(case.partition, p),
        ):
            with pytest.raises(PathRefused) as refused:
                call(path)
            assert refused.value.code == "path_refused"
            assert refused.value.details["reason"] == reason
    assert (
        worker.read(case.partition, "hello.txt", 0, 5) == b"hello"
    )  # relative means from the root
    assert worker.restarts == 0


def test_request_errors_keep_the_worker(built: Built, worker_for) -> None:  # type: ignore[no-untyped-def]
    worker = worker_for(built.root / "gpt.img")
    with pytest.raises(FsPathNotFound):
        worker.stat(1, "/no/such/file")
    with pytest.raises(NotADirectory):
        worker.list_dir(1, "/hello.txt")
    with pytest.raises(NotADirectory):
        worker.stat(1, "/hello.txt/x")
    with pytest.raises(NotAFile) as not_file:
        worker.read(1, "/nested", 0, 10)
    assert not_file.value.details["type"] == "dir"
    with pytest.raises(PartitionNotFound):
        worker.list_dir(3, "/")
    with pytest.raises(PartitionNotFound):
        worker.list_dir(0, "/")  # a partitioned disk has no whole-disk filesystem
    assert worker.restarts == 0
    pid = worker.pid
    assert worker.read(2, "/hello.txt", 0, 100) == b"hello, world\n"
    assert worker.pid == pid


def test_no_filesystem_on_a_partition(tmp_path: Path, built: Built, worker_for) -> None:  # type: ignore[no-untyped-def]
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\0" * 4 * MiB)
    disk = tmp_path / "disk.img"
    disks.build_partitioned(disk, "gpt", [disks.PartitionSpec(blank, "linux")])
    worker = worker_for(disk)
    (part,) = worker.partitions()
    assert (part.index, part.filesystem) == (1, None)
    with pytest.raises(NoFilesystem):
        worker.list_dir(1, "/")
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 4 * MiB)
    assert worker_for(raw).partitions() == []


# ---------------------------------------------------------------------------
# Upstream defects, each handled in one place
# ---------------------------------------------------------------------------


def test_fat_short_names_keep_their_lowercase(built: Built, worker_for) -> None:  # type: ignore[no-untyped-def]
    # mtools stores "hello.txt" as a bare 8.3 entry with the NT lowercase flags
    # (no long name): dissect alone lists it as "HELLO.TXT".
    worker = worker_for(built.root / "fat.img")
    names = {e.name for e in worker.list_dir(0, "/").entries}
    assert {"hello.txt", "big.bin", "empty.txt", "many", "nested", disks.UNICODE_FILE} <= names
    assert "HELLO.TXT" not in names
    assert worker.read(0, "/hello.txt", 0, 100) == b"hello, world\n"


def test_fat_reads_merged_runs(built: Built, worker_for) -> None:  # type: ignore[no-untyped-def]
    # 512-byte clusters: one request per cluster would be 49,152 reads for this file.
    worker = worker_for(built.root / "fat.img")
    started = time.monotonic()
    assert (
        sha256_of(worker, 0, f"/{BIG_FILE}")
        == built.cases["fat"].manifest.items[f"/{BIG_FILE}"].sha256
    )
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"{disks.BIG_SIZE / MiB / elapsed:.0f} MiB/s"


def test_ntfs_system_files_hidden_unless_asked(built: Built, worker_for) -> None:  # type: ignore[no-untyped-def]
    worker = worker_for(built.root / "ntfs.img")
    default = {e.name for e in worker.list_dir(0, "/").entries}
    assert default == {p.lstrip("/") for p in built.cases["ntfs"].manifest.items}
    shown = worker.list_dir(0, "/", show_system=True)
    assert {"$MFT", "$Bitmap", "$Extend", "$LogFile"} <= {e.name for e in shown.entries}
    assert shown.total == len(shown.entries) > len(default)
    assert worker.stat(0, "/$MFT").type == "file"  # reachable by name: hidden, not forbidden


def test_dirty_journal_and_dirty_bit_are_warnings(tmp_path: Path, built: Built, worker_for) -> None:  # type: ignore[no-untyped-def]
    ext4 = tmp_path / "dirty-ext4.img"
    disks.copy_sparse(built.root / "ext4.img", ext4)
    disks.ext4_needs_recovery(ext4)
    (part,) = worker_for(ext4).partitions()
    assert len(part.warnings) == 1 and "journal" in part.warnings[0]
    fat = tmp_path / "dirty-fat.img"
    disks.copy_sparse(built.root / "fat.img", fat)
    disks.set_fat32_entry(fat, 1, 0x07FFFFFF)  # clean-shutdown bit cleared
    (part,) = worker_for(fat).partitions()
    assert len(part.warnings) == 1 and "not cleanly unmounted" in part.warnings[0]
    ntfs = tmp_path / "dirty-ntfs.img"
    disks.copy_sparse(built.root / "ntfs.img", ntfs)
    disks.ntfs_mark_dirty(ntfs)
    (part,) = worker_for(ntfs).partitions()
    assert len(part.warnings) == 1 and "marked dirty" in part.warnings[0]
    assert worker_for(ntfs).read(0, "/hello.txt", 0, 100) == b"hello, world\n"
    # Reading still works: the warning tells the user what they get.
    assert worker_for(ext4).read(0, "/hello.txt", 0, 100) == b"hello, world\n"


# ---------------------------------------------------------------------------
# Hostile and corrupt filesystems
# ---------------------------------------------------------------------------


def test_corrupt_filesystem_fails_the_request_and_the_next_works(
    tmp_path: Path, built: Built, worker_for
) -> None:  # type: ignore[no-untyped-def]
    bad_ext4 = tmp_path / "bad-ext4.img"
    disks.copy_sparse(built.root / "ext4.img", bad_ext4)
    disks.overwrite(bad_ext4, 2048, 4096)  # the group descriptors (1 KiB blocks: block 2 on)
    disk = tmp_path / "disk.img"
    disks.build_partitioned(
        disk,
        "gpt",
        [
            disks.PartitionSpec(bad_ext4, "linux"),
            disks.PartitionSpec(built.root / "fat.img", "uefi"),
        ],
    )
    worker = worker_for(disk)
    parts = worker.partitions()
    assert [p.filesystem for p in parts] == ["ext", "fat"]
    for _ in range(2):
        with pytest.raises(FilesystemCorrupt) as corrupt:
            worker.list_dir(1, "/")
        assert corrupt.value.code == "filesystem_corrupt"
        assert "Group descriptor" in corrupt.value.message
    assert worker.restarts == 2
    assert worker.read(2, "/hello.txt", 0, 100) == b"hello, world\n"


def test_parser_allocating_without_bound_is_killed(
    tmp_path: Path, built: Built, worker_for
) -> None:  # type: ignore[no-untyped-def]
    # A FAT directory whose cluster chain loops: dissect collects its run list
    # without a cycle check and grows until the memory limit stops it.
    hostile = tmp_path / "loop-fat.img"
    disks.copy_sparse(built.root / "fat.img", hostile)
    disks.fat_loop_directory(hostile, "/nested", "/hello.txt")
    worker = worker_for(hostile, WorkerLimits(memory=512 * MiB, request_timeout=120))
    assert {e.name for e in worker.list_dir(0, "/").entries} >= {"nested", "many"}
    with pytest.raises(ParserLimit) as limit:
        worker.list_dir(0, "/nested")
    assert limit.value.details == {"limit": "memory"}
    assert worker.restarts == 1
    assert worker.read(0, "/big.bin", 0, 4) == (built.cases["fat"].tree / BIG_FILE).read_bytes()[:4]


def test_parser_past_its_deadline_is_killed(tmp_path: Path, built: Built, worker_for) -> None:  # type: ignore[no-untyped-def]
    hostile = tmp_path / "loop-fat.img"
    disks.copy_sparse(built.root / "fat.img", hostile)
    disks.fat_loop_directory(hostile, "/nested", "/hello.txt")
    worker = worker_for(hostile, WorkerLimits(memory=8 * 1024 * MiB, request_timeout=1.0))
    worker.start()
    pid = worker.pid
    started = time.monotonic()
    with pytest.raises(ParserLimit) as limit:
        worker.list_dir(0, "/nested")
    assert limit.value.details == {"limit": "time"}
    assert time.monotonic() - started < 5
    assert not Path(f"/proc/{pid}").exists()
    assert worker.list_dir(0, "/many", limit=1).total == MANY_COUNT


# ---------------------------------------------------------------------------
# Through qemu-nbd -r on a unix socket, serving a QCOW2 chain
# ---------------------------------------------------------------------------


@pytest.fixture
def nbd_chain(tmp_path: Path, built: Built) -> Iterator[dict[str, str]]:
    """gpt.img and mbr.img as two-deep QCOW2 chains (relative backing paths;
    the base with extended L2 entries and 128 KiB clusters, the feature
    dissect.hypervisor's QCOW2 reader hangs on), each served read-only by
    qemu-nbd on a unix socket."""
    sources = {}
    servers = []
    try:
        for name in ("gpt", "mbr"):
            base = tmp_path / f"{name}-base.qcow2"
            img.run(
                [
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-o",
                    "extended_l2=on,cluster_size=131072",
                    str(built.root / f"{name}.img"),
                    str(base),
                ]
            )
            top = tmp_path / f"{name}-top.qcow2"
            img.create(str(top), None, backing=base.name)
            server = QemuNbdServer(
                str(top), socket_path=str(tmp_path / f"{name}.sock"), read_only=True
            )
            server.start()
            servers.append(server)
            sources[name] = source_for_nbd_socket(str(tmp_path / f"{name}.sock"))
        yield sources
    finally:
        for server in servers:
            server.stop()


def test_through_qemu_nbd_on_a_qcow2_chain(
    built: Built, worker_for, nbd_chain: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    for table, names in (("gpt", ["gpt-ext4", "gpt-fat"]), ("mbr", ["mbr-ntfs", "mbr-xfs"])):
        worker = worker_for(nbd_chain[table])
        parts = worker.partitions()
        assert [p.filesystem for p in parts] == [built.cases[n].filesystem for n in names]
        for name in names:
            case = built.cases[name]
            check_against_manifest(worker, case)
            big = (case.tree / BIG_FILE).read_bytes()
            assert (
                worker.read(case.partition, f"/{BIG_FILE}", 12345, 3 * MiB)
                == big[12345 : 12345 + 3 * MiB]
            )
        with pytest.raises(PathRefused):
            worker.read(1, "/../x", 0, 1)
        assert worker.restarts == 0


def test_pool_serves_threads_at_once(built: Built, nbd_chain: dict[str, str]) -> None:
    case = built.cases["gpt-ext4"]
    expected = case.manifest.items[f"/{BIG_FILE}"].sha256
    results: list[str] = []
    with FsPool(nbd_chain["gpt"], size=2) as pool:
        threads = [
            threading.Thread(
                target=lambda: results.append(sha256_of(pool, case.partition, f"/{BIG_FILE}"))
            )
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [expected] * 4
        assert len({w.pid for w in pool.workers}) == 2


def test_walk_is_depth_first_in_name_order_and_bounded(built: Built, worker_for) -> None:  # type: ignore[no-untyped-def]
    worker = worker_for(built.root / "ext4.img")
    paths = [e.path for e in worker.walk(0, "/nested")]
    assert paths == [
        "/nested/a",
        "/nested/a/b",
        "/nested/a/b/c",
        "/nested/a/b/c/deep.txt",
        "/nested/a/mid.txt",
    ]
    shallow = [e.path for e in worker.walk(0, "/nested", max_depth=2)]
    assert shallow == ["/nested/a", "/nested/a/b", "/nested/a/mid.txt"]  # b yielded, not entered
    links = {e.path: e.type for e in worker.walk(0, "/links")}
    assert links["/links/dir"] == "symlink" and not any(p.startswith("/links/dir/") for p in links)


def test_worker_ends_with_its_parent(tmp_path: Path, built: Built) -> None:
    # A hub killed with SIGKILL: the worker sees its socket close and exits
    # (one busy parsing notices through its parent watcher within a second).
    import os
    import signal
    import subprocess
    import sys

    pid_file = tmp_path / "worker.pid"
    script = (
        "import sys, time\n"
        "from sendense.restore.fs import FsWorker\n"
        f"w = FsWorker({str(built.root / 'ext4.img')!r})\n"
        "w.start()\n"
        f"open({str(pid_file)!r}, 'w').write(str(w.pid))\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        worker_pid = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while Path(f"/proc/{worker_pid}").exists():
            status = Path(f"/proc/{worker_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if status == "Z":
                break
            assert time.monotonic() < deadline, "the worker outlived its parent"
            time.sleep(0.1)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_nbd_server_gone_is_unavailable_not_corrupt(
    tmp_path: Path, built: Built, worker_for
) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "gpt.qcow2"
    img.convert(str(built.root / "gpt.img"), str(image), src_fmt="raw", dst_fmt="qcow2")
    sock = tmp_path / "nbd.sock"
    server = QemuNbdServer(str(image), socket_path=str(sock), read_only=True)
    server.start()
    worker = worker_for(source_for_nbd_socket(sock))
    try:
        assert worker.read(1, "/hello.txt", 0, 100) == b"hello, world\n"
    finally:
        server.stop()
    with pytest.raises(Unavailable) as gone:
        worker.read(1, f"/{BIG_FILE}", 20 * MiB, MiB)  # not in the worker's cache
    assert gone.value.code == "source_unavailable"
    with pytest.raises(Unavailable):
        worker.partitions()  # a new worker cannot connect either
    server = QemuNbdServer(str(image), socket_path=str(sock), read_only=True)
    server.start()
    try:
        big = (built.cases["gpt-ext4"].tree / BIG_FILE).read_bytes()
        assert worker.read(1, f"/{BIG_FILE}", 20 * MiB, MiB) == big[20 * MiB : 21 * MiB]
    finally:
        server.stop()


def test_close_stops_a_busy_worker_at_once(tmp_path: Path, built: Built) -> None:
    hostile = tmp_path / "loop-fat.img"
    disks.copy_sparse(built.root / "fat.img", hostile)
    disks.fat_loop_directory(hostile, "/nested", "/hello.txt")
    worker = FsWorker(hostile, limits=WorkerLimits(memory=8 * 1024 * MiB, request_timeout=60))
    worker.start()
    pid = worker.pid
    failures: list[BaseException] = []

    def busy() -> None:
        try:
            worker.list_dir(0, "/nested")
        except BaseException as e:
            failures.append(e)

    thread = threading.Thread(target=busy)
    thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    worker.close()
    thread.join(timeout=10)
    assert time.monotonic() - started < 5
    assert not thread.is_alive()
    assert len(failures) == 1 and isinstance(failures[0], Unavailable)
    assert failures[0].code == "fs_closed"
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(Unavailable):  # closed stays closed: no new worker behind a closed session
        worker.list_dir(0, "/")
    assert worker.pid is None


@pytest.mark.parametrize("name", ["ext4", "xfs", "fat", "ntfs"])
def test_randomly_damaged_filesystems_answer_or_fail_cleanly(
    tmp_path: Path, built: Built, name: str
) -> None:
    # Bytes overwritten at random, mostly in the first 4 MiB where the
    # metadata is: every request answers, or fails with one of our errors;
    # nothing hangs past the deadline and the hub side never sees anything else.
    from sendense.core.errors import Error

    expected = {
        "filesystem_corrupt",
        "parser_limit",
        "path_not_found",
        "not_a_directory",
        "not_a_file",
        "path_refused",
        "no_filesystem",
    }
    source = built.cases[name].image
    for seed in range(3):
        damaged = tmp_path / f"{name}-{seed}.img"
        disks.copy_sparse(source, damaged)
        rng = random.Random(seed)
        for _ in range(40):
            near = rng.random() < 0.8
            offset = rng.randrange(4 * MiB if near else source.stat().st_size)
            disks.overwrite(
                damaged, offset, rng.choice([1, 8, 64, 512]), seed=rng.randrange(1 << 30)
            )
        with FsWorker(damaged, limits=WorkerLimits(memory=512 * MiB, request_timeout=10)) as worker:
            try:
                parts = worker.partitions()
                if parts and parts[0].filesystem:
                    for n, entry in enumerate(worker.walk(parts[0].index, "/")):
                        if entry.type == "file" and n % 50 == 0:
                            for _ in worker.iter_file(parts[0].index, entry.path):
                                pass
                        if n > 5000:
                            break
            except Error as e:
                assert e.code in expected, e
