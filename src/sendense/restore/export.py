"""Instant access: a restore point served over NBD so that a hypervisor can
attach or boot it without a restore first.

``POST /api/v1/backups/{backup_id}/export`` starts an ``export`` job. The job
starts ``qemu-nbd`` on a port of the hub's NBD range and serves until
``DELETE`` (a cancel, from any hub process), then stops it; the job ends
``completed``. Read-only (``writable: false``) serves the restore point's
QCOW2 through its chain with ``--read-only``. Writable serves a throw-away
QCOW2 overlay whose backing file is the restore point: writes land in the
overlay, QEMU opens the backing chain read-only, and the overlay is deleted
when the export ends. The backup never changes either way.

The job holds every restore point of the chain (delete and consolidation
answer 409 ``in_use``) for as long as the export lives. If the hub dies,
its ``qemu-nbd`` is stopped and the overlay removed by the next start (or
by another hub process on the catalog); the job ends ``failed`` /
``hub_restarted``.

The export listens on ``SENDENSE_NBD_BIND`` like backup targets. Beyond
loopback (any bind address but 127.0.0.0/8, ::1, localhost) it requires TLS
with a pre-shared key made for this export alone (sendense/nbd/psk.py): the
key is in ``run/exports/<job id>.tls/keys.psk`` (0600) while the export
lives, is given to the user once, in the answer to the ``POST`` that
started it (``tls_username``, ``tls_psk``; the CLI prints it), and is never
stored in the catalog nor shown again; the URL is then ``nbds://``. A
hypervisor attaches it with the key in a psktool file (docs/security.md).
On loopback an export is plain NBD: only processes of the hub's machine
reach it, and whoever runs there can read the repository's files anyway.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from sendense import keystore
from sendense.catalog.models import BackupJob
from sendense.core.errors import Error
from sendense.engine.lifecycle import JobContext
from sendense.nbd import psk
from sendense.qemu import img
from sendense.qemu.nbd_server import QemuNbdServer, stop_pid
from sendense.restore.sessions import ended_leftovers

if TYPE_CHECKING:
    from sendense.hub.state import HubState
    from sendense.settings import HubSettings

log = logging.getLogger(__name__)

KIND = "export"
READY_TIMEOUT = 20.0


def needs_tls(settings: HubSettings) -> bool:
    """Exports served beyond loopback require TLS (module docstring)."""
    return settings.nbd_tls and not psk.is_loopback(settings.nbd_bind)


class ExportJob:
    """The ``export`` job kind (a `LocalJob`)."""

    kind = KIND

    def __init__(self, st: HubState) -> None:
        self.st = st
        self.dir = st.settings.data_dir.resolve() / "run" / "exports"
        self.dir.mkdir(parents=True, exist_ok=True)
        # job id -> set once qemu-nbd serves (or the job failed to start it)
        self._ready: dict[str, threading.Event] = {}
        # job id -> the export's TLS key until the POST that started it takes
        # it (`take_key`); only ever in this process's memory and in its file.
        self._keys: dict[str, str] = {}
        self._lock = threading.Lock()
        for job_id in ended_leftovers(st.db, self.dir):
            self.recover(job_id, {})  # left by a killed process of this hub

    def ready_event(self, job_id: str) -> threading.Event:
        with self._lock:
            return self._ready.setdefault(job_id, threading.Event())

    def files(self, job_id: str) -> tuple[Path, Path]:
        """The job's pidfile and (writable) overlay."""
        return self.dir / f"{job_id}.pid", self.dir / f"{job_id}.overlay.qcow2"

    def tls_dir(self, job_id: str) -> Path:
        """The folder of the export's TLS key (qemu-nbd's tls-creds-psk ``dir``)."""
        return self.dir / f"{job_id}.tls"

    def take_key(self, job_id: str) -> str | None:
        """The export's TLS key, once: the answer to the POST that started it."""
        with self._lock:
            return self._keys.pop(job_id, None)

    def execute(self, job_id: str, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        pidfile, overlay = self.files(job_id)
        port: int | None = None
        ready = self.ready_event(job_id)
        try:
            port = self.st.ports.allocate()
            image = params["source"]
            # Encrypted repository: the chain is decrypted by qemu-nbd and the
            # overlay is encrypted with the same key (keystore.py, qemu/img.py).
            key = keystore.key_of_backup_now(self.st.db, self.st.settings, params.get("backup_id"))
            if params["writable"]:
                size = img.info(image)["virtual-size"] if key else None
                img.create(str(overlay), size, backing=image, backing_fmt="qcow2", key=key)
                image = str(overlay)
            tls_dir = None
            if params.get("tls"):
                key_hex = psk.new_key()
                tls_dir = str(psk.make_server_dir(self.tls_dir(job_id), key_hex))
                with self._lock:
                    self._keys[job_id] = key_hex
            server = QemuNbdServer(
                image,
                export_name=params["export_name"],
                host=self.st.settings.nbd_bind,
                port=port,
                read_only=not params["writable"],
                pidfile=str(pidfile),
                key=key,
                tls_psk_dir=tls_dir,
            )
            server.start()
            try:
                scheme = "nbds" if tls_dir else "nbd"
                url = f"{scheme}://{self.st.settings.advertise_host}:{port}/{params['export_name']}"
                with self.st.db.session() as s:
                    s.execute(
                        update(BackupJob)
                        .where(BackupJob.id == job_id, BackupJob.status == "running")
                        .values(step="serving", result={"url": url, "since": _now()})
                    )
                ready.set()
                # Serve until a cancel (DELETE) from any hub process, or the
                # hub stops (then recovery at the next start cleans up).
                while not ctx.cancelled():
                    if self.st.lifecycle.stopping(1.0):
                        break
                    if server.proc is not None and server.proc.poll() is not None:
                        raise Error(f"qemu-nbd of the export exited with {server.proc.returncode}")
            finally:
                server.stop()
            return {"url": url, "closed_at": _now()}
        finally:
            ready.set()
            overlay.unlink(missing_ok=True)
            psk.remove_dir(self.tls_dir(job_id))
            self.st.ports.release(port)
            with self._lock:
                self._ready.pop(job_id, None)
                self._keys.pop(job_id, None)

    def recover(self, job_id: str, params: dict[str, Any]) -> None:
        """An export whose hub died: stop its qemu-nbd, drop the overlay."""
        pidfile, overlay = self.files(job_id)
        with contextlib.suppress(ValueError, OSError):
            stop_pid(int(pidfile.read_text().strip()))
        pidfile.unlink(missing_ok=True)
        overlay.unlink(missing_ok=True)
        psk.remove_dir(self.tls_dir(job_id))

    def on_end(self, job_id: str, params: dict[str, Any], status: str) -> None:
        log.info("job=%s export of %s ended %s", job_id, params.get("backup_id"), status)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
