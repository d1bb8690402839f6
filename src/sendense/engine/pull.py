"""Pull mode on the hub (issue 11): read the node's frozen disks, write the QCOW2 here.

A node with ``SENDENSE_NODE_TRANSFER=pull`` says so in its health answer
(``transfer``); for a job of such a node whose disks are all fulls,
`BackupEngine._launch` hands over to `launch` here instead of serving NBD
targets for the node to write into. Incrementals stay push: their dirty
extents are few and scattered, and the push mover already copies only them
(issue 11: "for incrementals only if a hub-side path measures faster").

Flow of one pulled job::

    launch    per disk: the restore point's QCOW2 made as for push
              (qemu/img.py `create`: cluster size, LUKS for an encrypted
              repository), a TLS pre-shared key (run/tls-<backup id>/keys.psk,
              the folder push uses for its target's key, so that finishing and
              recovery remove it the same way); node POST /backup/start with
              ``transfer=pull``, the keys in ``nbd_tls`` and each target URL
              naming only the export the node is to serve
    follow    a thread like the push monitor: polls the node's status; when a
              disk reports its ``pull_url``, runs ``qemu-img convert`` from it
              into the QCOW2 (one per disk, at the same time); its ``-p``
              percentage is the job's progress; when every convert succeeded,
              tells the node (POST /jobs/{id}/pulled): the node then releases
              the VM and reports completed with each disk's change id and
              digest (computed on the node: node/pull.py says why)
    finish    `BackupEngine._finish`, the one path push uses too (qemu-img
              check, sizes, sidecar, catalog rows; or the files removed)

The convert: ``-n --target-is-zero`` (the target is the fresh QCOW2 made
above: qemu-img then skips zero runs without writing them), ``-W`` (writes
out of order: the source is a network export, the target one file),
``-m`` coroutines (``SENDENSE_PULL_COROUTINES``) and ``-t`` the target's
cache mode (``SENDENSE_PULL_CACHE``, default ``none``: O_DIRECT, flushed at
the end; qemu-img's own default for convert, ``unsafe``, never flushes and a
restore point must be durable). The source is qemu's NBD client with
``tls-creds-psk`` (endpoint=client) reading the same key folder.

Failures: a convert that fails, a cancel, the job's timeout or a node
unreachable past ``node_timeout`` kill the converts (the hub never removes a
file a qemu-img still writes), cancel the node's job and finish the job
failed/cancelled (files removed). ``qemu-img`` dies with the hub
(``setpriv --pdeathsig KILL``): the node sees the connection close, gets no
"pulled" and fails its job (VM released, previous change id kept); the
restarted hub's `BackupEngine.recover` finds a job without live targets and
fails it, removing the partial file and the key folder.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from sendense import keystore
from sendense.catalog.stores import JobStore
from sendense.core.errors import Cancelled, Error
from sendense.engine.node_client import NodeClient, NodeUnreachable
from sendense.nbd import psk
from sendense.protocol.node import (
    BackupStartRequest,
    JobError,
    JobStatusReport,
    NbdTlsKey,
    NodeHealth,
    SourceSpec,
)
from sendense.qemu import img

if TYPE_CHECKING:
    from sendense.engine.backup import BackupEngine

log = logging.getLogger(__name__)

TERMINAL = frozenset({"completed", "failed", "cancelled"})


def wanted(engine: BackupEngine, job_id: str) -> bool:
    """Pull this job? Its node serves pulls and every disk is a full."""
    from sendense.engine.backup import node_client

    with engine.db.session() as s:
        job = JobStore(s).get(job_id)
        assert job is not None and job.vm is not None
        if not job.backups or any(b.backup_type != "full" for b in job.backups):
            return False
        client = node_client(job.vm.source.node, engine.secrets)
    try:
        health = NodeHealth.model_validate(client.health())
    except (Error, ValidationError):
        return False  # an older node, or none: push (its start then says why)
    return health.transfer == "pull"


@dataclass
class _Disk:
    backup_id: str
    disk_key: int
    path: str
    capacity: int
    tls_dir: str | None
    # Set by the convert's thread.
    percent: float = 0.0
    started: float = 0.0
    thread: threading.Thread | None = None
    error: BaseException | None = None
    done: bool = False


def launch(engine: BackupEngine, job_id: str) -> None:
    """Restore points made, keys made, the node told to serve; then `_PullJob`."""
    from sendense.engine.backup import node_client, source_spec

    with engine.db.session() as s:
        job = JobStore(s).get(job_id)
        assert job is not None and job.vm is not None
        vm = job.vm
        source = vm.source
        key = keystore.key_of_repository(s, engine.settings, job.repository_id)
        disks: list[_Disk] = []
        targets: list[str] = []
        keys: dict[str, NbdTlsKey] = {}
        for b in job.backups:
            path = Path(b.file_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            img.create(str(path), b.total_bytes, cluster_size=engine.settings.cluster_size, key=key)
            export = f"sendense-{b.id}"
            b.nbd_export_name = export
            tls_dir = None
            if engine.settings.nbd_tls:
                tls_key = psk.new_key()
                tls_dir = str(psk.make_server_dir(engine._tls_dir(b.id), tls_key))
                keys[str(b.disk_key)] = NbdTlsKey(username=psk.USERNAME, psk=tls_key)
            scheme = "nbds" if tls_dir else "nbd"
            # Only the export name counts: the node serves it on its own address.
            targets.append(f"{b.disk_key}:{scheme}://pull/{export}")
            disks.append(_Disk(b.id, b.disk_key, str(path), b.total_bytes, tls_dir))
        request = BackupStartRequest(
            job_id=job.id,
            vm_name=vm.name,
            source=SourceSpec.model_validate(source_spec(source, engine.secrets)),
            vm_path=vm.path,
            nbd_targets=",".join(targets),
            nbd_tls=keys,
            backup_type="full",
            transfer="pull",
        )
        job.step = "starting on node"
        client = node_client(source.node, engine.secrets)
    client.start_backup(request.model_dump(mode="json"))
    if engine.lifecycle.transition(job_id, "running", allowed_from=("pending",)):
        with engine.db.session() as s:
            job = JobStore(s).get(job_id)
            assert job is not None
            job.step = "freezing"
            for b in job.backups:
                b.status = "running"
                b.started_at = job.started_at
    # Cancelled while starting: the thread sees the request and stops the node.
    _PullJob(engine, job_id, client, disks, key).start()


class _PullJob:
    """Follows a pulled job to its end: node status, converts, progress, finish."""

    def __init__(
        self,
        engine: BackupEngine,
        job_id: str,
        client: NodeClient,
        disks: list[_Disk],
        key: img.ImageKey | None,
    ) -> None:
        self.engine = engine
        self.job_id = job_id
        self.client = client
        self.disks = {d.disk_key: d for d in disks}
        self.key = key
        self.cancel = threading.Event()  # set by BackupEngine.cancel
        self.kill = threading.Event()  # stops the converts
        self.wake = threading.Event()  # a convert ended: act now, not at the next poll

    def start(self) -> None:
        self.engine._cancel[self.job_id] = self.cancel
        t = threading.Thread(target=self.run, name=f"pull-{self.job_id[:8]}", daemon=True)
        self.engine._threads[self.job_id] = t
        t.start()

    # ------------------------------------------------------------ converts

    def _convert_args(self, d: _Disk, url: str) -> list[str]:
        from urllib.parse import urlparse

        u = urlparse(url)
        export = u.path.lstrip("/")
        if u.scheme not in ("nbd", "nbds") or not u.hostname or not u.port or not export:
            raise Error(f"the node reported an export the hub cannot read: {url!r}")
        src = (
            f"driver=nbd,server.type=inet,server.host={u.hostname},server.port={u.port},"
            f"export={export}"
        )
        objects: list[str] = []
        if d.tls_dir:
            objects += [
                "--object",
                f"tls-creds-psk,id=pulltls,endpoint=client,dir={d.tls_dir.replace(',', ',,')},"
                # AES-GCM, not ChaCha20 (nbd/psk.py): the node's nbdkit
                # takes what the client offers first.
                f"username={psk.USERNAME},priority={psk.PRIORITY}",
            ]
            src += ",tls-creds=pulltls"
        dst = f"driver=qcow2,file.filename={d.path.replace(',', ',,')}"
        if self.key is not None:
            dst += f",encrypt.key-secret={img.SECRET_ID}"
        s = self.engine.settings
        return [
            "convert",
            "-p",
            "-n",
            "--target-is-zero",
            "-W",
            "-m",
            str(s.pull_coroutines),
            "-t",
            s.pull_cache,
            *objects,
            "--image-opts",
            src,
            "--target-image-opts",
            dst,
        ]

    def _convert(self, d: _Disk, url: str) -> None:
        def progress(pct: float) -> None:
            d.percent = pct

        try:
            with img.keyed(self.key) as secret:
                args = self._convert_args(d, url)
                # The secret object goes with the other objects (before the images).
                at = args.index("--image-opts")
                args[at:at] = secret
                img.run_with_progress(args, progress, die_with_parent=True, cancel=self.kill)
            d.percent = 100.0
            d.done = True
            log.info(
                "job=%s disk=%s pulled seconds=%.3f",
                self.job_id,
                d.disk_key,
                time.monotonic() - d.started,
            )
        except BaseException as e:
            d.error = e
            log.warning("job=%s disk=%s pull failed: %s", self.job_id, d.disk_key, e)
        finally:
            self.wake.set()

    def _start_converts(self, st: JobStatusReport) -> None:
        for key, disk in st.disks.items():
            d = self.disks.get(int(key))
            url = (disk.model_extra or {}).get("pull_url")
            if d is None or d.thread is not None or not isinstance(url, str):
                continue
            d.started = time.monotonic()
            d.thread = threading.Thread(
                target=self._convert, args=(d, url), name=f"convert-{d.disk_key}", daemon=True
            )
            d.thread.start()
            log.info("job=%s disk=%s pulling from %s", self.job_id, d.disk_key, url)

    def _stop_converts(self) -> None:
        self.kill.set()
        for d in self.disks.values():
            if d.thread is not None:
                d.thread.join()

    def _failure(self) -> Error | None:
        for d in self.disks.values():
            e = d.error
            if e is None or isinstance(e, Cancelled):
                continue
            msg = getattr(e, "stderr", "") or getattr(e, "message", "") or str(e)
            return Error(
                f"reading disk {d.disk_key} from the node failed: {str(msg)[-1000:]}",
                code="pull_failed",
            )
        return None

    def _with_progress(self, st: JobStatusReport) -> JobStatusReport:
        """The node's report with each disk's bytes as the hub's convert read them."""
        out = st.model_copy(deep=True)
        now = time.monotonic()
        for key, disk in out.disks.items():
            d = self.disks.get(int(key))
            if d is None:
                continue
            disk.bytes_total = d.capacity
            disk.bytes_done = int(d.capacity * d.percent / 100)
            if d.started and disk.bytes_done:
                elapsed = max(now - d.started, 1e-3)
                disk.rate = int(disk.bytes_done / elapsed)
                disk.eta = round((d.capacity - disk.bytes_done) / max(disk.rate, 1), 1)
        if any(d.thread is not None and not d.done for d in self.disks.values()):
            out.step = "pulling " + ", ".join(
                f"disk {d.disk_key}: {d.percent:.0f}%" for d in self.disks.values()
            )
        return out

    # ------------------------------------------------------------- monitor

    def _end(
        self, st: JobStatusReport | None, status: str, message: str | None, code: str | None
    ) -> None:
        self._stop_converts()  # before any file is removed
        self.engine._finish(self.job_id, st, status, message, code=code)

    def run(self) -> None:
        engine, job_id, client = self.engine, self.job_id, self.client
        settings = engine.settings
        last_ok = time.monotonic()
        last_write = 0.0
        cancel_sent = pulled_sent = False
        try:
            while not engine._stopping.is_set():
                if not self.cancel.is_set() and engine.lifecycle.cancel_requested(job_id):
                    self.cancel.set()
                failure = self._failure()
                if (self.cancel.is_set() or failure) and not cancel_sent:
                    cancel_sent = True
                    self.kill.set()
                    try:
                        client.cancel(job_id)
                    except Error as e:
                        log.warning("job=%s cancel on node failed: %s", job_id, e.message)
                        if failure is None:
                            self._end(
                                None, "cancelled", "cancelled by user (node unreachable)", None
                            )
                            return
                    if failure is not None:
                        # The node releases the VM by itself; the job's reason is ours.
                        self._end(None, "failed", failure.message, failure.code)
                        return
                try:
                    st = JobStatusReport.model_validate(client.status(job_id))
                    last_ok = time.monotonic()
                except NodeUnreachable as e:
                    if time.monotonic() - last_ok > settings.node_timeout:
                        self._end(
                            None,
                            "failed",
                            f"node unreachable for more than {settings.node_timeout:.0f}s: "
                            f"{e.message}",
                            "node_unreachable",
                        )
                        with contextlib.suppress(Error):
                            client.cancel(job_id)
                        return
                    time.sleep(settings.poll_interval)
                    continue
                except ValidationError as e:
                    self._end(
                        None, "failed", f"node sent a status the hub cannot read: {e}", "job_failed"
                    )
                    return
                except Error as e:
                    self._end(None, "failed", f"node status failed: {e.message}", e.code)
                    return
                status: str = st.status
                if status == "failed" and cancel_sent:
                    status = "cancelled"
                    st.error = JobError(code="cancelled", message="cancelled by user")
                if status in TERMINAL:
                    err = st.error
                    if status == "completed" and not all(d.done for d in self.disks.values()):
                        status, err = (
                            "failed",
                            JobError(
                                code="pull_incomplete",
                                message="the node ended the job before the hub read every disk",
                            ),
                        )
                    self._end(st, status, err.message if err else None, err.code if err else None)
                    return
                if not cancel_sent:
                    self._start_converts(st)
                    if not pulled_sent and all(d.done for d in self.disks.values()):
                        try:
                            client.pulled(job_id)
                            pulled_sent = True
                            log.info("job=%s every disk pulled", job_id)
                        except NodeUnreachable as e:  # again at the next round
                            log.warning("job=%s telling the node failed: %s", job_id, e.message)
                now = time.monotonic()
                if now - last_write >= 0.5:
                    last_write = now
                    if engine._update_progress(job_id, self._with_progress(st)):
                        self.cancel.set()  # the job timed out
                self.wake.wait(settings.poll_interval)
                self.wake.clear()
        except Exception as e:  # a bug: never leave a job running
            log.exception("job=%s pull monitor crashed", job_id)
            with contextlib.suppress(Error):
                client.cancel(job_id)
            self._end(None, "failed", f"internal error: {e}", "internal_error")
