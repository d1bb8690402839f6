"""Upstream parser defects, checked in-process on the worker's own classes:
each test counts what the fix saves, so it fails without the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fixtures import disks
from fixtures.disks import BIG_FILE, MANY_COUNT, MANY_DIR
from sendense.restore.fs.filesystems import ExtFilesystem, FatFilesystem, Tree, XfsFilesystem
from sendense.restore.fs.source import BlockReader, FileBackend, OffsetView

pytestmark = pytest.mark.skipif(
    bool(disks.tools_missing()), reason=f"missing tools: {disks.tools_missing()}"
)


class CountingView(OffsetView):
    def __init__(self, reader: BlockReader) -> None:
        super().__init__(reader, 0, reader.size)
        self.reads = 0

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        return super().read(size)


def open_view(image: Path) -> CountingView:
    return CountingView(BlockReader(FileBackend(str(image))))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("defects")
    disks.make_tree(root / "tree")
    disks.make_tree(root / "tree_fat", symlinks=False)
    disks.build_ext4(root / "ext4.img", root / "tree")
    disks.build_xfs(root / "xfs.img", root / "tree")
    disks.build_fat(root / "fat.img", root / "tree_fat")
    return {
        "ext4": root / "ext4.img",
        "xfs": root / "xfs.img",
        "fat": root / "fat.img",
        "root": root,
    }


@pytest.mark.parametrize(("name", "adapter"), [("ext4", ExtFilesystem), ("xfs", XfsFilesystem)])
def test_lookups_in_a_big_directory_parse_it_once(
    images: dict[str, Path], name: str, adapter: Any
) -> None:
    # dissect's get(path) walks every entry of each directory on the path, per lookup.
    fs = adapter(open_view(images[name]))
    parsed: list[Any] = []
    original = fs.children

    def counting(node: Any) -> dict[str, Any]:
        parsed.append(fs.key(node))
        return original(node)  # type: ignore[no-any-return]

    fs.children = counting
    tree = Tree(fs)
    for i in range(0, MANY_COUNT, 10):
        assert tree.stat(f"/{MANY_DIR}/f{i:04d}.txt").size == len(f"file {i}\n")
    assert len(parsed) == 2  # the root and many/, once each, for 300 lookups


def test_fat_file_data_in_one_read_per_run(images: dict[str, Path]) -> None:
    # 512-byte clusters; dissect's RunlistStream reads one cluster per call.
    view = open_view(images["fat"])
    fs = FatFilesystem(view)
    tree = Tree(fs)
    entry, fh = tree.open(f"/{BIG_FILE}")
    runs = fs.runs(int(tree.resolve(f"/{BIG_FILE}", follow=True)[1].cluster))
    assert sum(length for _, length in runs) >= entry.size
    assert len(runs) < 10
    before = view.reads
    data = fh.read()
    assert len(data) == disks.BIG_SIZE
    assert data == (images["root"] / "tree_fat" / BIG_FILE).read_bytes()
    assert view.reads - before == len(runs)  # not BIG_SIZE / 512 = 49,152


def test_fat_chain_loop_in_a_file_is_corruption_not_a_hang(
    tmp_path: Path, images: dict[str, Path]
) -> None:
    from sendense.restore.fs.filesystems import Corrupt

    image = tmp_path / "loop.img"
    disks.copy_sparse(images["fat"], image)
    clusters = disks.fat_clusters(image, f"/{BIG_FILE}")
    disks.set_fat32_entry(image, clusters[-1], clusters[0])
    tree = Tree(FatFilesystem(open_view(image)))
    with pytest.raises(Corrupt, match="loops"):
        tree.open(f"/{BIG_FILE}")


def test_names_that_cannot_be_paths_are_left_out() -> None:
    from sendense.restore.fs.filesystems import Filesystem
    from sendense.restore.fs.models import FsEntry

    class Hostile(Filesystem):
        def root(self) -> Any:
            return "root"

        def key(self, node: Any) -> Any:
            return node

        def children(self, node: Any) -> dict[str, Any]:
            names = ["ok", "a/b", "..", ".", "", "x\x00y", "../../etc"]
            return {name: f"file:{name}" for name in names}

        def type_of(self, node: Any) -> str:
            return "dir" if node == "root" else "file"

        def entry(self, name: str, path: str, node: Any) -> FsEntry:
            return FsEntry(name, path, self.type_of(node), 0, None, None, None, None)

    listing = Tree(Hostile()).list("/")
    assert [e.name for e in listing.entries] == ["ok"]
    assert listing.total == 1


def test_ext4_inline_data_read_whole(tmp_path: Path) -> None:
    # dissect reads only the 60 bytes of i_block: a 100-byte inline file came
    # back cut short, and an inline directory came back empty.
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "f100.txt").write_bytes(b"x" * 59 + b"y" * 41)
    for i in range(3):
        (tree / "d" / f"file{i}").write_bytes(f"{i}\n".encode())
    image = tmp_path / "inline.img"
    disks.build_ext4(image, tree, size=32 * disks.MiB, options=("-O", "inline_data", "-I", "256"))
    tree_view = Tree(ExtFilesystem(open_view(image)))
    _, fh = tree_view.open("/f100.txt")
    assert fh.read() == b"x" * 59 + b"y" * 41
    assert [e.name for e in tree_view.list("/d").entries] == ["file0", "file1", "file2"]
    _, fh = tree_view.open("/d/file2")
    assert fh.read() == b"2\n"
