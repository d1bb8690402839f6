"""NTFS beyond what ntfsprogs can write without mounting.

- Interix symlinks (how ntfs-3g, i.e. Linux, writes symlinks on NTFS),
  built without mounting (`disks.ntfs_interix_symlink`).
- A volume written through ntfs-3g itself: nested directories, a
  3,000-entry directory (an index B-tree), Unicode names, a hard link, a
  sparse file, an NTFS-compressed file, Windows
  symlinks (relative, and absolute: pointing out) and a junction, set as
  reparse points through ntfs-3g's ``system.ntfs_reparse_data`` attribute.
  This needs FUSE (root and /dev/fuse); where it cannot mount, the test is
  skipped. Every check is against the source data, never the parser.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from fixtures import disks
from fixtures.disks import MiB
from sendense.core.errors import NotAFile, PathRefused
from sendense.restore.fs import FsWorker

pytestmark = pytest.mark.skipif(
    bool(disks.tools_missing()), reason=f"missing tools: {disks.tools_missing()}"
)


def test_interix_symlinks_are_links(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_bytes(b"hello\n")
    image = tmp_path / "ntfs.img"
    disks.build_ntfs(image, tree, size=16 * MiB)
    disks.ntfs_interix_symlink(image, "inside", "hello.txt", tmp_path)
    disks.ntfs_interix_symlink(image, "absolute", "/hello.txt", tmp_path)
    disks.ntfs_interix_symlink(image, "outside", "../../etc/passwd", tmp_path)
    with FsWorker(image) as w:
        entries = {e.name: e for e in w.list_dir(0, "/").entries}
        assert {n: (e.type, e.target) for n, e in entries.items()} == {
            "hello.txt": ("file", None),
            "inside": ("symlink", "hello.txt"),
            "absolute": ("symlink", "/hello.txt"),
            "outside": ("symlink", "../../etc/passwd"),
        }
        assert w.read(0, "/inside", 0, 100) == b"hello\n"
        assert w.read(0, "/absolute", 0, 100) == b"hello\n"
        with pytest.raises(PathRefused):
            w.read(0, "/outside", 0, 100)
        assert w.stat(0, "/inside", follow=True).size == 6


def _reparse_symlink(target: str, *, relative: bool) -> bytes:
    name = target.encode("utf-16-le")
    body = struct.pack("<HHHHI", 0, len(name), len(name), len(name), int(relative)) + name + name
    return struct.pack("<IHH", 0xA000000C, len(body), 0) + body


def _reparse_junction(target: str) -> bytes:
    name = target.encode("utf-16-le") + b"\0\0"
    body = struct.pack("<HHHH", 0, len(name) - 2, len(name), 0) + name + b"\0\0"
    return struct.pack("<IHH", 0xA0000003, len(body), 0) + body


def _can_mount() -> str | None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        return "needs root and /dev/fuse"
    if shutil.which("ntfs-3g") is None:
        return "ntfs-3g is not installed"
    return None


@pytest.mark.skipif(_can_mount() is not None, reason=str(_can_mount()))
def test_a_volume_written_by_ntfs3g(tmp_path: Path) -> None:
    image = tmp_path / "ntfs.img"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkntfs", "-q", "-F", "-f", "-L", "written", str(image)], capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["ntfs-3g", str(image), str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"ntfs-3g cannot mount here: {mounted.stderr.strip()}")
    rng = random.Random(6)
    data = rng.randbytes(3 * MiB)
    compressible = b"compressible line of text\n" * 80_000
    try:
        (mnt / "a/b/c").mkdir(parents=True)
        (mnt / "a/b/c/deep.txt").write_bytes(b"deep\n")
        (mnt / "a/data.bin").write_bytes(data)
        (mnt / "répertoire").mkdir()
        (mnt / "répertoire/ファイル.txt").write_bytes("日本語\n".encode())
        (mnt / "many").mkdir()
        for i in range(3000):
            (mnt / f"many/f{i:04d}.txt").write_bytes(f"file {i}\n".encode())
        os.link(mnt / "a/b/c/deep.txt", mnt / "hardlink.txt")
        with (mnt / "sparse.bin").open("wb") as f:
            f.truncate(10 * MiB)
            f.seek(5 * MiB)
            f.write(b"X" * 4096)
        (mnt / "packed").mkdir()
        os.setxattr(mnt / "packed", "system.ntfs_attrib", struct.pack("<I", 0x800))
        (mnt / "packed/z.txt").write_bytes(compressible)
        compressed = struct.unpack("<I", os.getxattr(mnt / "packed/z.txt", "system.ntfs_attrib"))
        assert compressed[0] & 0x800, "ntfs-3g did not compress the file"
        os.symlink("../a/data.bin", mnt / "a/interix")  # ntfs-3g writes Interix symlinks
        for name, reparse in (
            ("win_rel", _reparse_symlink("a\\data.bin", relative=True)),
            ("win_abs", _reparse_symlink("\\??\\C:\\Windows\\win.ini", relative=False)),
        ):
            (mnt / name).write_bytes(b"")
            os.setxattr(mnt / name, "system.ntfs_reparse_data", reparse)
        (mnt / "junction").mkdir()
        os.setxattr(mnt / "junction", "system.ntfs_reparse_data", _reparse_junction("\\??\\C:\\a"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

    sha = {
        "/a/data.bin": hashlib.sha256(data).hexdigest(),
        "/a/b/c/deep.txt": hashlib.sha256(b"deep\n").hexdigest(),
        "/hardlink.txt": hashlib.sha256(b"deep\n").hexdigest(),
        "/répertoire/ファイル.txt": hashlib.sha256("日本語\n".encode()).hexdigest(),
        "/packed/z.txt": hashlib.sha256(compressible).hexdigest(),
        "/sparse.bin": hashlib.sha256(
            bytes(5 * MiB) + b"X" * 4096 + bytes(5 * MiB - 4096)
        ).hexdigest(),
        "/a/interix": hashlib.sha256(data).hexdigest(),
        "/win_rel": hashlib.sha256(data).hexdigest(),
    }
    with FsWorker(image) as w:
        (part,) = w.partitions()
        assert part.filesystem == "ntfs" and part.label == "written"
        root = {e.name: e for e in w.list_dir(0, "/").entries}
        assert set(root) == {
            "a",
            "répertoire",
            "many",
            "hardlink.txt",
            "sparse.bin",
            "packed",
            "win_rel",
            "win_abs",
            "junction",
        }
        assert root["a"].type == "dir" and root["hardlink.txt"].type == "file"
        assert (root["win_rel"].type, root["win_rel"].target) == ("symlink", "a\\data.bin")
        assert root["win_abs"].type == "symlink" and root["junction"].type == "symlink"
        a = {e.name: e for e in w.list_dir(0, "/a").entries}
        assert (a["interix"].type, a["interix"].target) == ("symlink", "../a/data.bin")
        assert a["data.bin"].size == len(data)
        listing = w.list_dir(0, "/many", limit=5000)
        assert [e.name for e in listing.entries] == [f"f{i:04d}.txt" for i in range(3000)]
        assert w.read(0, "/many/f2999.txt", 0, 100) == b"file 2999\n"
        for path, digest in sha.items():
            got = hashlib.sha256(b"".join(w.iter_file(0, path))).hexdigest()
            assert got == digest, path
        for out in ("/win_abs", "/junction/x"):
            with pytest.raises(PathRefused):
                w.read(0, out, 0, 10)
        with pytest.raises(NotAFile):
            w.read(0, "/a", 0, 10)
        # the whole tree: depth first, links not followed (the junction is a link)
        walked = {e.path for e in w.walk(0, "/")}
        assert "/a/b/c/deep.txt" in walked and not any(p.startswith("/junction/") for p in walked)
