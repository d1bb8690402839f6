from __future__ import annotations

from sendense.core.extents import Extent, align_out, intersect, merge, split
from sendense.mover.copy import _blockify

K64 = 65536


def test_merge_joins_touching_extents_of_the_same_kind() -> None:
    got = list(merge([Extent(0, 10), Extent(10, 5), Extent(15, 5, True), Extent(20, 5, True)]))
    assert got == [Extent(0, 15), Extent(15, 10, True)]


def test_merge_with_gap_joins_close_data_only() -> None:
    got = list(
        merge([Extent(0, 10), Extent(14, 6), Extent(30, 2, True), Extent(40, 2, True)], gap=5)
    )
    assert got == [Extent(0, 20), Extent(30, 2, True), Extent(40, 2, True)]


def test_align_out_clips_to_disk_size() -> None:
    assert align_out(Extent(100, 10), K64, 10 * K64) == Extent(0, K64)
    assert align_out(Extent(K64 + 1, K64), K64, 3 * K64) == Extent(K64, 2 * K64)
    assert align_out(Extent(2 * K64 + 5, 10), K64, 2 * K64 + 100) == Extent(2 * K64, 100)


def test_split_respects_max_length() -> None:
    assert list(split(Extent(0, 10), 4)) == [Extent(0, 4), Extent(4, 4), Extent(8, 2)]


def test_intersect_tags_dirty_ranges_with_allocation() -> None:
    dirty = [Extent(0, 100), Extent(200, 100)]
    alloc = [Extent(0, 50), Extent(50, 200, True), Extent(250, 100)]
    assert list(intersect(dirty, alloc)) == [
        Extent(0, 50),
        Extent(50, 50, True),
        Extent(200, 50, True),
        Extent(250, 50),
    ]


def test_blockify_never_leaves_a_partial_zero_block() -> None:
    # A zero run that starts and ends inside blocks: the partial blocks are read.
    size = 4 * K64
    got = list(
        _blockify(
            [Extent(0, 100), Extent(100, 3 * K64, True), Extent(3 * K64 + 100, K64 - 100)], size
        )
    )
    assert got == [Extent(0, K64), Extent(K64, 2 * K64, True), Extent(3 * K64, K64)]
    for e in got:
        assert e.offset % K64 == 0
        assert e.end % K64 == 0 or e.end == size


def test_blockify_keeps_a_zero_tail_shorter_than_a_block() -> None:
    size = 2 * K64 + 512
    got = list(_blockify([Extent(0, K64), Extent(K64, K64 + 512, True)], size))
    assert got == [Extent(0, K64), Extent(K64, K64 + 512, True)]
