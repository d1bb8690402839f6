"""Paths inside a restore point and the worker's records (pure: no worker, no parser)."""

from __future__ import annotations

import pytest

from sendense.core.errors import FilesystemCorrupt, PathRefused
from sendense.restore.fs.models import FsEntry, FsPartition, WorkerProtocolError
from sendense.restore.fs.paths import resolve_link, split_path


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("/", []),
        ("", []),
        ("/etc/fstab", ["etc", "fstab"]),
        ("etc//./fstab/", ["etc", "fstab"]),
        ("/a b/ü/名前", ["a b", "ü", "名前"]),
        ("/...", ["..."]),
        ("/..a/b..", ["..a", "b.."]),
    ],
)
def test_split_path(path: str, parts: list[str]) -> None:
    assert split_path(path) == parts


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/..", "dotdot"),
        ("/a/../b", "dotdot"),
        ("..", "dotdot"),
        ("/a\x00b", "nul"),
        ("/" + "x" * 5000, "too_long"),
        ("/" + "x" * 1025, "too_long"),
    ],
)
def test_split_path_refuses(path: str, reason: str) -> None:
    with pytest.raises(PathRefused) as refused:
        split_path(path)
    assert refused.value.details["reason"] == reason
    assert refused.value.code == "path_refused"
    assert "\x00" not in str(refused.value.details["path"])


@pytest.mark.parametrize(
    ("parent", "target", "parts"),
    [
        (["links"], "../hello.txt", ["hello.txt"]),
        (["a", "b"], "c/./d", ["a", "b", "c", "d"]),
        (["a", "b"], "/x/y", ["x", "y"]),  # absolute: from this filesystem's root
        (["a"], "../../", None),
        ([], "..", None),
        (["a"], "/../etc/passwd", None),
    ],
)
def test_resolve_link(parent: list[str], target: str, parts: list[str] | None) -> None:
    if parts is None:
        with pytest.raises(PathRefused) as refused:
            resolve_link(parent, target, "/request")
        assert refused.value.details == {"path": "/request", "reason": "link_escapes"}
    else:
        assert resolve_link(parent, target, "/request") == parts


def test_records_from_the_worker_are_checked() -> None:
    entry = FsEntry("a", "/a", "file", 3, 0o644, 0, 0, 1_700_000_000 * 10**9)
    assert FsEntry.from_wire(entry.to_wire()) == entry
    assert entry.mtime is not None and entry.mtime.year == 2023
    part = FsPartition(1, 1 << 20, 1 << 30, "gpt", "linux", "ext", "root", ["w"])
    assert FsPartition.from_wire(part.to_wire()) == part
    for bad in (
        {**entry.to_wire(), "size": "3"},
        {**entry.to_wire(), "size": True},
        {**entry.to_wire(), "name": None},
        [1, 2],
        "x",
    ):
        with pytest.raises(WorkerProtocolError) as wrong:
            FsEntry.from_wire(bad)
        assert isinstance(wrong.value, FilesystemCorrupt)
    with pytest.raises(WorkerProtocolError):
        FsPartition.from_wire({**part.to_wire(), "warnings": [1]})
