"""The worker's status file while a disk reconnects (issue 11)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from sendense.mover.copy import Retrying
from sendense.node.worker import StatusFile, _RetryReporter
from sendense.protocol.node import DiskStatus, JobStatusReport


def status_with_disk(tmp_path: Path) -> StatusFile:
    status = StatusFile(tmp_path, "job-1")
    status.report.disks["2000"] = DiskStatus(disk_key=2000, mode="full", status="running")
    status.write(step="copying disk 2000")
    return status


def read(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "status.json").read_text())


def test_retry_shows_then_clears_with_a_message(tmp_path: Path) -> None:
    status = status_with_disk(tmp_path)
    report = _RetryReporter(status, 2000, "job-1")
    now = time.time()
    for attempt in (1, 2, 3):
        report(Retrying("target", "target connection lost: EOF", attempt, now, now + 300))
    doc = read(tmp_path)
    assert doc["step"] == "retrying"
    assert doc["retry"]["attempt"] == 3
    assert doc["retry"]["reason"] == "target connection lost: EOF"
    assert doc["disks"]["2000"]["retry"] == doc["retry"]
    assert doc["disks"]["2000"]["status"] == "running"
    # The hub reads it with the same model.
    parsed = JobStatusReport.model_validate(doc)
    assert parsed.retry is not None and abs(parsed.retry.deadline.timestamp() - now - 300) < 1
    report(None)
    doc = read(tmp_path)
    assert doc["step"] == "copying disk 2000"
    assert doc["retry"] is None and doc["disks"]["2000"]["retry"] is None
    assert doc["messages"] == ["disk 2000: reconnected to the hub's target after 3 attempts"]


def test_giving_up_clears_without_a_message(tmp_path: Path) -> None:
    status = status_with_disk(tmp_path)
    report = _RetryReporter(status, 2000, "job-1")
    now = time.time()
    report(Retrying("source", "source connection lost: EOF", 1, now, now + 1))
    report(Retrying("source", "source connection lost: EOF", 2, now, now + 1, gave_up=True))
    doc = read(tmp_path)
    assert doc["retry"] is None and doc["disks"]["2000"]["retry"] is None
    assert doc["messages"] == []


def test_a_silent_hub_stops_the_reconnecting(tmp_path: Path) -> None:
    """The node touches hub-asked at each status request of the hub; a
    reconnecting copy stops once the hub has been silent for hub_silence."""
    from sendense.node.runner import JobRunner
    from sendense.node.worker import hub_silent
    from sendense.protocol.node import HUB_ASKED, WorkerJob

    runner = JobRunner(tmp_path)
    job_dir = runner.job_dir("job-1")
    job_dir.mkdir(parents=True)
    job = WorkerJob.model_construct(job_dir=job_dir, hub_silence=3.0)
    assert hub_silent(job) is None  # never asked yet: the deadline alone counts
    runner.status("job-1")  # what GET /api/v1/jobs/{id}/status does on the node
    asked = (job_dir / HUB_ASKED).stat().st_mtime
    assert hub_silent(job, now=asked + 2) is None
    why = hub_silent(job, now=asked + 10)
    assert why is not None and "SENDENSE_NODE_HUB_SILENCE=3" in why and "10 s" in why
    off = WorkerJob.model_construct(job_dir=job_dir, hub_silence=0.0)
    assert hub_silent(off, now=asked + 1000) is None
    runner.close()
