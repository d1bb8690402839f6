"""File-level restore sessions ("mounts": nothing is mounted).

``POST /api/v1/restore/mounts {"backup_id"}`` starts a ``mount`` job. The job
serves the restore point's chain read-only with ``qemu-nbd`` on a unix
socket in the hub's private run directory (``<data dir>/run/mounts``, mode
0700: never a TCP port, so no other local user can read backup data), reads
its partitions once through a filesystem worker (restore/fs/), records them
on the job, and keeps serving until the session is closed (``DELETE``), idle
longer than ``SENDENSE_RESTORE_IDLE_TIMEOUT`` (default 1 hour), or its hub
stops. The job holds every restore point of the chain: delete and
consolidation answer 409 ``in_use`` while the session lives.

Any hub process on the host can answer for the session: each keeps its own
small pool of filesystem workers per session (`SessionPools`), connected to
the same socket (``qemu-nbd --shared``), opened at its first request and
closed when the session ends (a sweep checks the catalog every few seconds).
Every request records the session's last access (at most every 10 s per
process, and while a download or an archive streams, so a transfer longer
than the idle timeout keeps its session). A session left by a dead hub is
cleaned up by the next start:
``qemu-nbd`` stopped, socket removed, job ``failed`` / ``hub_restarted``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from sendense import keystore
from sendense.catalog.models import BackupJob
from sendense.core.errors import Error
from sendense.engine.lifecycle import ACTIVE, JobContext
from sendense.qemu.nbd_server import QemuNbdServer, stop_pid
from sendense.restore.fs.client import FsPool, FsWorker, WorkerLimits, source_for_nbd_socket

if TYPE_CHECKING:
    from sendense.catalog.db import Database
    from sendense.hub.state import HubState

log = logging.getLogger(__name__)

KIND = "mount"
READY_TIMEOUT = 60.0
TOUCH_EVERY = 10.0  # seconds between two last-access writes of one process
SWEEP_EVERY = 2.0
MAX_SOCKET_PATH = 100  # bytes; the kernel's limit is 107


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def worker_limits() -> WorkerLimits:
    """The limits of session filesystem workers: ``SENDENSE_RESTORE_WORKER_MEMORY``
    (bytes of address space, default 1 GiB) and ``SENDENSE_RESTORE_REQUEST_TIMEOUT``
    (seconds per request, default 60). Read from the environment here (not
    HubSettings, whose file others were changing); a value that does not
    parse keeps the default, with a warning."""
    default = WorkerLimits()
    memory, timeout = default.memory, default.request_timeout
    raw = os.environ.get("SENDENSE_RESTORE_WORKER_MEMORY")
    if raw:
        try:
            memory = max(256 * 1024 * 1024, int(raw))
        except ValueError:
            log.warning("SENDENSE_RESTORE_WORKER_MEMORY=%r is not a number of bytes", raw)
    raw = os.environ.get("SENDENSE_RESTORE_REQUEST_TIMEOUT")
    if raw:
        try:
            timeout = max(1.0, float(raw))
        except ValueError:
            log.warning("SENDENSE_RESTORE_REQUEST_TIMEOUT=%r is not a number of seconds", raw)
    return WorkerLimits(memory=memory, request_timeout=timeout)


class SessionPools:
    """This process's filesystem workers, per session."""

    def __init__(self, db: Database, size: int = 2, limits: WorkerLimits | None = None) -> None:
        self.db = db
        self.size = size
        self.limits = limits or worker_limits()
        self._pools: dict[str, FsPool] = {}
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="fs-pools", daemon=True)
        self._sweeper.start()

    def pool(self, mount_id: str, url: str) -> FsPool:
        with self._lock:
            pool = self._pools.get(mount_id)
            if pool is None:
                pool = self._pools[mount_id] = FsPool(url, size=self.size, limits=self.limits)
            return pool

    def touch(self, mount_id: str, every: float = TOUCH_EVERY) -> None:
        """Record an access (in the catalog, at most every ``every`` s)."""
        now = time.monotonic()
        with self._lock:
            if now - self._touched.get(mount_id, -1e9) < every:
                return
            self._touched[mount_id] = now
        with self.db.session() as s:
            s.execute(
                update(BackupJob)
                .where(BackupJob.id == mount_id, BackupJob.status.in_(ACTIVE))
                .values(progress={"last_access": now_iso()})
            )

    def close(self, mount_id: str) -> None:
        with self._lock:
            pool = self._pools.pop(mount_id, None)
            self._touched.pop(mount_id, None)
        if pool is not None:
            pool.close()

    def sweep(self) -> None:
        """Close the pools of sessions that ended (in any process)."""
        with self._lock:
            ids = list(self._pools)
        if not ids:
            return
        with self.db.session() as s:
            live = set(
                s.scalars(
                    select(BackupJob.id).where(BackupJob.id.in_(ids), BackupJob.status.in_(ACTIVE))
                ).all()
            )
        for mount_id in ids:
            if mount_id not in live:
                self.close(mount_id)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(SWEEP_EVERY):
            try:
                self.sweep()
            except Exception:
                log.exception("closing the pools of ended sessions failed")

    def shutdown(self) -> None:
        self._stop.set()
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()


def touch_every(idle_timeout: float) -> float:
    """How often a process records a session's access: every TOUCH_EVERY s,
    more often when the idle timeout is short (a quarter of it)."""
    return max(0.0, min(TOUCH_EVERY, idle_timeout / 4))


def last_access(job: BackupJob | Any) -> datetime | None:
    value = (job.progress or {}).get("last_access")
    if value:
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return job.started_at or job.created_at


def ended_leftovers(db: Database, folder: Path) -> list[str]:
    """Jobs whose pid file is in this hub's ``folder`` but which are no longer
    active: a previous process of this hub was killed before it could stop
    their qemu-nbd, and another hub sharing the catalog took the job over
    and ended it meanwhile (its recovery cannot reach our files). Active jobs
    are left alone: they may be another API worker's of this hub, or wait for
    `JobLifecycle.recover_local`."""
    ids = [p.stem for p in folder.glob("*.pid")]
    if not ids:
        return []
    with db.session() as s:
        active = set(
            s.scalars(
                select(BackupJob.id).where(BackupJob.id.in_(ids), BackupJob.status.in_(ACTIVE))
            ).all()
        )
    return [job_id for job_id in ids if job_id not in active]


class MountJob:
    """The ``mount`` job kind (a `LocalJob`): one restore session."""

    kind = KIND

    def __init__(self, st: HubState) -> None:
        self.st = st
        self.dir = st.settings.data_dir.resolve() / "run" / "mounts"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        self._ready: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._short_dir: Path | None = None
        for job_id in ended_leftovers(st.db, self.dir):
            self.recover(job_id, {})

    def ready_event(self, job_id: str) -> threading.Event:
        with self._lock:
            return self._ready.setdefault(job_id, threading.Event())

    def files(self, job_id: str) -> tuple[Path, Path]:
        """The session's qemu-nbd socket and pidfile.

        A unix socket's path has at most 107 bytes: the socket is named by
        the first 16 hex digits of the id, and goes to a private directory
        under the temporary directory (mode 0700) when even that is too long
        for the data directory's path."""
        short = job_id.replace("-", "")[:16]
        sock = self.dir / f"{short}.sock"
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            if self._short_dir is None:
                self._short_dir = Path(tempfile.mkdtemp(prefix="sendense-mounts-"))
            sock = self._short_dir / f"{short}.sock"
        return sock, self.dir / f"{job_id}.pid"

    def execute(self, job_id: str, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        sock, pidfile = self.files(job_id)
        ready = self.ready_event(job_id)
        idle = timedelta(seconds=self.st.settings.restore_idle_timeout)
        reason = "closed"
        try:
            # Encrypted repository: qemu-nbd decrypts the chain (qemu/img.py).
            key = keystore.key_of_backup_now(self.st.db, self.st.settings, params.get("backup_id"))
            server = QemuNbdServer(
                params["source"],
                export_name="",
                socket_path=str(sock),
                read_only=True,
                shared=16,
                pidfile=str(pidfile),
                key=key,
            )
            server.start()
            try:
                url = source_for_nbd_socket(sock)
                probe = FsWorker(url, limits=self.st.restore_pools.limits)
                try:
                    partitions = [p.to_wire() for p in probe.partitions()]
                finally:
                    probe.close()
                with self.st.db.session() as s:
                    s.execute(
                        update(BackupJob)
                        .where(BackupJob.id == job_id, BackupJob.status == "running")
                        .values(
                            step="open",
                            result={"url": url, "partitions": partitions},
                            progress={"last_access": now_iso()},
                        )
                    )
                ready.set()
                while True:
                    if ctx.cancelled():
                        break
                    if self.st.lifecycle.stopping(2.0):
                        reason = "hub stopped"
                        break
                    if server.proc is not None and server.proc.poll() is not None:
                        raise Error(f"qemu-nbd of the session exited with {server.proc.returncode}")
                    with self.st.db.session() as s:
                        job = s.get(BackupJob, job_id)
                        seen = last_access(job) if job is not None else None
                    if seen is not None and datetime.now(UTC) - seen > idle:
                        reason = "idle"
                        break
            finally:
                self.st.restore_pools.close(job_id)
                server.stop()
            return {"partitions": partitions, "closed": reason, "closed_at": now_iso()}
        finally:
            ready.set()
            sock.unlink(missing_ok=True)
            with self._lock:
                self._ready.pop(job_id, None)

    def recover(self, job_id: str, params: dict[str, Any]) -> None:
        sock, pidfile = self.files(job_id)
        with contextlib.suppress(ValueError, OSError):
            stop_pid(int(pidfile.read_text().strip()))
        pidfile.unlink(missing_ok=True)
        sock.unlink(missing_ok=True)

    def on_end(self, job_id: str, params: dict[str, Any], status: str) -> None:
        log.info("job=%s restore session of %s ended %s", job_id, params.get("backup_id"), status)
