"""Directory archives of restore sessions (hub/restore/streams.py), built
from a real ext4 image read by a filesystem worker, unpacked by Python's
zipfile/tarfile and by ``unzip`` (the tool people use), and compared with
the source tree: symlinks stay links in both formats, special files are
skipped and listed in the manifest entry."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures import disks
from sendense.core.errors import ParserLimit
from sendense.hub.restore import streams
from sendense.restore.fs import FsWorker, WorkerLimits

pytestmark = pytest.mark.skipif(
    bool(disks.tools_missing()), reason=f"missing tools: {disks.tools_missing()}"
)

LINKS = {
    "links/inside": "../hello.txt",
    "links/dir": "../nested",
    "links/outside": "../../../../../etc/passwd",
    "links/absolute": "/nested/a/mid.txt",
}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FsWorker]:
    root = tmp_path_factory.mktemp("archives")
    tree = root / "tree"
    (tree / "nested/a").mkdir(parents=True)
    (tree / "links").mkdir()
    (tree / "hello.txt").write_bytes(b"hello, world\n")
    (tree / "empty.txt").write_bytes(b"")
    (tree / "nested/a/mid.txt").write_bytes(os.urandom(70_000))
    (tree / "text.txt").write_bytes(b"a line of text that compresses well\n" * 10_000)
    (tree / "nested/a/run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (tree / "nested/a/run.sh").chmod(0o4755)  # setuid: not carried into archives
    for name, target in LINKS.items():
        os.symlink(target, tree / name)
    os.mkfifo(tree / "nested/pipe")
    disks.build_ext4(root / "ext4.img", tree)
    w = FsWorker(root / "ext4.img")
    yield w
    w.close()


def test_zip_stores_symlinks_as_links_and_lists_special_files(
    worker: FsWorker, tmp_path: Path
) -> None:
    data = b"".join(streams.zip_stream(worker, 0, "/"))  # type: ignore[arg-type]
    z = zipfile.ZipFile(io.BytesIO(data))
    assert z.testzip() is None
    infos = {i.filename: i for i in z.infolist()}
    for name, target in LINKS.items():
        mode = infos[name].external_attr >> 16
        assert stat.S_ISLNK(mode) and stat.S_IMODE(mode) == 0o777, name
        assert infos[name].compress_type == zipfile.ZIP_STORED
        assert z.read(name) == target.encode()
    run = infos["nested/a/run.sh"].external_attr >> 16
    assert stat.S_ISREG(run) and stat.S_IMODE(run) == 0o755
    assert stat.S_ISDIR(infos["nested/"].external_attr >> 16) and infos["nested/"].is_dir()
    assert z.read("hello.txt") == b"hello, world\n" and z.read("empty.txt") == b""
    # random data is stored (deflate would only cost time), text is deflated
    assert infos["nested/a/mid.txt"].compress_type == zipfile.ZIP_STORED
    assert infos["text.txt"].compress_type == zipfile.ZIP_DEFLATED
    assert infos["text.txt"].compress_size < infos["text.txt"].file_size // 10
    assert z.read("text.txt") == b"a line of text that compresses well\n" * 10_000
    manifest = z.read(streams.MANIFEST).decode()
    assert "skipped other nested/pipe" in manifest and "symlink" not in manifest
    assert "nested/pipe" not in infos

    unzip = shutil.which("unzip")
    if unzip is None:
        pytest.skip("unzip not installed")
    (tmp_path / "a.zip").write_bytes(data)
    out = tmp_path / "unzipped"
    proc = subprocess.run(
        [unzip, "-q", str(tmp_path / "a.zip"), "-d", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    for name, target in LINKS.items():
        assert (out / name).is_symlink(), name
        assert os.readlink(out / name) == target
    assert (out / "links/inside").read_bytes() == b"hello, world\n"  # resolves inside the copy
    got = (out / "nested/a/mid.txt").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(z.read("nested/a/mid.txt")).digest()
    assert stat.S_IMODE((out / "nested/a/run.sh").stat().st_mode) == 0o755


def test_tar_gz_keeps_links_and_lists_special_files(worker: FsWorker) -> None:
    data = b"".join(streams.tar_gz_stream(worker, 0, "/"))  # type: ignore[arg-type]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name, target in LINKS.items():
            assert members[name].issym() and members[name].linkname == target
        assert "nested/pipe" not in members
        assert members["nested/a/run.sh"].mode == 0o755  # setuid dropped
        f = tar.extractfile(streams.MANIFEST)
        assert f is not None and b"skipped other nested/pipe" in f.read()


def test_zip_of_a_subdirectory_names_entries_from_it(worker: FsWorker) -> None:
    data = b"".join(streams.zip_stream(worker, 0, "/nested"))  # type: ignore[arg-type]
    names = set(zipfile.ZipFile(io.BytesIO(data)).namelist())
    assert {"a/", "a/mid.txt", "a/run.sh", streams.MANIFEST} == names


def test_archives_of_a_hostile_filesystem_note_what_could_not_be_read(tmp_path: Path) -> None:
    """A FAT32 whose /nested cluster chain loops through hello.txt's: listing
    /nested hits the worker's memory limit, reading hello.txt is corruption.
    Both archives still come out valid, with the rest and a manifest."""
    tree = tmp_path / "tree"
    (tree / "nested").mkdir(parents=True)
    (tree / "hello.txt").write_bytes(b"hello, world\n")
    (tree / "other.txt").write_bytes(b"untouched\n")
    (tree / "nested/deep.txt").write_bytes(b"deep\n")
    image = tmp_path / "loop.fat"
    disks.build_fat(image, tree, size=40 * disks.MiB)
    disks.fat_loop_directory(image, "/nested", "/hello.txt")
    with FsWorker(image, limits=WorkerLimits(memory=512 * disks.MiB, request_timeout=120)) as w:
        z = zipfile.ZipFile(io.BytesIO(b"".join(streams.zip_stream(w, 0, "/"))))  # type: ignore[arg-type]
        assert z.testzip() is None
        assert z.read("other.txt") == b"untouched\n" and z.read("hello.txt") == b""
        notes = z.read(streams.MANIFEST).decode()
        assert "unreadable directory /nested: " in notes and "memory limit" in notes
        assert "unreadable hello.txt (cut at byte 0): " in notes and "loops" in notes

        data = b"".join(streams.tar_gz_stream(w, 0, "/"))  # type: ignore[arg-type]
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = {m.name: m for m in tar.getmembers()}
            hello = tar.extractfile(members["hello.txt"])
            assert hello is not None and hello.read() == bytes(13)  # padded to its size
            other = tar.extractfile(members["other.txt"])
            assert other is not None and other.read() == b"untouched\n"
            manifest = tar.extractfile(members[streams.MANIFEST])
            assert manifest is not None
            notes = manifest.read().decode()
        assert "unreadable hello.txt (zeros from byte 0)" in notes
        assert "unreadable directory /nested" in notes
        assert "nested" in members and "nested/deep.txt" not in members

        # the directory asked for cannot be listed: the call raises, before
        # any answer would start (never a 200 cut short)
        for make in (streams.zip_stream, streams.tar_gz_stream):
            with pytest.raises(ParserLimit):
                make(w, 0, "/nested")  # type: ignore[arg-type]
