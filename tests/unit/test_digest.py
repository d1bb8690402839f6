from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest
import xxhash

from sendense.mover.digest import ALGORITHMS, BLOCK_SIZE, BlockHashList, algorithm_of

LEAF = {
    "x3-64k": lambda b: xxhash.xxh3_128(b).digest(),
    "b3-64k": lambda b: blake3.blake3(b).digest(),
}


def reference_digest(data: bytes, algorithm: str) -> str:
    """The documented definition, computed the obvious way."""
    leaves = b"".join(
        LEAF[algorithm](data[i : i + BLOCK_SIZE]) for i in range(0, len(data), BLOCK_SIZE)
    )
    return f"{algorithm}:" + blake3.blake3(leaves).hexdigest()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("size", [BLOCK_SIZE * 5, BLOCK_SIZE * 5 + 512, 512])
def test_hash_list_matches_definition(tmp_path: Path, size: int, algorithm: str) -> None:
    data = bytearray(size)
    data[0 : min(1000, size)] = os.urandom(min(1000, size))
    if size > 3 * BLOCK_SIZE:
        data[2 * BLOCK_SIZE : 3 * BLOCK_SIZE] = os.urandom(BLOCK_SIZE)
    hl = BlockHashList(tmp_path / "a.list", size, algorithm=algorithm)
    hl.set_run(0, hl.hash_blocks(data[:BLOCK_SIZE], min(BLOCK_SIZE, size)))
    if size > 3 * BLOCK_SIZE:
        hl.set_run(2, hl.hash_blocks(data[2 * BLOCK_SIZE : 3 * BLOCK_SIZE], BLOCK_SIZE))
    digest = hl.finish()
    assert digest == reference_digest(bytes(data), algorithm)
    assert algorithm_of(digest) == algorithm
    assert (tmp_path / "a.list").stat().st_size == hl.hash_size * -(-size // BLOCK_SIZE)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_incremental_update_from_base_list(tmp_path: Path, algorithm: str) -> None:
    size = BLOCK_SIZE * 4 + 100
    data = bytearray(os.urandom(size))
    full = BlockHashList(tmp_path / "full.list", size, algorithm=algorithm)
    full.set_run(0, full.hash_blocks(data, size))
    assert full.finish() == reference_digest(bytes(data), algorithm)
    # Change block 1 and zero the tail: patch only those.
    data[BLOCK_SIZE : 2 * BLOCK_SIZE] = os.urandom(BLOCK_SIZE)
    data[4 * BLOCK_SIZE :] = bytes(100)
    inc = BlockHashList(
        tmp_path / "inc.list", size, base=tmp_path / "full.list", algorithm=algorithm
    )
    inc.set_run(1, inc.hash_blocks(data[BLOCK_SIZE : 2 * BLOCK_SIZE], BLOCK_SIZE))
    inc.set_zero(4 * BLOCK_SIZE, 100)
    assert inc.finish() == reference_digest(bytes(data), algorithm)


def test_base_of_another_size_is_refused(tmp_path: Path) -> None:
    BlockHashList(tmp_path / "a.list", BLOCK_SIZE * 2).finish()
    with pytest.raises(ValueError, match="does not match"):
        BlockHashList(tmp_path / "b.list", BLOCK_SIZE * 3, base=tmp_path / "a.list")
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_algorithm() -> None:
    with pytest.raises(ValueError, match="unknown digest algorithm"):
        algorithm_of("md5-64k:abc")


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    hl = BlockHashList(tmp_path / "a.list", BLOCK_SIZE)
    hl.abort()
    assert list(tmp_path.iterdir()) == []
