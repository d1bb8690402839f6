"""Starts, watches and cancels job worker processes on the node."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sendense.core.errors import Conflict, Error, InvalidRequest, NotFound

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class JobRunner:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.jobs_dir = data_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.vms: dict[str, str] = {}
        self._spare: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def job_dir(self, job_id: str) -> Path:
        if not JOB_ID.match(job_id):
            raise NotFound(f"job {job_id} not found")
        return self.jobs_dir / job_id

    def _spawn_worker(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "sendense.node.worker", "--serve", str(self.data_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a job finishes its cleanup even if the agent dies.
            start_new_session=True,
        )

    def _take_spare(self) -> subprocess.Popen[bytes]:
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.poll() is None:
            return spare
        return self._spawn_worker()

    def refill(self) -> None:
        """Start the next spare worker (imports done before a job needs it)."""
        with self._lock:
            if self._spare is None or self._spare.poll() is not None:
                self._spare = self._spawn_worker()

    def close(self) -> None:
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.poll() is None:
            assert spare.stdin is not None
            spare.stdin.close()  # end of input: the spare exits
            spare.wait(timeout=10)

    def start(self, request: dict[str, Any]) -> dict[str, Any]:
        job_id = request["job_id"]
        if not JOB_ID.match(job_id):
            raise InvalidRequest("job_id may only hold letters, digits, '.', '_' and '-'")
        vm_name = request["vm_name"]
        for other, proc in self.procs.items():
            if proc.poll() is None and self.vms.get(other) == vm_name:
                raise Conflict(
                    f"job {other} of VM {vm_name} is still running (or releasing the VM) "
                    "on this node",
                    job_id=other,
                )
        job_dir = self.jobs_dir / job_id
        if job_dir.exists():
            raise Conflict(f"job {job_id} already exists on this node", job_id=job_id)
        job_dir.mkdir(parents=True)
        started = datetime.now(UTC).isoformat()
        proc = self._take_spare()
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps({"job_dir": str(job_dir), "request": request}).encode())
            proc.stdin.close()
        except OSError as e:
            raise Error(f"could not hand the job to a worker process: {e}") from e
        self.procs[job_id] = proc
        self.vms[job_id] = vm_name
        (job_dir / "pid").write_text(str(proc.pid))
        log.info("job=%s started pid=%d", job_id, proc.pid)
        return {
            "job_id": job_id,
            "status": "started",
            "message": f"backup of {vm_name} started",
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
                self.vms.pop(job_id, None)
