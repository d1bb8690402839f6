"""The disk digest: what a restore point must read back as.

Definition (``b3-64k``), for a disk of ``size`` bytes::

    block_i = bytes [i * 65536, min((i + 1) * 65536, size))   for i in 0 .. n-1,
              n = ceil(size / 65536); the last block may be short
    H_i     = BLAKE3(block_i)                                  32 bytes
    digest  = "b3-64k:" + hex(BLAKE3(H_0 || H_1 || ... || H_{n-1}))

Why this shape: an incremental backup reads only changed blocks, yet must
record the digest of the whole disk. Keeping the block hash list of the
previous restore point (a file of n * 32 bytes, 0.05% of the disk) lets the
mover patch in the hashes of the blocks it copied and recompute the digest
without reading unchanged data. Zero blocks hash to a constant, so holes cost
nothing. Anyone can recompute the digest from a restore point with stock
tools (``verify`` does), without the list.

The list lives in a file, never whole in memory, so memory stays flat
whatever the disk size.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import blake3

BLOCK_SIZE = 64 * 1024
HASH_SIZE = 32
ALGORITHM = "b3-64k"
_ZERO_BLOCK_HASH = blake3.blake3(bytes(BLOCK_SIZE)).digest()


def block_hash(data: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def zero_hash(length: int) -> bytes:
    if length == BLOCK_SIZE:
        return _ZERO_BLOCK_HASH
    return blake3.blake3(bytes(length)).digest()


def block_count(size: int) -> int:
    return -(-size // BLOCK_SIZE)


class BlockHashList:
    """The hash list of one disk, as a file of ``n * 32`` bytes.

    Start from the previous restore point's list (incremental) or from an
    all-zero disk (full), then `set` the hashes of the blocks that were copied.
    """

    def __init__(self, path: str | Path, size: int, *, base: str | Path | None = None) -> None:
        self.path = Path(path)
        self.size = size
        self.count = block_count(size)
        tmp = self.path.with_suffix(".tmp")
        if base is not None:
            shutil.copyfile(base, tmp)
            if os.path.getsize(tmp) != self.count * HASH_SIZE:
                tmp.unlink()
                raise ValueError(f"block hash list {base} does not match a disk of {size} bytes")
        else:
            self._fill_zero(tmp)
        self._fd = os.open(tmp, os.O_RDWR)
        self._tmp = tmp

    def _fill_zero(self, tmp: Path) -> None:
        chunk = _ZERO_BLOCK_HASH * 32768  # 1 MiB of hashes
        full_blocks = self.size // BLOCK_SIZE
        with open(tmp, "wb") as f:
            remaining = full_blocks * HASH_SIZE
            while remaining > 0:
                piece = chunk[: min(len(chunk), remaining)]
                f.write(piece)
                remaining -= len(piece)
            if self.size % BLOCK_SIZE:
                f.write(zero_hash(self.size % BLOCK_SIZE))

    def set_run(self, first_block: int, hashes: bytes) -> None:
        os.pwrite(self._fd, hashes, first_block * HASH_SIZE)

    def set_zero(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset+length)`` (block aligned, or ending at the
        disk's end) as zero."""
        first = offset // BLOCK_SIZE
        last = block_count(offset + length)
        full_end = min(last, self.size // BLOCK_SIZE)
        i = first
        step = 32768
        while i < full_end:
            run = min(step, full_end - i)
            os.pwrite(self._fd, _ZERO_BLOCK_HASH * run, i * HASH_SIZE)
            i += run
        if last > full_end:
            os.pwrite(self._fd, zero_hash(self.size % BLOCK_SIZE), full_end * HASH_SIZE)

    def finish(self) -> str:
        """Make the list durable at `path` and return the disk digest."""
        h = blake3.blake3()
        os.lseek(self._fd, 0, os.SEEK_SET)
        while True:
            chunk = os.read(self._fd, 4 << 20)
            if not chunk:
                break
            h.update(chunk)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.replace(self._tmp, self.path)
        return f"{ALGORITHM}:{h.hexdigest()}"

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tmp.unlink(missing_ok=True)


def hash_blocks(buf: bytes | bytearray | memoryview, length: int) -> bytes:
    """Concatenated block hashes of ``buf[:length]`` (block aligned start)."""
    mv = memoryview(buf)
    return b"".join(
        blake3.blake3(mv[i : min(i + BLOCK_SIZE, length)]).digest()
        for i in range(0, length, BLOCK_SIZE)
    )
