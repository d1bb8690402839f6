"""Streaming answers of restore sessions: file ranges and directory archives.

Nothing is built in memory or on disk first: a file is read piece by piece
from the filesystem worker as the client takes it; a ZIP is produced by
zipstream-ng as it is read (ZIP64 when needed); a tar.gz is written by
``tarfile`` in a producer thread into a bounded queue the answer drains (at
most a few MiB in flight). Symlinks go into a tar.gz as links; ZIP has no
portable link entry here, so ZIP lists them (with their targets) in
``SENDENSE-MANIFEST.txt``, as it lists the special files both formats skip.
"""

from __future__ import annotations

import io
import queue
import tarfile
import threading
from collections.abc import Iterator
from typing import Any

from zipstream import ZIP_DEFLATED, ZipStream

from sendense.restore.fs.client import FsPool
from sendense.restore.fs.models import FsEntry

MANIFEST = "SENDENSE-MANIFEST.txt"


def relative(entry: FsEntry, root: str) -> str:
    base = root.rstrip("/")
    rel = entry.path[len(base) :].lstrip("/") if entry.path.startswith(base) else entry.name
    return rel or entry.name


def zip_stream(pool: FsPool, partition: int, root: str) -> Iterator[bytes]:
    """The entries are listed first (names and sizes only); zipstream-ng
    then reads each file piece by piece as the archive is streamed."""
    zs = ZipStream(compress_type=ZIP_DEFLATED, compress_level=1)
    notes: list[str] = []
    for e in pool.walk(partition, root):
        rel = relative(e, root)
        if e.type == "dir":
            zs.add(None, rel + "/")
        elif e.type == "file":
            zs.add(pool.iter_file(partition, e.path), rel, size=e.size)
        elif e.type == "symlink":
            notes.append(f"symlink {rel} -> {e.target}")
        else:
            notes.append(f"skipped {e.type} {rel}")
    if notes:
        zs.add("\n".join(notes) + "\n", MANIFEST)
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
                        ti.type, ti.mode = tarfile.DIRTYPE, (e.mode or 0o755) & 0o7777
                        tar.addfile(ti)
                    elif e.type == "symlink":
                        ti.type, ti.linkname = tarfile.SYMTYPE, e.target or ""
                        ti.mode = 0o777
                        tar.addfile(ti)
                    elif e.type == "file":
                        ti.size, ti.mode = e.size, (e.mode or 0o644) & 0o7777
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
