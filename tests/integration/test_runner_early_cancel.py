"""A job cancelled while its worker process is still starting.

The node hands a job to a worker that may still be importing (the spare is
started ahead of time, but under load it can be slow); SIGTERM then ends
the process before it could block the signal. The job did nothing, and the
user asked for a cancel: it must read "cancelled", not "failed" (a full test
run once saw "failed" here, with worker_died).
"""

from __future__ import annotations

import time
from pathlib import Path

from sendense.node.runner import JobRunner
from sendense.protocol.node import BackupStartRequest, WorkerJob


def _job(tmp_path: Path, runner: JobRunner) -> WorkerJob:
    request = BackupStartRequest.model_validate(
        {
            "job_id": "early1",
            "vm_name": "web1",
            "source": {
                "type": "qemu",
                "config": {"vms": [{"name": "web1", "qmp_socket": str(tmp_path / "none.qmp")}]},
            },
            "nbd_targets": "2000:nbd://127.0.0.1:9/t0",
            "backup_type": "full",
        }
    )
    return WorkerJob.from_request(
        request,
        job_dir=runner.job_dir("early1"),
        in_flight=4,
        request_size=1 << 20,
        max_rate=0,
        digest="x3-64k",
        parallel_disks=1,
    )


def test_cancel_while_the_worker_starts_reads_cancelled(tmp_path: Path) -> None:
    runner = JobRunner(tmp_path / "node")
    try:
        # No spare yet: start spawns a worker and hands it the job at once,
        # and the cancel lands while that interpreter is still starting.
        answer = runner.start(_job(tmp_path, runner))
        runner.cancel("early1")
        deadline = time.monotonic() + 30
        report = runner.status("early1")
        while not report.ended and time.monotonic() < deadline:
            time.sleep(0.05)
            report = runner.status("early1")
        assert report.status == "cancelled", report
        assert report.error is not None and report.error.code == "cancelled", report
        assert answer.pid == report.pid or report.pid == 0
    finally:
        runner.close()
