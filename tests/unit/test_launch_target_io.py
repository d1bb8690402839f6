"""qemu-nbd AIO mode of backup targets (engine/backup.py `_target_io`):
native for a full, io_uring for an incremental where qemu can use it here,
native when it cannot (probed with the real qemu-io)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sendense.engine import backup
from sendense.engine.backup import BackupEngine, io_uring_ok
from sendense.settings import HubSettings


def engine_for(tmp_path: Path, **settings: str) -> BackupEngine:
    e = BackupEngine.__new__(BackupEngine)  # only settings and run_dir are read
    e.settings = HubSettings(data_dir=tmp_path, **settings)  # type: ignore[arg-type]
    e.run_dir = tmp_path / "run"
    e.run_dir.mkdir(exist_ok=True)
    return e


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup, "_io_uring", {})


def qemu_io_says(tmp_path: Path) -> bool:
    f = tmp_path / "direct.raw"
    f.write_bytes(bytes(4096))
    r = subprocess.run(
        ["qemu-io", "-f", "raw", "--aio=io_uring", "-c", "read 0 4096", str(f)],
        capture_output=True,
        text=True,
    )
    return r.returncode == 0


def test_incrementals_use_io_uring_when_qemu_can(tmp_path: Path) -> None:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed")
    e = engine_for(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    target = str(repo / "x.qcow2")
    full = e._target_io(target, "full")
    incr = e._target_io(target, "incremental")
    if full["cache"] == "writeback":  # this filesystem refuses O_DIRECT
        assert full["aio"] is None and incr["aio"] is None
        return
    assert full == {"cache": "none", "aio": "native"}
    expected = "io_uring" if qemu_io_says(tmp_path) else "native"
    assert incr == {"cache": "none", "aio": expected}
    assert io_uring_ok(e.run_dir) is (expected == "io_uring")
    assert not list(e.run_dir.iterdir()), "the probe left its scratch file"


def test_without_qemu_io_incrementals_use_native(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    e = engine_for(tmp_path)
    assert io_uring_ok(e.run_dir) is False
    repo = tmp_path / "repo"
    repo.mkdir()
    incr = e._target_io(str(repo / "x.qcow2"), "incremental")
    assert incr["aio"] in ("native", None)


def test_a_given_aio_setting_wins(tmp_path: Path) -> None:
    e = engine_for(tmp_path, nbd_target_cache="none", nbd_target_aio="threads")
    assert e._target_io(str(tmp_path / "x.qcow2"), "incremental") == {
        "cache": "none",
        "aio": "threads",
    }
