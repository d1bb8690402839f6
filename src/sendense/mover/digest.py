"""The disk digest: what a restore point must read back as.

Definition, for a disk of ``size`` bytes and an algorithm ``A``::

    block_i = bytes [i * 65536, min((i + 1) * 65536, size))   for i in 0 .. n-1,
              n = ceil(size / 65536); the last block may be short
    H_i     = LEAF_A(block_i)
    digest  = A + ":" + hex(BLAKE3(H_0 || H_1 || ... || H_{n-1}))

    A         LEAF_A                        |H_i|
    x3-64k    XXH3-128 (seed 0), big-endian  16 bytes   (the default)
    b3-64k    BLAKE3                         32 bytes

The algorithm is part of the digest string, so a reader always knows how to
recompute it. ``x3-64k`` is the default because the digest is computed by the
node while it copies, on the data path: XXH3-128 costs about a third of
BLAKE3's CPU, which on a 2-core machine was the difference between 0.86 and
0.9+ of the NBD copy ceiling (docs/performance.md). It detects any accidental
change (corruption, a lost write, a wrong block) with a 2^-128 collision
chance; it is not meant to resist a forger, which is what immutable
repositories and access control are for. ``b3-64k`` is there for those who
want a cryptographic digest (``SENDENSE_NODE_DIGEST=b3-64k``).

Why a list of block hashes: an incremental backup reads only changed blocks,
yet must record the digest of the whole disk. The node keeps the block hash
list of the previous restore point (a file of n * |H| bytes, 0.025% of the
disk for x3-64k), patches in the hashes of the blocks it copied and
recomputes the digest without reading unchanged data. Zero blocks hash to a
constant, so holes cost nothing. The list lives in a file, never whole in
memory, so memory stays flat whatever the disk size.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import blake3
import xxhash

BLOCK_SIZE = 64 * 1024
DEFAULT_ALGORITHM = "x3-64k"

Buffer = bytes | bytearray | memoryview

_LEAVES: dict[str, tuple[Callable[[Buffer], bytes], int]] = {
    "x3-64k": (xxhash.xxh3_128_digest, 16),
    "b3-64k": (lambda data: blake3.blake3(data).digest(), 32),
}
ALGORITHMS = tuple(_LEAVES)


def algorithm_of(digest: str) -> str:
    algorithm = digest.split(":", 1)[0]
    if algorithm not in _LEAVES:
        raise ValueError(f"unknown digest algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")
    return algorithm


def block_count(size: int) -> int:
    return -(-size // BLOCK_SIZE)


class BlockHashList:
    """The hash list of one disk, as a file of ``n * |H|`` bytes.

    Start from the previous restore point's list (incremental) or from an
    all-zero disk (full), then `set_run` the hashes of the blocks copied.
    """

    def __init__(
        self,
        path: str | Path,
        size: int,
        *,
        base: str | Path | None = None,
        algorithm: str = DEFAULT_ALGORITHM,
    ) -> None:
        if algorithm not in _LEAVES:
            raise ValueError(f"unknown digest algorithm {algorithm!r}")
        self.algorithm = algorithm
        self.leaf, self.hash_size = _LEAVES[algorithm]
        self.zero_block_hash = self.leaf(bytes(BLOCK_SIZE))
        self.path = Path(path)
        self.size = size
        self.count = block_count(size)
        tmp = self.path.with_suffix(".tmp")
        if base is not None:
            shutil.copyfile(base, tmp)
            if os.path.getsize(tmp) != self.count * self.hash_size:
                tmp.unlink()
                raise ValueError(f"block hash list {base} does not match a disk of {size} bytes")
        else:
            self._fill_zero(tmp)
        self._fd = os.open(tmp, os.O_RDWR)
        self._tmp = tmp

    def _zero_hash(self, length: int) -> bytes:
        return self.zero_block_hash if length == BLOCK_SIZE else self.leaf(bytes(length))

    def _fill_zero(self, tmp: Path) -> None:
        chunk = self.zero_block_hash * 32768
        full_blocks = self.size // BLOCK_SIZE
        with open(tmp, "wb") as f:
            remaining = full_blocks * self.hash_size
            while remaining > 0:
                piece = chunk[: min(len(chunk), remaining)]
                f.write(piece)
                remaining -= len(piece)
            if self.size % BLOCK_SIZE:
                f.write(self._zero_hash(self.size % BLOCK_SIZE))

    def hash_blocks(self, buf: Buffer, length: int) -> bytes:
        """Concatenated leaf hashes of ``buf[:length]`` (starting on a block)."""
        mv = memoryview(buf)
        leaf = self.leaf
        return b"".join(
            leaf(mv[i : min(i + BLOCK_SIZE, length)]) for i in range(0, length, BLOCK_SIZE)
        )

    def set_run(self, first_block: int, hashes: bytes) -> None:
        os.pwrite(self._fd, hashes, first_block * self.hash_size)

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
            os.pwrite(self._fd, self.zero_block_hash * run, i * self.hash_size)
            i += run
        if last > full_end:
            os.pwrite(self._fd, self._zero_hash(self.size % BLOCK_SIZE), full_end * self.hash_size)

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
        return f"{self.algorithm}:{h.hexdigest()}"

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._tmp.unlink(missing_ok=True)
