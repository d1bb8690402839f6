"""Paths inside a restore point and the worker's records (pure: no worker, no parser)."""

from __future__ import annotations

import json

import pytest

from sendense.core.errors import FilesystemCorrupt, PathRefused
from sendense.restore.fs.models import FsEntry, FsPartition, WorkerProtocolError
from sendense.restore.fs.paths import (
    escape,
    has_raw_bytes,
    resolve_link,
    shown,
    split_path,
    unescape,
)


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


# ---------------------------------------------------------------- names as bytes


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        (b"caf\xe9.txt", "caf%E9.txt"),
        (b"/dir\xff/in\xfe.bin", "/dir%FF/in%FE.bin"),
        (b"100%\xff", "100%25%FF"),
        ("h\u00e9llo \u540d\u524d".encode(), "h\u00e9llo \u540d\u524d"),
        (b"\xc3", "%C3"),  # a cut UTF-8 sequence
        (b"%41", "%2541"),
    ],
)
def test_escape_round_trip(raw: bytes, escaped: str) -> None:
    name = raw.decode("utf-8", "surrogateescape")  # as the worker decodes names
    assert escape(name) == escaped
    assert unescape(escaped) == name
    assert unescape(escaped).encode("utf-8", "surrogateescape") == raw
    escape(name).encode("utf-8")  # always writable as UTF-8


def test_shown_escapes_only_what_must_be() -> None:
    assert shown("100%.txt") == "100%.txt" and not has_raw_bytes("100%.txt")
    assert shown("caf\udce9%") == "caf%E9%25" and has_raw_bytes("caf\udce9")
    assert escape("a\ud800b") == "a\ufffdb"  # a lone surrogate that is not a byte
    # escaped UTF-8 gives the character back
    assert unescape("%C3%A9") == "\u00e9"


@pytest.mark.parametrize("bad", ["%", "%4", "/a%zz", "x%4g", "a\ud800"])
def test_unescape_refuses_bad_escapes(bad: str) -> None:
    with pytest.raises(PathRefused) as e:
        unescape(bad)
    assert e.value.details["reason"] == "bad_escape"


def test_a_session_shows_guest_labels_it_cannot_write_as_utf8_escaped() -> None:
    """Partition labels, types and warnings are guest data too: a session's
    answer must always be writable as UTF-8 (JSON)."""
    from types import SimpleNamespace

    from sendense.hub.restore.service import mount_view

    job = SimpleNamespace(
        id="m1",
        params={"backup_id": "b1", "disk_id": 0},
        result={
            "partitions": [
                {
                    "index": 1,
                    "filesystem": "ntfs",
                    "label": "vol\udce9\ud800",
                    "size": 1,
                    "offset": 0,
                    "table": "lvm",
                    "type": "vg\udcff/lv",
                    "warnings": ["dirty \udcfe"],
                }
            ]
        },
        status="running",
        step="open",
        progress={},
        started_at=None,
        created_at=None,
        vm_name="vm",
        error_message=None,
        created_by="admin",
    )
    (part,) = mount_view(job)["partitions"]  # type: ignore[arg-type]
    assert part["label"] == "vol%E9\ufffd" and part["type"] == "vg%FF/lv"
    assert part["warnings"] == ["dirty %FE"]
    json.dumps(part, ensure_ascii=False).encode("utf-8")
