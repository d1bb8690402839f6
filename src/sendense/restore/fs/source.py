"""The disk a worker parses, as a read-only file-like object.

A source is a path to a raw image file, or an NBD URL of a read-only export
(``nbd+unix:///?socket=PATH``: a restore session serves the restore point's
chain with ``qemu-nbd -r`` on a unix socket and the worker reads it through
libnbd; QEMU reads every QCOW2 feature the backup wrote, which the pure-Python
QCOW2 reader in dissect.hypervisor does not).

The parsers read in small pieces (a 1 KiB inode, a 4 KiB directory block,
often the same metadata block again), so reads go through a cache of
aligned blocks with read-ahead: a miss reads `BLOCK` bytes around it. Reads
of at least `BLOCK` bytes (file data) go straight to the backend in
pieces of at most `MAX_REQUEST` (libnbd and qemu-nbd limit one request to
32 MiB) and do not evict the metadata from the cache.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from typing import Protocol

BLOCK = 256 * 1024
CACHE_BLOCKS = 128  # 32 MiB of metadata and small reads
MAX_REQUEST = 32 * 1024 * 1024


class Backend(Protocol):
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class SourceError(OSError):
    """The disk cannot be read (the NBD server went away, an I/O error): not
    the filesystem's fault, and answered as such."""


class FileBackend:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size

    def pread(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as e:
            raise SourceError(f"read of {length} bytes at {offset} failed: {e}") from e

    def close(self) -> None:
        os.close(self.fd)


class NbdBackend:
    def __init__(self, url: str) -> None:
        import nbd  # Debian's python3-libnbd; only workers reading NBD need it

        self._errors = (nbd.Error,)
        self.handle = nbd.NBD()
        try:
            self.handle.connect_uri(url)
            self.size = self.handle.get_size()
        except nbd.Error as e:
            raise SourceError(f"cannot connect to {url}: {e}") from e

    def pread(self, offset: int, length: int) -> bytes:
        try:
            return bytes(self.handle.pread(length, offset))
        except self._errors as e:
            raise SourceError(f"NBD read of {length} bytes at {offset} failed: {e}") from e

    def close(self) -> None:
        try:
            self.handle.shutdown()
        except self._errors:
            pass  # the server is gone already; nothing to flush on a read-only export


def open_backend(source: str) -> Backend:
    if source.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")):
        return NbdBackend(source)
    return FileBackend(source)


class BlockReader(io.RawIOBase):
    """Seekable, read-only view of a backend with a block cache."""

    def __init__(
        self, backend: Backend, *, block: int = BLOCK, cache_blocks: int = CACHE_BLOCKS
    ) -> None:
        super().__init__()
        self.backend = backend
        self.size = backend.size
        self.block = block
        self.cache_blocks = cache_blocks
        self.cache: OrderedDict[int, bytes] = OrderedDict()
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self.pos = offset
        elif whence == io.SEEK_CUR:
            self.pos += offset
        elif whence == io.SEEK_END:
            self.pos = self.size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if self.pos < 0:
            raise ValueError("negative seek position")
        return self.pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.pread(self.pos, len(buffer))
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self.size - self.pos)
        data = self.pread(self.pos, size)
        self.pos += len(data)
        return data

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the disk)."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        if length >= self.block:
            return self._direct(offset, length)
        first = offset // self.block
        last = (offset + length - 1) // self.block
        parts = [self._block(i) for i in range(first, last + 1)]
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        start = offset - first * self.block
        return data[start : start + length]

    def _direct(self, offset: int, length: int) -> bytes:
        pieces = []
        end = offset + length
        while offset < end:
            chunk = min(MAX_REQUEST, end - offset)
            pieces.append(self.backend.pread(offset, chunk))
            offset += chunk
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _block(self, index: int) -> bytes:
        data = self.cache.get(index)
        if data is not None:
            self.cache.move_to_end(index)
            return data
        offset = index * self.block
        data = self.backend.pread(offset, min(self.block, self.size - offset))
        self.cache[index] = data
        if len(self.cache) > self.cache_blocks:
            self.cache.popitem(last=False)
        return data

    def close(self) -> None:
        if not self.closed:
            self.backend.close()
        super().close()


class OffsetView(io.RawIOBase):
    """A partition: ``size`` bytes of a `BlockReader` from ``offset`` on."""

    def __init__(self, reader: BlockReader, offset: int, size: int) -> None:
        super().__init__()
        self.reader = reader
        self.offset = offset
        self.size = max(0, min(size, reader.size - offset))
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self.pos = base + offset
        return self.pos

    def pread(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        return self.reader.pread(self.offset + offset, length) if length else b""

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self.size - self.pos)
        data = self.pread(self.pos, size)
        self.pos += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class MappedView(OffsetView):
    """A logical volume: ``size`` bytes assembled from extents of the disk.

    ``extents`` are ``(volume offset, length, disk offset)``; bytes no extent
    covers read as zeros.
    """

    def __init__(self, reader: BlockReader, extents: list[tuple[int, int, int]], size: int) -> None:
        super().__init__(reader, 0, reader.size)
        self.extents = sorted(extents)
        self.size = size

    def pread(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        out = []
        pos = offset
        end = offset + length
        for start, extent_length, disk_offset in self.extents:
            if start + extent_length <= pos:
                continue
            if start >= end:
                break
            if start > pos:
                out.append(bytes(start - pos))
                pos = start
            take = min(end, start + extent_length) - pos
            out.append(self.reader.pread(disk_offset + pos - start, take))
            pos += take
        if pos < end:
            out.append(bytes(end - pos))
        return b"".join(out)
