"""Pull mode on the node (issue 11): serve the frozen disks, let the hub read.

In push mode (node/worker.py) the node's mover reads each frozen disk and
writes it into the hub's NBD target. In pull mode (``SENDENSE_NODE_TRANSFER=
pull``, fulls only) the worker freezes the VM as usual, then for each disk:

- serves the frozen view on a TCP port of its own (``pull_port_first`` ..
  ``pull_port_last``) with ``nbdkit nbd`` reading the VM's export
  (`NbdkitExport`, measured faster; ``qemu-nbd --image-opts driver=nbd``,
  `PullExport`, where nbdkit is not installed), read-only, requiring TLS with
  the disk's pre-shared key (the one the hub sent in ``nbd_tls``, written by
  the runner to ``JOB_DIR/tls-<disk>.psk``), and throttled to
  ``SENDENSE_NODE_MAX_RATE`` when one is set;
- reports the export's URL as the disk's ``pull_url`` in ``status.json``;
- reads the frozen view itself once, concurrently, for the block hash list
  and the digest (below).

The export ends when the hub's connection closes (nbdkit ``exitlast``,
qemu-nbd without ``--persistent``; ``qemu-img convert`` opens the source once). The disk is
done when its export has ended; the job succeeds only when the hub then says
it read everything (``POST /api/v1/jobs/{id}/pulled`` writes
``JOB_DIR/pulled``) within ``pull_confirm_timeout``. A connection that closes
because the hub died, or a ``qemu-img`` it killed, looks the same as a
finished read from here; without the hub's word the job fails and the VM is
released with its previous change id kept (`Connector.release(False)`), as a
failed push does. A hub that never connects: ``pull_wait`` seconds.

Why the digest is computed here, by a second reader of the frozen view, and
not on the hub: the digest is not only the restore point's checksum, its
block hash list (``<data_dir>/blockhash/<vm>/<disk>/<change id>``) is what
the next (push) incremental starts from. Hashing on the hub would leave the
node without that list, and the next incremental would read the whole disk
again to make its digest (worker.py: "no block hash list"). The second read
costs the source daemon's CPU and the source storage's bandwidth, not the
network; with the source image in the page cache it ran alongside the hub's
read (docs/performance.md, ``pull_full_vs_onehop``).

The exports die with the worker (nbdkit ``--exit-with-parent``; qemu-nbd
under ``setpriv --pdeathsig KILL``): a killed worker leaves no export behind.
qemu-nbd's key folders (``JOB_DIR/pull-tls-<disk>``) are removed at the end;
a killed worker leaves them in its job folder (pruned with it) while no
server reads them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlparse

from sendense.connectors.base import DiskView
from sendense.core.errors import Cancelled, Error, InvalidRequest, NotFound, QemuNbdError
from sendense.mover import digest as dg
from sendense.mover.copy import CopyResult, Mover
from sendense.nbd import psk
from sendense.protocol.node import BackupStartRequest, JobStatusReport, WorkerJob
from sendense.qemu.nbd_server import QemuNbdServer
from sendense.settings import NodeSettings

if TYPE_CHECKING:
    from sendense.node.runner import JobRunner
    from sendense.node.worker import StatusFile

log = logging.getLogger("sendense.node.pull")

PULLED = "pulled"


def check_request(request: BackupStartRequest, settings: NodeSettings) -> None:
    """A pull is only for a node set to serve pulls, and for fulls (400 otherwise)."""
    if request.transfer != "pull":
        return
    if settings.transfer != "pull":
        raise InvalidRequest(
            "this node moves data by push (SENDENSE_NODE_TRANSFER=push); it does not serve pulls",
            code="pull_not_enabled",
        )
    if request.backup_type != "full":
        raise InvalidRequest("a pull reads full backups only; incrementals are pushed")


ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def for_worker(job: WorkerJob, settings: NodeSettings, hub_reached: str | None) -> WorkerJob:
    """The worker's job with the node's pull settings (its own settings object:
    ``--host`` given on the command line counts, which the worker's
    environment would not show). The address announced to the hub, unless
    set: the bind address, or when that is every interface, the host name
    the hub reached this node's API at (it can reach the node there)."""
    if job.transfer != "pull":
        return job
    bind = settings.pull_bind or settings.host
    advertise = settings.pull_advertise_host
    if not advertise:
        advertise = bind if bind not in ANY_ADDRESS else (hub_reached or bind)
    return job.model_copy(
        update={
            "pull_bind": bind,
            "pull_advertise_host": advertise,
            "pull_port_first": settings.pull_port_first,
            "pull_port_last": settings.pull_port_last,
            "pull_wait": settings.pull_wait,
            "pull_confirm_timeout": settings.pull_confirm_timeout,
        }
    )


def mark_pulled(runner: JobRunner, job_id: str) -> JobStatusReport:
    """``POST /jobs/{id}/pulled``: the hub read every disk; the worker may end."""
    job_dir = runner.job_dir(job_id)
    if not job_dir.is_dir():
        raise NotFound(f"job {job_id} not found on this node", job_id=job_id)
    (job_dir / PULLED).touch()
    log.info("job=%s the hub read every disk", job_id)
    return runner.status(job_id)


def _nbd_opts(url: str) -> str:
    """``--image-opts`` of qemu's NBD client for one of our ``nbd`` URLs."""
    u = urlparse(url)
    export = u.path.lstrip("/")
    if u.scheme == "nbd+unix":
        sock = parse_qs(u.query).get("socket", [""])[0]
        server = f"server.type=unix,server.path={sock.replace(',', ',,')}"
    elif u.scheme == "nbd":
        server = f"server.type=inet,server.host={u.hostname},server.port={u.port or 10809}"
    else:
        raise Error(f"pull cannot re-export a source at {u.scheme}:// (plain NBD only)")
    return f"driver=nbd,{server},export={export.replace(',', ',,')}"


class PullExport(QemuNbdServer):
    """A read-only qemu-nbd re-exporting the frozen view for the hub to read.

    One connection (``--shared=1``), not persistent: it exits when the hub
    closes it. Ready once it wrote its pid file (qemu-nbd writes it after it
    opened the image): a handshake to check, as `QemuNbdServer` does, would
    be the one connection it serves.
    """

    def __init__(self, view_url: str, *, max_rate: int, **kw: object) -> None:
        super().__init__(view_url, read_only=True, shared=1, **kw)  # type: ignore[arg-type]
        self.view_url = view_url
        self.max_rate = max_rate

    def argv(self) -> list[str]:
        args = [a for a in super().argv() if a != "--persistent"]
        # Dies with the worker's main thread (that started it): no orphan export.
        prefix = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        return [*prefix, *args]

    def _image_format(self) -> list[str]:
        return []

    def _image_args(self) -> list[str]:
        spec = _nbd_opts(self.view_url)
        if not self.max_rate:
            return ["--image-opts", spec]
        # SENDENSE_NODE_MAX_RATE holds in pull mode too: a throttle filter.
        inner = ",".join(f"file.{part}" for part in spec.split(","))
        return [
            "--object",
            f"throttle-group,id=pullrate,x-bps-read={self.max_rate}",
            "--image-opts",
            f"driver=throttle,throttle-group=pullrate,{inner}",
        ]

    def _accepts(self) -> bool:
        return bool(self.pidfile) and os.path.exists(str(self.pidfile))

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NbdkitExport:
    """The frozen view re-exported by ``nbdkit nbd`` (preferred to qemu-nbd).

    Measured on this 2-core machine (616 MiB of data, hub's ``qemu-img
    convert`` reading it over loopback, medians of 3 alternating rounds under
    load): through qemu-nbd 2.3 s plain and 3.5-4.0 s with TLS-PSK, through
    nbdkit 0.6-0.7 s plain and 1.1 s with TLS-PSK, reading the VM's export
    directly 0.8-1.3 s. nbdkit's nbd plugin passes requests through with
    libnbd and several threads; qemu-nbd's NBD client and server add a
    coroutine hop per request. nbdkit reads the key in psktool format, the
    file the runner wrote (``JOB_DIR/tls-<disk>.psk``), and it has no TLS
    priority setting: the hub's client leaves ChaCha20 out (AES-GCM chosen;
    nbd/psk.py says why). ``exitlast``: it exits when the hub's last
    connection closes; ``rate`` (bits/s): ``SENDENSE_NODE_MAX_RATE``;
    ``--exit-with-parent``: it dies with the worker. Ready when it wrote its
    pid file (nbdkit writes it once it accepts connections).
    """

    def __init__(
        self,
        view_url: str,
        *,
        export_name: str,
        host: str,
        port: int,
        pidfile: str,
        log_path: str,
        psk_file: Path | None,
        max_rate: int,
    ) -> None:
        self.view_url = view_url
        self.export_name = export_name
        self.host = host
        self.port = port
        self.pidfile = pidfile
        self.log_path = log_path
        self.psk_file = psk_file
        self.max_rate = max_rate
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def tls(self) -> bool:
        return self.psk_file is not None

    def argv(self) -> list[str]:
        args = ["nbdkit", "-f", "-r", "--exit-with-parent", "-i", self.host, "-p", str(self.port)]
        args += ["-e", self.export_name, "-P", self.pidfile, "--filter=exitlast"]
        if self.max_rate:
            args.append("--filter=rate")
        if self.psk_file is not None:
            args += ["--tls=require", f"--tls-psk={self.psk_file}"]
        args += ["nbd", f"uri={self.view_url}"]
        if self.max_rate:
            args.append(f"rate={self.max_rate * 8}")
        return args

    def start(self, timeout: float = 10.0) -> None:
        Path(self.pidfile).unlink(missing_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
            )
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.pidfile):
            if self.proc.poll() is not None:
                detail = Path(self.log_path).read_text(errors="replace")[-500:].strip()
                self.proc = None
                if "Address already in use" in detail:
                    raise QemuNbdError(f"cannot listen on {self.host}:{self.port}: {detail}")
                raise QemuNbdError(f"nbdkit exited before serving the frozen disk: {detail}")
            if time.monotonic() > deadline:
                self.stop()
                raise QemuNbdError(f"nbdkit did not start serving in {timeout}s")
            time.sleep(0.01)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        Path(self.pidfile).unlink(missing_ok=True)


Export = NbdkitExport | PullExport


def _serve(view: DiskView, export: str, job: WorkerJob) -> Export:
    """Start one disk's export on the first free port of the node's pull range."""
    key = view.disk.key
    bind = job.pull_bind
    tls = job.tls_file(key)
    use_nbdkit = shutil.which("nbdkit") is not None
    tls_dir = None
    if tls is not None and not use_nbdkit:
        username, _, secret = tls.psk_file.read_text().strip().partition(":")
        tls_dir = str(psk.make_server_dir(job.job_dir / f"pull-tls-{key}", secret, username))
    last: Exception | None = None
    for port in range(job.pull_port_first, job.pull_port_last + 1):
        common = {
            "export_name": export,
            "host": bind,
            "port": port,
            "pidfile": str(job.job_dir / f"pull-{key}.pid"),
            "log_path": str(job.job_dir / f"pull-{key}.log"),
        }
        server: Export
        if use_nbdkit:
            server = NbdkitExport(
                view.nbd_url,
                psk_file=tls.psk_file if tls else None,
                max_rate=job.max_rate,
                **common,  # type: ignore[arg-type]
            )
        else:
            server = PullExport(view.nbd_url, max_rate=job.max_rate, tls_psk_dir=tls_dir, **common)
        try:
            server.start()
            return server
        except QemuNbdError as e:
            if "cannot listen" not in e.message:
                raise
            last = e
    raise Error(
        f"no free port for the pull export of disk {key} in "
        f"{job.pull_port_first}-{job.pull_port_last}: {last}",
        code="no_pull_port",
    )


def serve_disks(
    views: list[DiskView],
    job: WorkerJob,
    data_dir: Path,
    status: StatusFile,
    cancel: threading.Event,
) -> None:
    """The pull branch of the worker: serve, hash, wait for the hub's word."""
    if any(v.incremental for v in views):
        raise Error("a pull reads full backups only", code="pull_incremental")
    targets = job.targets()
    servers: dict[int, Export] = {}
    advertise = job.pull_advertise_host or job.pull_bind
    pulled = job.job_dir / PULLED
    try:
        for view in views:
            key = view.disk.key
            export = urlparse(targets[key]).path.lstrip("/")
            server = _serve(view, export, job)
            servers[key] = server
            tls = server.tls if isinstance(server, NbdkitExport) else bool(server.tls_psk_dir)
            scheme = "nbds" if tls else "nbd"
            host = f"[{advertise}]" if ":" in advertise else advertise
            url = f"{scheme}://{host}:{server.port}/{export}"
            status.update_disk(key, status="running", pull_url=url)
            log.info(
                "job=%s disk=%s serving the frozen view at %s with %s",
                job.job_id,
                key,
                url,
                "nbdkit" if isinstance(server, NbdkitExport) else "qemu-nbd",
            )
        status.write(step="serving for the hub")
        deadline = time.monotonic() + job.pull_wait
        results = _hash_disks(views, job, data_dir, cancel)
        log.info(
            "job=%s hashed disks=%s seconds=%s",
            job.job_id,
            sorted(results),
            [round(r.seconds, 3) for r in results.values()],
        )
        while any(s.running() for s in servers.values()):
            # 20 ms: the job's end waits on these two loops.
            if cancel.wait(0.02):
                raise Cancelled("job cancelled")
            if time.monotonic() > deadline:
                raise Error(
                    f"the hub did not finish reading within {job.pull_wait:g}s "
                    "(SENDENSE_NODE_PULL_WAIT)",
                    code="pull_timeout",
                )
        deadline = time.monotonic() + job.pull_confirm_timeout
        while not pulled.exists():
            if cancel.wait(0.02):
                raise Cancelled("job cancelled")
            if time.monotonic() > deadline:
                raise Error(
                    "the hub closed its connections without saying it read every disk "
                    "(a hub that stopped mid-read); the restore point is not counted",
                    code="pull_unconfirmed",
                )
        for view in views:
            key = view.disk.key
            r = results[key]
            status.update_disk(
                key,
                status="completed",
                change_id=view.new_change_id,
                digest=r.digest,
                bytes_done=r.data_bytes,
                bytes_total=r.data_bytes,
                data_bytes=r.data_bytes,
                zero_bytes=r.zero_bytes,
                requests=r.requests,
                seconds=round(r.seconds, 3),
            )
    finally:
        for key, server in servers.items():
            with contextlib.suppress(Exception):
                server.stop()
            psk.remove_dir(job.job_dir / f"pull-tls-{key}")


def _hash_disks(
    views: list[DiskView],
    job: WorkerJob,
    data_dir: Path,
    cancel: threading.Event,
) -> dict[int, CopyResult]:
    """Read each frozen view once for its block hash list and digest."""
    from sendense.node import worker as w  # worker.py imports this module lazily

    algorithm = job.digest or dg.DEFAULT_ALGORITHM
    results: dict[int, CopyResult] = {}

    def one(view: DiskView) -> None:
        key = view.disk.key
        size = view.disk.capacity_bytes
        hdir = w._hash_list_dir(data_dir, job.vm_name, key)
        hdir.mkdir(parents=True, exist_ok=True)
        hashes = dg.BlockHashList(
            hdir / w._hash_list_name(str(view.new_change_id), algorithm), size, algorithm=algorithm
        )
        src = w._open_source(view)
        try:
            results[key] = Mover(
                src,
                None,
                size,
                hashes=hashes,
                in_flight=job.in_flight,
                request_size=job.request_size,
                window_bytes=job.window_bytes,  # the node's memory bound, as for push
                cancel_event=cancel,
            ).run()
        except BaseException:
            hashes.abort()
            raise
        finally:
            with contextlib.suppress(Exception):
                src.shutdown()

    parallel = max(1, min(job.parallel_disks, len(views)))
    with ThreadPoolExecutor(parallel, "hash") as pool:
        for f in [pool.submit(one, v) for v in views]:
            f.result()
    return results
