"""Streaming answers of restore sessions: file ranges and directory archives.

Nothing is built in memory or on disk first: a file is read piece by piece
from the filesystem worker as the client takes it; a ZIP is produced by
zipstream-ng as it is read (ZIP64 when needed); a tar.gz is written by
``tarfile`` in a producer thread into a bounded queue the answer drains (at
most a few MiB in flight). Symlinks are stored as links in both: in a tar.gz
as symlink members, in a ZIP as Info-ZIP does (Unix mode ``S_IFLNK | 0777``
in the entry's external attributes, the target as its stored content), which
``unzip``, ``bsdtar`` and 7-Zip restore as links. Special files (devices,
FIFOs, sockets) are skipped by both and listed in ``SENDENSE-MANIFEST.txt``,
as is what the parser could not read (a damaged or hostile filesystem): a
directory that cannot be listed is left out, a file that cannot be read is
cut short in a ZIP or padded with zeros to its size in a tar.gz (whose
header already holds the size). The archive itself stays valid.
A name that is not UTF-8 keeps its bytes in a tar.gz (PAX, as GNU tar
does); a ZIP cannot hold it (its names are UTF-8 or CP437), so the entry is
named in the escaped form (restore/fs/paths.py: ``%XX`` for each such byte)
and listed in the manifest.
"""

from __future__ import annotations

import collections
import io
import itertools
import queue
import stat
import tarfile
import threading
import zlib
from collections.abc import Generator, Iterator
from typing import Any

from zipstream import ZIP_DEFLATED, ZIP_STORED, ZipStream

from sendense.core.errors import (
    FilesystemCorrupt,
    FsPathNotFound,
    NotADirectory,
    NotAFile,
    ParserLimit,
)
from sendense.restore.fs.client import WALK_MAX_DEPTH, WALK_PAGE, FsPool
from sendense.restore.fs.models import FsEntry
from sendense.restore.fs.paths import escape, has_raw_bytes, shown

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

    def _gen_file_entry(  # type: ignore[no-untyped-def]
        self, *, iterable=None, compress_type=None, **kwargs
    ) -> Iterator[bytes]:
        """Data that does not compress is stored: the first piece is read as
        the entry starts (it is read then anyway) and a sample of it tried
        at level 1; random, compressed or encrypted data goes through at
        read speed instead of deflate's (~60 MiB/s on one core)."""
        if iterable is not None and (compress_type or self._compress_type) == ZIP_DEFLATED:
            pieces = iter(iterable)
            first = next(pieces, None)
            if first is not None and _incompressible(first):
                compress_type = ZIP_STORED
            iterable = itertools.chain(() if first is None else (first,), pieces)
        return super()._gen_file_entry(  # type: ignore[no-any-return]
            iterable=iterable, compress_type=compress_type, **kwargs
        )

    def file(self) -> Generator[bytes, None, bool]:  # type: ignore[override]
        mode = self._modes.popleft() if self._modes and self._queue else None
        done = yield from super().file()
        if done and mode is not None:
            zinfo = self._filelist[-1]
            zinfo.external_attr = (mode & 0xFFFF) << 16 | (zinfo.external_attr & 0xFFFF)
        return bool(done)


SAMPLE = 64 * 1024


def _incompressible(piece: bytes) -> bool:
    """True when deflate (level 1) saves less than 5% on a sample of ``piece``."""
    sample = piece[:SAMPLE]
    return len(sample) >= 4096 and len(zlib.compress(sample, 1)) > 0.95 * len(sample)


def _perm(mode: int | None, default: int) -> int:
    """Permission bits for an archive (setuid/setgid/sticky dropped: guest data)."""
    return default if mode is None else mode & 0o777


# What one unreadable entry of a hostile or damaged filesystem raises: the
# archive goes on without it (noted in the manifest). Unavailable (the
# session closed, the disk gone) ends the archive.
UNREADABLE = (FilesystemCorrupt, ParserLimit, FsPathNotFound, NotAFile, NotADirectory)


def walk(pool: FsPool, partition: int, root: str, notes: list[str]) -> Iterator[FsEntry]:
    """`FsPool.walk`, but a directory below ``root`` that cannot be listed
    is noted and left out instead of ending the walk (the root itself must
    be readable: its error is the answer)."""
    stack: list[tuple[Iterator[FsEntry], int]] = [(_entries(pool, partition, root), 1)]
    while stack:
        entries, depth = stack[-1]
        try:
            entry = next(entries, None)
        except UNREADABLE as e:
            if len(stack) == 1:
                raise
            stack.pop()
            notes.append(f"unreadable directory {shown(e.details.get('path', '?'))}: {e.message}")
            continue
        if entry is None:
            stack.pop()
            continue
        yield entry
        if entry.type == "dir" and depth < WALK_MAX_DEPTH:
            stack.append((_entries(pool, partition, entry.path), depth + 1))


def _entries(pool: FsPool, partition: int, path: str) -> Iterator[FsEntry]:
    offset = 0
    while True:
        try:
            page = pool.list_dir(partition, path, offset=offset, limit=WALK_PAGE)
        except UNREADABLE as e:
            e.details.setdefault("path", shown(path))
            raise
        yield from page.entries
        offset += len(page.entries)
        if not page.entries or offset >= page.total:
            return


def guarded(
    pieces: Iterator[bytes], rel: str, size: int, notes: list[str], *, pad: bool
) -> Iterator[bytes]:
    """A file's pieces; when the parser fails on it, the failure is noted
    and the content ends there (``pad``: zeros up to ``size``, for a tar
    member whose size is already written)."""
    done = 0
    try:
        for piece in pieces:
            done += len(piece)
            yield piece
    except UNREADABLE as e:
        what = f"zeros from byte {done}" if pad else f"cut at byte {done}"
        notes.append(f"unreadable {shown(rel)} ({what}): {e.message}")
        if pad:
            while done < size:
                n = min(1 << 20, size - done)
                done += n
                yield bytes(n)


def first_read(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """The first piece read before the answer starts: a file the parser
    cannot read (corrupt, a looping chain, a limit hit), or a directory
    that cannot be listed, is an error answer (409 ``filesystem_corrupt`` /
    ``parser_limit``), not a 200 cut short. A failure further on can only
    end the stream early (Content-Length tells the client)."""
    first = next(pieces, None)
    if first is None:
        return iter(())
    return itertools.chain((first,), pieces)


def zip_stream(pool: FsPool, partition: int, root: str) -> Iterator[bytes]:
    """A ZIP of the directory ``root``, its first piece already produced
    (so that a root that cannot be listed raises here, see `first_read`)."""
    return first_read(_zip(pool, partition, root))


def _zip(pool: FsPool, partition: int, root: str) -> Iterator[bytes]:
    """Entries are added as the walk finds them and streamed at once (each
    file read piece by piece): the first bytes go out before the tree is
    walked, and only the central directory's records are kept until the
    end. The manifest goes last, once every file was read (read failures
    too)."""
    zs = ModeZipStream(compress_type=ZIP_DEFLATED, compress_level=1)
    notes: list[str] = []
    for e in walk(pool, partition, root, notes):
        rel = relative(e, root)
        if has_raw_bytes(rel):  # ZIP names are UTF-8 (or CP437): the escaped form
            rel = escape(rel)
            notes.append(f"escaped {rel} (the name is not UTF-8: %XX is the byte XX)")
        if e.type == "dir":
            zs.add(None, rel + "/", mode=stat.S_IFDIR | _perm(e.mode, 0o755))
        elif e.type == "file":
            zs.add(
                guarded(pool.iter_file(partition, e.path), rel, e.size, notes, pad=False),
                rel,
                size=e.size,
                mode=stat.S_IFREG | _perm(e.mode, 0o644),
            )
        elif e.type == "symlink":
            zs.add_symlink(rel, e.target or "")
        else:
            notes.append(f"skipped {e.type} {shown(rel)}")
        yield from zs.all_files()
    if notes:
        zs.add("\n".join(notes) + "\n", MANIFEST, mode=stat.S_IFREG | 0o644)
        yield from zs.all_files()
    yield from zs.footer()


class _GzipQueueWriter(io.RawIOBase):
    """What tarfile writes, gzip-compressed at level 1 into the queue the
    answer drains (tarfile's own ``w|gz`` compresses at level 9: three to
    seven times slower on text for ~5% smaller output)."""

    def __init__(self, q: queue.Queue[bytes | BaseException | None], stop: threading.Event) -> None:
        self.q = q
        self.stop = stop
        self.gz = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.stop.is_set():
            raise BrokenPipeError("the client went away")
        data = self.gz.compress(b)
        if data:
            self.q.put(data)
        return len(b)

    def finish(self) -> None:
        """The end of the gzip stream (its trailer)."""
        self.q.put(self.gz.flush())


class _IterReader(io.RawIOBase):
    """A file-like reader over pieces of bytes (tarfile copies a member from
    it in blocks); each piece is handed out by slices, never re-copied."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buf = b""
        self.pos = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.pos >= len(self.buf):
            chunk = next(self.chunks, None)
            if chunk is None:
                return b""
            self.buf, self.pos = chunk, 0
        if n < 0:
            n = len(self.buf) - self.pos
        out = self.buf[self.pos : self.pos + n]
        self.pos += len(out)
        return out


def tar_gz_stream(pool: FsPool, partition: int, root: str) -> Iterator[bytes]:
    """A tar.gz of the directory ``root``, its first piece already produced
    (see `first_read`)."""
    return first_read(_tar_gz(pool, partition, root))


def _tar_gz(pool: FsPool, partition: int, root: str) -> Iterator[bytes]:
    q: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=16)
    stop = threading.Event()

    def produce() -> None:
        try:
            notes: list[str] = []
            out = _GzipQueueWriter(q, stop)
            with tarfile.open(fileobj=out, mode="w|", bufsize=1 << 20) as tar:
                tar.copybufsize = 1 << 20  # type: ignore[attr-defined]  # 1 MiB blocks, not 16 KiB
                for e in walk(pool, partition, root, notes):
                    rel = relative(e, root)
                    ti = tarfile.TarInfo(rel)
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
                        pieces = pool.iter_file(partition, e.path)
                        tar.addfile(ti, _IterReader(guarded(pieces, rel, e.size, notes, pad=True)))
                    else:
                        notes.append(f"skipped {e.type} {shown(rel)}")
                if notes:
                    data = ("\n".join(notes) + "\n").encode()
                    ti = tarfile.TarInfo(MANIFEST)
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
            out.finish()
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
