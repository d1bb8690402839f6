"""Filesystems read with the dissect parsers, behind one small shape.

This module and `volumes.py` are the only ones importing dissect (AGPL-3.0-
or-later); they run only inside the worker process (`worker.py`), never in
the hub. Each `Filesystem` adapter answers the same few questions (root,
children of a directory, what an entry is, its link target, its data); the
`Tree` above them resolves paths, caches directories and pages listings for
every filesystem alike.

Upstream defects handled here, each in one place:

- ext/XFS path lookup: dissect's ``get(path)`` scans every entry of every
  directory on the path, for each lookup. `Tree.children` reads a directory
  once into a dict (kept in an LRU cache by inode), so a lookup is one dict
  probe per component and a 3,000-entry directory is parsed once, not once
  per file in it.
- FAT reads one cluster per call (``RunlistStream`` aligned to the cluster
  size: ~100 MiB/s). `FatFilesystem.open` builds the file's cluster runs
  itself (contiguous clusters merged, a cycle or an out-of-range cluster in
  the chain reported as corruption instead of looping) and reads each run
  in one request (`RunReader`).
- FAT short names: an 8.3 entry without a long name stores lowercase as two
  flags in ``DIR_NTRes`` (0x08 base, 0x10 extension, as Windows NT writes
  them); dissect shows such names in capitals. `FatFilesystem.name` applies
  the flags ("hello.txt", not "HELLO.TXT").
- NTFS system files (``$MFT``, ``$Bitmap``, ``$Extend``, ...) in the root
  are listed by dissect like user files; `NtfsFilesystem.hidden` marks them
  and listings leave them out unless asked (``show_system``).
- ext4 inline data: dissect reads only the 60 bytes in ``i_block``; the
  rest is in the ``system.data`` attribute, and an inline directory starts
  with its parent's inode number. `ExtFilesystem` reads both.
- No journal is replayed: a filesystem not cleanly unmounted is read as it
  is on disk. Each adapter's ``warnings`` says so where the filesystem
  records it (ext: needs_recovery / not clean; NTFS: the volume's dirty
  flag; FAT: the clean-shutdown bit). XFS keeps no such flag in its
  superblock (the log itself would have to be read), so nothing is claimed
  for XFS.
"""

from __future__ import annotations

import io
import stat
import struct
from collections import OrderedDict
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from typing import Any, BinaryIO

from dissect.extfs import ExtFS
from dissect.fat import FATFS
from dissect.ntfs import NTFS
from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE
from dissect.xfs import XFS

from sendense.core.errors import FsPathNotFound, NotADirectory, NotAFile, PathRefused
from sendense.restore.fs.models import FsEntry, FsListing
from sendense.restore.fs.paths import join_path, resolve_link, split_path

MAX_LINK_HOPS = 40  # as Linux's MAXSYMLINKS
# Directory entries kept parsed, over all cached directories: ~2 KiB each in
# the worker (measured on ext4, XFS and FAT), so ~200 MiB of its 1 GiB.
DIR_CACHE_ENTRIES = 100_000


class Corrupt(Exception):
    """The filesystem's structures are inconsistent (reported as filesystem_corrupt)."""


class Filesystem:
    kind = ""

    def __init__(self) -> None:
        self.label: str | None = None
        self.warnings: list[str] = []

    def root(self) -> Any:
        raise NotImplementedError

    def key(self, node: Any) -> Hashable:
        raise NotImplementedError

    def children(self, node: Any) -> dict[str, Any]:
        raise NotImplementedError

    def type_of(self, node: Any) -> str:
        raise NotImplementedError

    def link(self, node: Any) -> str:
        raise PathRefused("this filesystem has no symlinks", reason="bad_link")

    def entry(self, name: str, path: str, node: Any) -> FsEntry:
        raise NotImplementedError

    def open(self, node: Any) -> BinaryIO:
        raise NotImplementedError

    def hidden(self, parent_parts: list[str], name: str) -> bool:
        return False


# ---------------------------------------------------------------------------
# ext2/3/4 and XFS (inode filesystems with POSIX metadata)
# ---------------------------------------------------------------------------

EXT4_FEATURE_INCOMPAT_RECOVER = 0x0004
EXT4_INLINE_DATA_FL = 0x10000000
EXT2_VALID_FS = 0x0001

JOURNAL_WARNING = (
    "{what}: files are read as they are on disk, without replaying the journal; "
    "changes written just before the backup may be missing"
)


def _posix_type(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


class _InodeFilesystem(Filesystem):
    def key(self, node: Any) -> Hashable:
        return node.inum

    def children(self, node: Any) -> dict[str, Any]:
        return {
            child.filename: child for child in node.iterdir() if child.filename not in (".", "..")
        }

    def type_of(self, node: Any) -> str:
        return _posix_type(self._mode(node))

    def link(self, node: Any) -> str:
        return str(node.link)

    def _mode(self, node: Any) -> int:
        raise NotImplementedError

    def _owner(self, node: Any) -> tuple[int, int]:
        raise NotImplementedError

    def entry(self, name: str, path: str, node: Any) -> FsEntry:
        mode = self._mode(node)
        kind = _posix_type(mode)
        uid, gid = self._owner(node)
        return FsEntry(
            name=name,
            path=path,
            type=kind,
            size=int(node.size) if kind in ("file", "symlink") else 0,
            mode=mode & 0o7777,
            uid=uid,
            gid=gid,
            mtime_ns=int(node.mtime_ns),
            target=self.link(node) if kind == "symlink" else None,
        )

    def open(self, node: Any) -> BinaryIO:
        return node.open()  # type: ignore[no-any-return]


class ExtFilesystem(_InodeFilesystem):
    kind = "ext"

    def __init__(self, fh: BinaryIO) -> None:
        super().__init__()
        self.fs = ExtFS(fh)
        sb = self.fs.sb
        self.label = bytes(sb.s_volume_name).split(b"\x00")[0].decode(errors="replace") or None
        if sb.s_feature_incompat & EXT4_FEATURE_INCOMPAT_RECOVER:
            self.warnings.append(JOURNAL_WARNING.format(what="the ext journal needs recovery"))
        elif not sb.s_state & EXT2_VALID_FS:
            self.warnings.append(
                JOURNAL_WARNING.format(what="the ext filesystem was not cleanly unmounted")
            )

    def root(self) -> Any:
        return self.fs.get(2)

    def _mode(self, node: Any) -> int:
        return int(node.inode.i_mode)

    def _owner(self, node: Any) -> tuple[int, int]:
        ino = node.inode
        return int(ino.i_uid) | int(ino.i_uid_high) << 16, int(ino.i_gid) | int(
            ino.i_gid_high
        ) << 16

    # ext4 inline data (EXT4_INLINE_DATA_FL): a small file's or directory's
    # content lives in the inode, the first 60 bytes in i_block and the rest
    # in the "system.data" extended attribute; an inline directory starts
    # with its parent's inode number (4 bytes) and has no "." or "..".
    # dissect reads only i_block, parsed as a regular directory block: files
    # over 60 bytes come back cut short and directories come back empty.

    def _inline(self, node: Any) -> tuple[bytes, bytes] | None:
        if not int(node.inode.i_flags) & EXT4_INLINE_DATA_FL:
            return None
        extra = b""
        for xattr in node.xattr:
            if xattr.name == "system.data":
                extra = bytes(xattr.value)
                break
        return bytes(node.inode.i_block), extra

    def children(self, node: Any) -> dict[str, Any]:
        inline = self._inline(node)
        if inline is None:
            return super().children(node)
        block, extra = inline
        out: dict[str, Any] = {}
        for buf in (block[4:], extra):
            offset = 0
            while offset + 8 <= len(buf):
                inum, rec_len, name_len, _ = struct.unpack_from("<IHBB", buf, offset)
                if rec_len < 8 or offset + rec_len > len(buf) or 8 + name_len > rec_len:
                    raise Corrupt("an inline ext4 directory entry runs past its space")
                if inum:
                    name = buf[offset + 8 : offset + 8 + name_len].decode(errors="surrogateescape")
                    out[name] = self.fs.get_inode(inum, name)
                offset += rec_len
        return out

    def link(self, node: Any) -> str:
        inline = self._inline(node)
        if inline is None:
            return str(node.link)
        return b"".join(inline)[: int(node.size)].decode(errors="surrogateescape")

    def open(self, node: Any) -> BinaryIO:
        inline = self._inline(node)
        if inline is None:
            return super().open(node)
        return io.BytesIO(b"".join(inline)[: int(node.size)])


class XfsFilesystem(_InodeFilesystem):
    kind = "xfs"

    def __init__(self, fh: BinaryIO) -> None:
        super().__init__()
        self.fs = XFS(fh)
        self.label = self.fs.name or None

    def root(self) -> Any:
        return self.fs.root

    def _mode(self, node: Any) -> int:
        return int(node.inode.di_mode)

    def _owner(self, node: Any) -> tuple[int, int]:
        return int(node.inode.di_uid), int(node.inode.di_gid)


# ---------------------------------------------------------------------------
# FAT12/16/32
# ---------------------------------------------------------------------------

FAT_LOWER_BASE = 0x08
FAT_LOWER_EXT = 0x10
FAT_PAGE = 1024 * 1024
FAT_PAGES_CACHED = 16
FAT_CLEAN = {12: None, 16: 0x8000, 32: 0x08000000}  # clean-shutdown bit of FAT entry 1


class RunReader(io.RawIOBase):
    """A file's data from a list of (byte offset, byte length) runs, each read
    in one request to the underlying stream."""

    def __init__(self, fh: BinaryIO, runs: list[tuple[int, int]], size: int) -> None:
        super().__init__()
        self.fh = fh
        self.runs = runs
        self.size = size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self.pos + size)
        out = []
        run_start = 0
        for disk_offset, length in self.runs:
            run_end = run_start + length
            if run_end > self.pos and run_start < end:
                lo = max(self.pos, run_start)
                hi = min(end, run_end)
                self.fh.seek(disk_offset + lo - run_start)
                data = self.fh.read(hi - lo)
                if len(data) != hi - lo:
                    raise Corrupt("a file's clusters lie past the end of the filesystem")
                out.append(data)
            run_start = run_end
            if run_start >= end:
                break
        data = b"".join(out)
        if len(data) < end - self.pos:
            raise Corrupt("the file is larger than its cluster chain")
        self.pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class FatFilesystem(Filesystem):
    kind = "fat"

    def __init__(self, fh: BinaryIO) -> None:
        super().__init__()
        self.fh = fh
        self.fs = FATFS(fh)
        bits = {"FAT12": 12, "FAT16": 16, "FAT32": 32}[self.fs.type.name]
        self.bits = bits
        self.label = self.fs.volume_label or None
        self.data_offset = self.fs.first_data_sector * self.fs.sector_size
        self.cluster_count = self.fs.fat.entry_count
        self._fat_pages: dict[int, bytes] = {}
        clean = FAT_CLEAN[bits]
        if clean is not None and not (self.fs.fat.get(1) or 0) & clean:
            self.warnings.append("the FAT volume was not cleanly unmounted (its dirty bit is set)")

    def root(self) -> Any:
        return self.fs.root

    def key(self, node: Any) -> Hashable:
        return ("root",) if node is self.fs.root else ("cluster", node.cluster)

    def name(self, dirent: Any) -> str:
        if dirent.ldirents:
            return str(dirent.name)
        flags = int(dirent.dirent.DIR_NTRes)
        base, dot, ext = str(dirent.short_name).partition(".")
        if flags & FAT_LOWER_BASE:
            base = base.lower()
        if flags & FAT_LOWER_EXT:
            ext = ext.lower()
        return base + dot + ext

    def children(self, node: Any) -> dict[str, Any]:
        out = {}
        for child in node.iterdir():
            if child.is_volume_id():
                continue
            name = self.name(child)
            if name in (".", ".."):
                continue
            out[name] = child
        return out

    def type_of(self, node: Any) -> str:
        return "dir" if node.is_directory() else "file"

    def entry(self, name: str, path: str, node: Any) -> FsEntry:
        is_dir = node.is_directory()
        mtime = node.mtime  # FAT stores local time without a zone: shown as if UTC
        return FsEntry(
            name=name,
            path=path,
            type="dir" if is_dir else "file",
            size=0 if is_dir else int(node.size),
            mode=None,
            uid=None,
            gid=None,
            mtime_ns=int(mtime.replace(tzinfo=UTC).timestamp() * 1e9)
            if isinstance(mtime, datetime)
            else None,
        )

    def runs(self, first_cluster: int) -> list[tuple[int, int]]:
        """Byte runs of a cluster chain, contiguous clusters merged."""
        size = self.fs.cluster_size
        runs: list[tuple[int, int]] = []
        cluster: int | None = first_cluster
        seen = 0
        while cluster is not None and 2 <= cluster < self.cluster_count:
            seen += 1
            if seen > self.cluster_count:
                raise Corrupt("a FAT cluster chain loops")
            offset = self.data_offset + (cluster - 2) * size
            if runs and runs[-1][0] + runs[-1][1] == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + size)
            else:
                runs.append((offset, size))
            cluster = self._next(cluster)
        return runs

    def _entry(self, cluster: int) -> int:
        """FAT entry ``cluster``, read from the table in 1 MiB pages (dissect's
        ``FAT.get`` makes a seek and a 4-byte read per cluster)."""
        if self.bits == 12:
            return int(self.fs.fat.get(cluster) or 0)
        width = self.bits // 8
        page, pos = divmod(cluster * width, FAT_PAGE)
        data = self._fat_pages.get(page)
        if data is None:
            self.fs.fat.fh.seek(page * FAT_PAGE)
            data = self._fat_pages[page] = self.fs.fat.fh.read(FAT_PAGE)
            if len(self._fat_pages) > FAT_PAGES_CACHED:
                self._fat_pages.pop(next(iter(self._fat_pages)))
        if pos + width > len(data):
            raise Corrupt("a FAT cluster chain points past the end of the table")
        value = int.from_bytes(data[pos : pos + width], "little")
        return value & 0x0FFFFFFF if self.bits == 32 else value

    def _next(self, cluster: int) -> int | None:
        value = self._entry(cluster)
        end = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[self.bits]
        if value >= end:
            return None
        if value < 2:
            raise Corrupt("a FAT cluster chain points at a free cluster")
        return int(value)

    def open(self, node: Any) -> BinaryIO:
        size = int(node.size)
        runs = self.runs(int(node.cluster)) if size else []
        return RunReader(self.fh, runs, size)  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# NTFS
# ---------------------------------------------------------------------------

NTFS_ROOT = 5
NTFS_VOLUME = 3
NTFS_VOLUME_DIRTY = 0x0001
FILE_ATTRIBUTE_SYSTEM = 0x0004
INTERIX_MAGIC = b"IntxLNK\x01"
INTERIX_MAX = len(INTERIX_MAGIC) + 2 * 4096  # a target of up to 4,096 UTF-16 units


class NtfsFilesystem(Filesystem):
    kind = "ntfs"

    def __init__(self, fh: BinaryIO) -> None:
        super().__init__()
        self.fs = NTFS(fh)
        self.label = self.fs.volume_name or None
        self._interix_seen: dict[Any, str | None] = {}
        try:
            info = (
                self.fs.mft.get(NTFS_VOLUME)
                .attributes[ATTRIBUTE_TYPE_CODE.VOLUME_INFORMATION][0]
                .data()
            )
            (flags,) = struct.unpack_from("<H", info, 10)
        except (KeyError, IndexError, struct.error):
            flags = 0
        if flags & NTFS_VOLUME_DIRTY:
            self.warnings.append(
                "the NTFS volume is marked dirty: files are read as they are on disk, "
                "without replaying $LogFile"
            )

    def root(self) -> Any:
        return self.fs.mft.get(NTFS_ROOT)

    def key(self, node: Any) -> Hashable:
        return node.segment

    def children(self, node: Any) -> dict[str, Any]:
        out = {}
        for index_entry in node.iterdir(dereference=False, ignore_dos=True):
            name = index_entry.attribute.file_name
            if name != ".":
                out[name] = index_entry.dereference()
        return out

    def hidden(self, parent_parts: list[str], name: str) -> bool:
        return not parent_parts and name.startswith("$")

    def type_of(self, node: Any) -> str:
        # A junction (mount point reparse point) is a link to a directory,
        # by an absolute Windows path: reported as a symlink (pointing out).
        if node.is_symlink() or node.is_mount_point():
            return "symlink"
        if node.is_dir():
            return "dir"
        if self._interix(node) is not None:
            return "symlink"
        return "file"

    def _interix(self, node: Any) -> str | None:
        """The target of an Interix symlink (how ntfs-3g, i.e. Linux, writes
        symlinks on NTFS: a small system file holding ``IntxLNK\\1`` and the
        target in UTF-16), or None."""
        key = node.segment
        if key in self._interix_seen:
            return self._interix_seen[key]
        target = None
        try:
            attributes = int(
                node.attributes[ATTRIBUTE_TYPE_CODE.STANDARD_INFORMATION].file_attributes
            )
            if attributes & FILE_ATTRIBUTE_SYSTEM and node.has_stream(""):
                size = int(node.size())
                if len(INTERIX_MAGIC) < size <= INTERIX_MAX and size % 2 == 0:
                    data = node.open().read(size)
                    if data.startswith(INTERIX_MAGIC):
                        target = data[len(INTERIX_MAGIC) :].decode("utf-16-le", "replace")
        except (KeyError, IndexError, AttributeError):
            target = None
        if len(self._interix_seen) >= 10_000:
            self._interix_seen.clear()
        self._interix_seen[key] = target
        return target

    def link(self, node: Any) -> str:
        interix = None if node.is_reparse_point() else self._interix(node)
        if interix is not None:
            return interix  # a POSIX path, absolute from this volume's root like ext's
        target = str(node.reparse_point_substitute_name)
        if not node.is_symlink() or target.startswith(("\\", "/")) or ":" in target:
            # An absolute Windows path names a drive we cannot map onto this volume.
            return "/../" + target.replace("\\", "/")
        return target.replace("\\", "/")

    def entry(self, name: str, path: str, node: Any) -> FsEntry:
        kind = self.type_of(node)
        size = 0
        if kind == "file" and node.has_stream(""):
            size = int(node.size())
        try:
            mtime_ns: int | None = int(
                node.attributes[ATTRIBUTE_TYPE_CODE.STANDARD_INFORMATION].last_modification_time_ns
            )
        except (KeyError, IndexError, AttributeError):
            mtime_ns = None
        return FsEntry(
            name=name,
            path=path,
            type=kind,
            size=size,
            mode=None,
            uid=None,
            gid=None,
            mtime_ns=mtime_ns,
            target=self._target(node) if kind == "symlink" else None,
        )

    def _target(self, node: Any) -> str:
        """A link's target as stored (an Interix one as its POSIX path)."""
        interix = None if node.is_reparse_point() else self._interix(node)
        return interix if interix is not None else str(node.reparse_point_substitute_name)

    def open(self, node: Any) -> BinaryIO:
        if not node.has_stream(""):
            return io.BytesIO(b"")
        return node.open()  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------
# The tree: path resolution, directory cache, pages
# ---------------------------------------------------------------------------


class Tree:
    """Paths over one `Filesystem`, with parsed directories cached."""

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self._root = fs.root()
        self._dirs: OrderedDict[Hashable, tuple[dict[str, Any], list[str]]] = OrderedDict()
        self._cached_entries = 0

    def children(self, node: Any) -> tuple[dict[str, Any], list[str]]:
        """A directory's entries by name and its names sorted, parsed once."""
        key = self.fs.key(node)
        hit = self._dirs.get(key)
        if hit is not None:
            self._dirs.move_to_end(key)
            return hit
        entries = {
            name: child for name, child in self.fs.children(node).items() if _usable_name(name)
        }
        hit = (entries, sorted(entries))
        self._dirs[key] = hit
        self._cached_entries += len(entries)
        while self._cached_entries > DIR_CACHE_ENTRIES and len(self._dirs) > 1:
            _, (old, _) = self._dirs.popitem(last=False)
            self._cached_entries -= len(old)
        return hit

    def resolve(self, path: str, *, follow: bool) -> tuple[list[str], Any]:
        """The components and node ``path`` names; symlinks on the way are
        followed inside the filesystem, the last one only if ``follow``."""
        pending = split_path(path)
        done: list[str] = []
        node = self._root
        hops = 0
        while pending:
            name = pending.pop(0)
            if self.fs.type_of(node) != "dir":
                raise NotADirectory("not a directory", path=join_path(done))
            entries, _ = self.children(node)
            child = entries.get(name)
            if child is None:
                raise FsPathNotFound("no such file or directory", path=path)
            if self.fs.type_of(child) == "symlink" and (pending or follow):
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise PathRefused("too many levels of symlinks", path=path, reason="link_loop")
                target = resolve_link(done, self.fs.link(child), path)
                pending = target + pending
                done = []
                node = self._root
                continue
            done.append(name)
            node = child
        return done, node

    def stat(self, path: str, *, follow: bool = False) -> FsEntry:
        parts, node = self.resolve(path, follow=follow)
        return self.fs.entry(parts[-1] if parts else "", join_path(parts), node)

    def list(
        self, path: str, *, offset: int = 0, limit: int = 1000, show_system: bool = False
    ) -> FsListing:
        parts, node = self.resolve(path, follow=True)
        if self.fs.type_of(node) != "dir":
            raise NotADirectory("not a directory", path=join_path(parts))
        entries, names = self.children(node)
        if not show_system:
            names = [n for n in names if not self.fs.hidden(parts, n)]
        base = join_path(parts).rstrip("/")
        page = [self.fs.entry(n, f"{base}/{n}", entries[n]) for n in names[offset : offset + limit]]
        return FsListing(path=join_path(parts), total=len(names), offset=offset, entries=page)

    def open(self, path: str) -> tuple[FsEntry, BinaryIO]:
        parts, node = self.resolve(path, follow=True)
        kind = self.fs.type_of(node)
        if kind != "file":
            raise NotAFile(f"not a regular file but a {kind}", path=join_path(parts), type=kind)
        return self.fs.entry(parts[-1], join_path(parts), node), self.fs.open(node)


def _usable_name(name: str) -> bool:
    """A hostile filesystem can store any bytes as a name; one that could not
    be asked for by path (or that an archive would turn into a path outside
    its folder) is left out of listings: "", ".", "..", "/" or NUL inside."""
    return name not in ("", ".", "..") and "/" not in name and "\x00" not in name


FILESYSTEMS: dict[str, Callable[[BinaryIO], Filesystem]] = {
    "ext": ExtFilesystem,
    "xfs": XfsFilesystem,
    "fat": FatFilesystem,
    "ntfs": NtfsFilesystem,
}
