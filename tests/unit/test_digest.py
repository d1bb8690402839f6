from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest

from sendense.mover.digest import BLOCK_SIZE, BlockHashList, hash_blocks


def reference_digest(data: bytes) -> str:
    """The documented definition, computed the obvious way."""
    hashes = b"".join(
        blake3.blake3(data[i : i + BLOCK_SIZE]).digest() for i in range(0, len(data), BLOCK_SIZE)
    )
    return "b3-64k:" + blake3.blake3(hashes).hexdigest()


@pytest.mark.parametrize("size", [BLOCK_SIZE * 5, BLOCK_SIZE * 5 + 512, 512])
def test_hash_list_matches_definition(tmp_path: Path, size: int) -> None:
    data = bytearray(size)
    data[0 : min(1000, size)] = os.urandom(min(1000, size))
    if size > 3 * BLOCK_SIZE:
        data[2 * BLOCK_SIZE : 3 * BLOCK_SIZE] = os.urandom(BLOCK_SIZE)
    hl = BlockHashList(tmp_path / "a.b3", size)
    hl.set_run(0, hash_blocks(data[:BLOCK_SIZE], min(BLOCK_SIZE, size)))
    if size > 3 * BLOCK_SIZE:
        hl.set_run(2, hash_blocks(data[2 * BLOCK_SIZE : 3 * BLOCK_SIZE], BLOCK_SIZE))
    assert hl.finish() == reference_digest(bytes(data))
    assert (tmp_path / "a.b3").stat().st_size == 32 * -(-size // BLOCK_SIZE)


def test_incremental_update_from_base_list(tmp_path: Path) -> None:
    size = BLOCK_SIZE * 4 + 100
    data = bytearray(os.urandom(size))
    full = BlockHashList(tmp_path / "full.b3", size)
    full.set_run(0, hash_blocks(data, size))
    assert full.finish() == reference_digest(bytes(data))
    # Change block 1 and zero the tail: patch only those.
    data[BLOCK_SIZE : 2 * BLOCK_SIZE] = os.urandom(BLOCK_SIZE)
    data[4 * BLOCK_SIZE :] = bytes(100)
    inc = BlockHashList(tmp_path / "inc.b3", size, base=tmp_path / "full.b3")
    inc.set_run(1, hash_blocks(data[BLOCK_SIZE : 2 * BLOCK_SIZE], BLOCK_SIZE))
    inc.set_zero(4 * BLOCK_SIZE, 100)
    assert inc.finish() == reference_digest(bytes(data))


def test_base_of_another_size_is_refused(tmp_path: Path) -> None:
    BlockHashList(tmp_path / "a.b3", BLOCK_SIZE * 2).finish()
    with pytest.raises(ValueError, match="does not match"):
        BlockHashList(tmp_path / "b.b3", BLOCK_SIZE * 3, base=tmp_path / "a.b3")
    assert not list(tmp_path.glob("*.tmp"))


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    hl = BlockHashList(tmp_path / "a.b3", BLOCK_SIZE)
    hl.abort()
    assert list(tmp_path.iterdir()) == []
