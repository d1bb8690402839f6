"""Streaming answers of restore sessions: file ranges and directory archives.

Nothing is built in memory or on disk first: a file is read piece by piece
from the filesystem worker as the client takes it; a ZIP is produced by
zipstream-ng as it is read (ZIP64 when needed); a tar.gz is written by
``tarfile`` in a producer thread into a bounded queue the answer drains (at
most a few MiB in flight). Symlinks are stored as links in both: in a tar.gz
as symlink members, in a ZIP as Info-ZIP does (Unix mode ``S_IFLNK | 0777``
in the entry's external attributes, the target as its stored content), which
``unzip``, ``bsdtar`` and 7-Zip restore as links. Special files (devices,
FIFOs, sockets) are skipped by both and listed in ``SENDENSE-MANIFEST.txt``.
"""

from __future__ import annotations

import collections
import io
import queue
import stat
import tarfile
import threading
from collections.abc import Generator, Iterator
from typing import Any

from zipstream import ZIP_DEFLATED, ZIP_STORED, ZipStream

from sendense.restore.fs.client import FsPool
from sendense.restore.fs.models import FsEntry

MANIFEST = "SENDENSE-MANIFEST.txt"


def relative(entry: FsEntry, root: str) -> str:
    base = root.rstrip("/")
    rel = entry.path[len(base) :].lstrip("/") if entry.path.startswith(base) else entry.name
    return rel or entry.name


class ModeZipStream(ZipStream):
    """A `ZipStream` whose entries carry a Unix mode of our choosing.

    zipstream-ng gives an entry made from data a fixed mode (0600, or 0775
    for a directory) and has no per-entry attribute. A ZIP keeps the external
    attributes only in the central directory, which is written at the end
    from the entries made so far (``_filelist``): each entry's mode is set
    once its data has been streamed. ``add`` queues exactly one entry, so the
    modes are kept in a queue alongside (tests/integration/test_restore_fs_archives.py
    checks this against the installed zipstream-ng)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._modes: collections.deque[int | None] = collections.deque()

    def add(  # type: ignore[override]
        self,
        data: Any,
        arcname: str,
        *,
        size: int | None = None,
        compress_type: int | None = None,
        compress_level: int | None = None,
        mode: int | None = None,
    ) -> None:
        """zipstream-ng's ``add`` and the entry's full ``st_mode`` (file type
        included; None keeps zipstream-ng's)."""
        super().add(
            data, arcname, size=size, compress_type=compress_type, compress_level=compress_level
        )
        self._modes.append(mode)

    def add_path(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("ModeZipStream takes entries one at a time (add)")

    def add_symlink(self, arcname: str, target: str) -> None:
        """A symbolic link as Info-ZIP stores one: mode S_IFLNK | 0777, the
        target as the (uncompressed) content."""
        self.add(
            target.encode("utf-8", "surrogateescape"),
            arcname,
            mode=stat.S_IFLNK | 0o777,
            compress_type=ZIP_STORED,
        )

    def file(self) -> Generator[bytes, None, bool]:  # type: ignore[override]
        mode = self._modes.popleft() if self._modes and self._queue else None
        done = yield from super().file()
        if done and mode is not None:
            zinfo = self._filelist[-1]
            zinfo.external_attr = (mode & 0xFFFF) << 16 | (zinfo.external_attr & 0xFFFF)
        return bool(done)


def _perm(mode: int | None, default: int) -> int:
    """Permission bits for an archive (setuid/setgid/sticky dropped: guest data)."""
    return default if mode is None else mode & 0o777


def zip_stream(pool: FsPool, partition: int, root: str) -> Iterator[bytes]:
    """The entries are listed first (names and sizes only); zipstream-ng
    then reads each file piece by piece as the archive is streamed."""
    zs = ModeZipStream(compress_type=ZIP_DEFLATED, compress_level=1)
    notes: list[str] = []
    for e in pool.walk(partition, root):
        rel = relative(e, root)
        if e.type == "dir":
            zs.add(None, rel + "/", mode=stat.S_IFDIR | _perm(e.mode, 0o755))
        elif e.type == "file":
            zs.add(
                pool.iter_file(partition, e.path),
                rel,
                size=e.size,
                mode=stat.S_IFREG | _perm(e.mode, 0o644),
            )
        elif e.type == "symlink":
            zs.add_symlink(rel, e.target or "")
        else:
            notes.append(f"skipped {e.type} {rel}")
    if notes:
        zs.add("\n".join(notes) + "\n", MANIFEST, mode=stat.S_IFREG | 0o644)
    return iter(zs)


class _QueueWriter(io.RawIOBase):
    def __init__(self, q: queue.Queue[bytes | BaseException | None], stop: threading.Event) -> None:
        self.q = q
        self.stop = stop

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.stop.is_set():
            raise BrokenPipeError("the client went away")
        data = bytes(b)
        self.q.put(data)
        return len(data)


class _IterReader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < n:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buf += chunk
        if n < 0:
            out, self.buf = self.buf, b""
        else:
            out, self.buf = self.buf[:n], self.buf[n:]
        return out


def tar_gz_stream(pool: FsPool, partition: int, root: str) -> Iterator[bytes]:
    q: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=16)
    stop = threading.Event()

    def produce() -> None:
        try:
            notes: list[str] = []
            with tarfile.open(fileobj=_QueueWriter(q, stop), mode="w|gz", bufsize=1 << 20) as tar:
                for e in pool.walk(partition, root):
                    ti = tarfile.TarInfo(relative(e, root))
                    ti.mtime = (e.mtime_ns or 0) // 1_000_000_000
                    ti.uid, ti.gid = e.uid or 0, e.gid or 0
                    if e.type == "dir":
                        ti.type, ti.mode = tarfile.DIRTYPE, _perm(e.mode, 0o755)
                        tar.addfile(ti)
                    elif e.type == "symlink":
                        ti.type, ti.linkname = tarfile.SYMTYPE, e.target or ""
                        ti.mode = 0o777
                        tar.addfile(ti)
                    elif e.type == "file":
                        ti.size, ti.mode = e.size, _perm(e.mode, 0o644)
                        tar.addfile(ti, _IterReader(pool.iter_file(partition, e.path)))
                    else:
                        notes.append(f"skipped {e.type} {relative(e, root)}")
                if notes:
                    data = ("\n".join(notes) + "\n").encode()
                    ti = tarfile.TarInfo(MANIFEST)
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
            q.put(None)
        except BaseException as e:  # handed to the reader
            q.put(e)

    thread = threading.Thread(target=produce, name="tar-stream", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)
