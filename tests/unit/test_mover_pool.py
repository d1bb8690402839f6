"""The mover's read buffers (issue 11): pooled by size class, bounded."""

from __future__ import annotations

from sendense.mover.copy import _BufferPool

KiB, MiB = 1 << 10, 1 << 20


def test_a_small_read_takes_a_small_buffer() -> None:
    pool = _BufferPool(4 * MiB, keep=32 * MiB)
    assert pool.classes == [64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, MiB, 2 * MiB, 4 * MiB]
    assert len(pool.get(64 * KiB)) == 64 * KiB
    assert len(pool.get(192 * KiB)) == 256 * KiB
    assert len(pool.get(4 * MiB)) == 4 * MiB


def test_buffers_are_reused_and_the_pool_keeps_at_most_its_bound() -> None:
    pool = _BufferPool(3 * MiB, keep=4 * MiB)  # a request size that is no power of two
    assert pool.classes[-1] == 3 * MiB
    a = pool.get(3 * MiB)
    b = pool.get(3 * MiB)
    pool.put(a)
    pool.put(b)  # over the bound: dropped
    assert pool.kept == 3 * MiB
    assert pool.get(2 * MiB + 1) is a
    assert pool.kept == 0
    pool.put(bytearray(12345))  # not one of its sizes: never kept
    assert pool.kept == 0
