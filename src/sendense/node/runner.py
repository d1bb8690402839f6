"""Starts, watches, cancels and prunes job worker processes on the node.

Each job has a folder ``<data-dir>/jobs/<job_id>/``: ``pid``, ``status.json``
(the worker's `JobStatusReport`), ``job.log``, ``worker.stderr``, and while
the job runs ``tls-<disk key>.psk`` (mode 0600: the NBD target's pre-shared
key, protocol/node.py), written here before the worker gets the job and
removed by the worker at its end, or here once the job is seen ended (a
worker killed with SIGKILL never removes its own). Folders of
ended jobs are removed once nothing changed in them for the retention time
(`prune`).

The registry (`_jobs`) holds the jobs this process started, by id, with their
VM and worker process: one job per VM at a time. Requests run in parallel
threads, so the busy check, the job folder's creation and the job's entry
are one step under `_jobs_lock`; the job's entry then "reserves" the VM
(no process yet) while a worker takes the job, which happens outside the
lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sendense.core.errors import Conflict, Error, NotFound
from sendense.nbd import psk
from sendense.protocol.node import (
    ENDED,
    HUB_ASKED,
    JOB_ID,
    BackupStartAnswer,
    JobError,
    JobStatusReport,
    NbdTlsFile,
    WorkerJob,
)

log = logging.getLogger(__name__)

# The NBD targets' key files in a job's folder (protocol/node.py).
KEY_FILES = "tls-*.psk"

# A job folder being removed: renamed first (a name no job id can have), so
# that a job of the same id never finds half a folder.
PRUNING = ".pruning-"


@dataclass
class _Job:
    vm_name: str
    # None while the job is being handed to a worker (the VM is reserved).
    proc: subprocess.Popen[bytes] | None = None
    cancel_requested: bool = False

    def running(self) -> bool:
        return self.proc is None or self.proc.poll() is None


class JobRunner:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.jobs_dir = data_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._jobs: dict[str, _Job] = {}
        self._jobs_lock = threading.Lock()
        self._spare: subprocess.Popen[bytes] | None = None
        self._spare_lock = threading.Lock()
        # Set at shutdown: a refill that runs after close (a start request's
        # background task) must not leave a new spare behind.
        self._closed = False
        self._prune_lock = threading.Lock()
        self._drop_stale_keys()

    def job_dir(self, job_id: str) -> Path:
        if not JOB_ID.match(job_id):
            raise NotFound(f"job {job_id} not found")
        return self.jobs_dir / job_id

    # -- spare worker ------------------------------------------------------

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
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.poll() is None:
            return spare
        return self._spawn_worker()

    def refill(self) -> None:
        """Start the next spare worker (imports done before a job needs it)."""
        with self._spare_lock:
            if self._closed:
                return
            if self._spare is None or self._spare.poll() is not None:
                self._spare = self._spawn_worker()

    def close(self) -> None:
        with self._spare_lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None and spare.poll() is None:
            assert spare.stdin is not None
            spare.stdin.close()  # end of input: the spare exits
            try:
                spare.wait(timeout=10)
            except subprocess.TimeoutExpired:
                spare.kill()
                spare.wait()

    # -- jobs --------------------------------------------------------------

    def start(self, job: WorkerJob) -> BackupStartAnswer:
        job_id, vm_name = job.job_id, job.vm_name
        job_dir = self.job_dir(job_id)
        with self._jobs_lock:
            self._reap()
            for other, entry in self._jobs.items():
                if entry.vm_name == vm_name and entry.running() and not self._released(other):
                    raise Conflict(
                        f"job {other} of VM {vm_name} is still running (or releasing the VM) "
                        "on this node",
                        job_id=other,
                    )
            try:
                job_dir.mkdir()
            except FileExistsError:
                raise Conflict(f"job {job_id} already exists on this node", job_id=job_id) from None
            self._jobs[job_id] = _Job(vm_name)
        started = datetime.now(UTC)
        try:
            job = self._write_keys(job)
            proc = self._hand_over(job)
        except BaseException:
            with self._jobs_lock:
                del self._jobs[job_id]
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        (job_dir / "pid").write_text(str(proc.pid))
        with self._jobs_lock:
            entry = self._jobs[job_id]
            entry.proc = proc
            cancel = entry.cancel_requested
        if cancel:
            proc.send_signal(signal.SIGTERM)
        log.info("job=%s started pid=%d", job_id, proc.pid)
        return BackupStartAnswer(
            job_id=job_id,
            message=f"backup of {vm_name} started",
            started_at=started,
            pid=proc.pid,
        )

    def _write_keys(self, job: WorkerJob) -> WorkerJob:
        """The targets' keys into files of mode 0600 in the job's folder; the
        job handed to the worker names the files and carries no key."""
        if not job.nbd_tls:
            return job
        files = {}
        for disk, key in job.nbd_tls.items():
            path = psk.write_key_file(job.job_dir / f"tls-{disk}.psk", key.username, key.psk)
            files[disk] = NbdTlsFile(username=key.username, psk_file=path)
        return job.model_copy(update={"nbd_tls": {}, "nbd_tls_files": files})

    def drop_keys(self, job_id: str) -> None:
        """Remove a job's key files (its worker ended; nothing reads them)."""
        for path in (self.jobs_dir / job_id).glob(KEY_FILES):
            path.unlink(missing_ok=True)
            log.info("job=%s removed %s", job_id, path.name)

    def _drop_stale_keys(self) -> None:
        """At start: keys of jobs whose worker is gone (killed with the node,
        or the machine rebooted) are removed."""
        for path in self.jobs_dir.glob(f"*/{KEY_FILES}"):
            job_id = path.parent.name
            if JOB_ID.match(job_id) and not self._worker_alive(path.parent):
                self.drop_keys(job_id)

    def _worker_alive(self, job_dir: Path) -> bool:
        try:
            pid = int((job_dir / "pid").read_text())
        except (OSError, ValueError):
            return False
        return self._alive(job_dir.name, pid)

    def _hand_over(self, job: WorkerJob) -> subprocess.Popen[bytes]:
        proc = self._take_spare()
        assert proc.stdin is not None
        try:
            proc.stdin.write(job.model_dump_json().encode())
            proc.stdin.close()
        except OSError as e:
            proc.kill()
            proc.wait()
            raise Error(f"could not hand the job to a worker process: {e}") from e
        return proc

    def _alive(self, job_id: str, pid: int) -> bool:
        with self._jobs_lock:
            entry = self._jobs.get(job_id)
            if entry is not None:
                return entry.running()
        if not pid:
            return False
        # Started by an earlier node process: is that pid still a worker?
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"sendense.node.worker" in cmdline

    def _read_report(self, job_dir: Path) -> JobStatusReport | None:
        try:
            return JobStatusReport.model_validate_json((job_dir / "status.json").read_bytes())
        except (OSError, ValueError):  # not written yet (ValidationError is a ValueError)
            return None

    def status(self, job_id: str) -> JobStatusReport:
        job_dir = self.job_dir(job_id)
        if not job_dir.is_dir():
            raise NotFound(f"job {job_id} not found on this node", job_id=job_id)
        # The hub still follows this job: a reconnecting worker reads the
        # time of the last ask (worker.hub_silent, SENDENSE_NODE_HUB_SILENCE).
        with contextlib.suppress(OSError):
            (job_dir / HUB_ASKED).touch()
        pid_file = job_dir / "pid"
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            pid = 0
        report = self._read_report(job_dir) or JobStatusReport(
            job_id=job_id, status="running", step="starting", disks={}, pid=pid, error=None
        )
        if pid and not self._alive(job_id, pid):
            self.drop_keys(job_id)  # its worker is gone, however it ended
        if not report.ended and not self._alive(job_id, pid):
            # Re-read: the worker may have finished between the two reads.
            report = self._read_report(job_dir) or report
            if not report.ended and self._cancelled_before_start(job_id):
                report.status = "cancelled"
                report.step = "cancelled"
                report.error = JobError(
                    code="cancelled", message="job cancelled before its worker started"
                )
            elif not report.ended:
                try:
                    stderr = (job_dir / "worker.stderr").read_text(errors="replace")[-500:]
                except OSError:
                    stderr = ""
                report.status = "failed"
                report.error = JobError(
                    code="worker_died",
                    message=f"the job's worker process (pid {pid}) ended without a result"
                    + (f": {stderr.strip()}" if stderr.strip() else ""),
                )
        return report

    def _cancelled_before_start(self, job_id: str) -> bool:
        """A cancelled job whose worker the SIGTERM ended: that happens only
        while a spare worker is still importing (seen in a full test run under
        load), before its first statement blocks the signal; once blocked,
        SIGTERM only sets the job's cancel event. So the job did nothing."""
        with self._jobs_lock:
            entry = self._jobs.get(job_id)
        if entry is None or entry.proc is None or not entry.cancel_requested:
            return False
        return entry.proc.poll() == -signal.SIGTERM

    def cancel(self, job_id: str) -> JobStatusReport:
        report = self.status(job_id)
        if report.ended:
            return report
        with self._jobs_lock:
            entry = self._jobs.get(job_id)
            if entry is not None:
                entry.cancel_requested = True  # `start` signals it once a worker has the job
                proc = entry.proc
        if entry is None:  # started by an earlier node process
            pid = report.pid
            if pid and self._alive(job_id, pid):
                os.kill(pid, signal.SIGTERM)
                log.info("job=%s cancel requested pid=%d", job_id, pid)
        elif proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            log.info("job=%s cancel requested pid=%d", job_id, proc.pid)
        report.step = "cancelling"
        return report

    def _released(self, job_id: str) -> bool:
        """The job's worker wrote its end state: it does so only after the VM
        was released, so its process may still be exiting but the VM is free
        (without this, a start right after the hub saw "completed" was a 409)."""
        try:
            data = json.loads((self.jobs_dir / job_id / "status.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("status") in ENDED

    def _reap(self) -> None:
        """Forget jobs whose worker has ended (caller holds `_jobs_lock`)."""
        for job_id, entry in list(self._jobs.items()):
            if not entry.running():
                del self._jobs[job_id]
                self.drop_keys(job_id)

    # -- retention ---------------------------------------------------------

    def prune(self, retention: float) -> list[str]:
        """Remove the folders of ended jobs in which nothing changed for
        ``retention`` seconds; never a running job's. 0 or less keeps all.

        Returns the ids removed. Another prune under way makes this one a no-op.
        """
        if retention <= 0 or not self._prune_lock.acquire(blocking=False):
            return []
        try:
            return self._prune(time.time() - retention)
        finally:
            self._prune_lock.release()

    def _prune(self, cutoff: float) -> list[str]:
        removed = []
        for path in list(self.jobs_dir.iterdir()):
            if path.name.startswith(PRUNING):  # left by a node that died while pruning
                shutil.rmtree(path, ignore_errors=True)
                continue
            if not JOB_ID.match(path.name) or not path.is_dir():
                continue
            # The status file is replaced at each write, which also changes the
            # folder's mtime: a job that still moves is never "old".
            if _last_change(path) > cutoff:
                continue
            if not self.status(path.name).ended:
                continue  # running (or a worker still releasing the VM)
            trash = self.jobs_dir / f"{PRUNING}{path.name}"
            with self._jobs_lock:
                entry = self._jobs.get(path.name)
                if entry is not None and entry.running():
                    continue
                self._jobs.pop(path.name, None)
                shutil.rmtree(trash, ignore_errors=True)
                try:
                    path.rename(trash)
                except OSError as e:
                    log.warning("job=%s prune failed error=%s", path.name, e)
                    continue
            shutil.rmtree(trash, ignore_errors=True)
            log.info("job=%s pruned unchanged_since_before=%s", path.name, _iso(cutoff))
            removed.append(path.name)
        return removed


def _last_change(job_dir: Path) -> float:
    """The newest mtime of the job folder and the files in it."""
    times = []
    try:
        for path in (job_dir, *job_dir.iterdir()):
            times.append(path.stat().st_mtime)
    except FileNotFoundError:  # removed meanwhile: nothing to prune
        return float("inf")
    return max(times)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
