"""Starts, watches and cancels job worker processes on the node."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sendense.core.errors import Conflict, NotFound

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class JobRunner:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.jobs_dir = data_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def job_dir(self, job_id: str) -> Path:
        if not JOB_ID.match(job_id):
            raise NotFound(f"job {job_id} not found")
        return self.jobs_dir / job_id

    def start(self, request: dict[str, Any]) -> dict[str, Any]:
        job_id = request["job_id"]
        if not JOB_ID.match(job_id):
            raise Conflict("job_id may only hold letters, digits, '.', '_' and '-'")
        job_dir = self.jobs_dir / job_id
        if job_dir.exists():
            raise Conflict(f"job {job_id} already exists on this node", job_id=job_id)
        job_dir.mkdir(parents=True)
        started = datetime.now(UTC).isoformat()
        proc = subprocess.Popen(
            [sys.executable, "-m", "sendense.node.worker", str(job_dir), str(self.data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=open(job_dir / "worker.stderr", "wb"),  # noqa: SIM115
            # Its own session: the job finishes its cleanup even if the agent dies.
            start_new_session=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(request).encode())
        proc.stdin.close()
        self.procs[job_id] = proc
        (job_dir / "pid").write_text(str(proc.pid))
        log.info("job=%s started pid=%d", job_id, proc.pid)
        return {
            "job_id": job_id,
            "status": "started",
            "message": f"backup of {request['vm_name']} started",
            "started_at": started,
            "pid": proc.pid,
        }

    def _alive(self, job_id: str, pid: int) -> bool:
        proc = self.procs.get(job_id)
        if proc is not None:
            return proc.poll() is None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"sendense.node.worker" in cmdline

    def status(self, job_id: str) -> dict[str, Any]:
        job_dir = self.job_dir(job_id)
        if not job_dir.exists():
            raise NotFound(f"job {job_id} not found on this node", job_id=job_id)
        path = job_dir / "status.json"
        pid = int((job_dir / "pid").read_text()) if (job_dir / "pid").exists() else 0
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {
                "job_id": job_id,
                "status": "running",
                "step": "starting",
                "disks": {},
                "pid": pid,
                "error": None,
            }
        if data["status"] in ("running", "pending") and not self._alive(job_id, pid):
            # Re-read: the worker may have finished between the two reads.
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                pass
            if data["status"] in ("running", "pending"):
                stderr = (job_dir / "worker.stderr").read_text(errors="replace")[-500:]
                data["status"] = "failed"
                data["error"] = {
                    "code": "worker_died",
                    "message": f"the job's worker process (pid {pid}) ended without a result"
                    + (f": {stderr.strip()}" if stderr.strip() else ""),
                }
        return data

    def cancel(self, job_id: str) -> dict[str, Any]:
        data = self.status(job_id)
        if data["status"] not in ("running", "pending"):
            return data
        pid = int(data.get("pid") or 0)
        if pid and self._alive(job_id, pid):
            os.kill(pid, signal.SIGTERM)
            log.info("job=%s cancel requested pid=%d", job_id, pid)
        data["step"] = "cancelling"
        return data

    def reap(self) -> None:
        for job_id, proc in list(self.procs.items()):
            if proc.poll() is not None:
                del self.procs[job_id]
