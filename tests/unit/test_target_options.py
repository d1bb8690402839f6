"""The hub's qemu-nbd target options (issue 11): O_DIRECT where the
repository's file system takes it, qemu's writeback elsewhere; and the
``retry`` a job shows while its copy reconnects."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from sendense.engine import backup
from sendense.engine.backup import BackupEngine, retry_of
from sendense.protocol.node import JobStatusReport
from sendense.qemu.nbd_server import QemuNbdServer
from sendense.settings import HubSettings


def target_io(tmp_path: Path, path: Path, **settings: str) -> dict[str, object]:
    engine = SimpleNamespace(settings=HubSettings(data_dir=tmp_path).model_copy(update=settings))
    io: dict[str, object] = BackupEngine._target_io(engine, str(path))  # type: ignore[arg-type]
    return io


def test_auto_is_o_direct_with_native_aio_on_a_disk_file_system(tmp_path: Path) -> None:
    io = target_io(tmp_path, tmp_path / "x.qcow2")
    assert io == {"cache": "none", "aio": "native"}
    argv = QemuNbdServer("/r/x.qcow2", port=10100, **io).argv()  # type: ignore[arg-type]
    assert "--cache=none" in argv and "--aio=native" in argv


def test_auto_falls_back_to_writeback_where_o_direct_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some file systems refuse O_DIRECT (older tmpfs, some network shares):
    # the probe's answer decides.
    monkeypatch.setattr(backup, "direct_io_ok", lambda directory: False)
    assert target_io(tmp_path, tmp_path / "x.qcow2") == {"cache": "writeback", "aio": None}


def test_settings_choose_the_modes(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    assert target_io(tmp_path, path, nbd_target_cache="writeback") == {
        "cache": "writeback",
        "aio": None,
    }
    assert target_io(tmp_path, path, nbd_target_aio="io_uring") == {
        "cache": "none",
        "aio": "io_uring",
    }


def test_retry_of_a_node_report() -> None:
    now = datetime.now(UTC).isoformat()
    report = JobStatusReport.model_validate(
        {
            "job_id": "j1",
            "status": "running",
            "step": "retrying",
            "retry": {
                "reason": "target connection lost",
                "attempt": 2,
                "since": now,
                "deadline": now,
            },
        }
    )
    retry = retry_of(report)
    assert retry is not None
    assert retry["reason"] == "target connection lost" and retry["attempt"] == 2
    assert retry_of(JobStatusReport(job_id="j1", status="running", step="copying")) is None
