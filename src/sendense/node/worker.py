"""One backup job on the node, as its own process.

``python -m sendense.node.worker --serve DATA_DIR`` reads its job (a
`WorkerJob` as JSON, with the source's credentials) on stdin, never from a
file, freezes the VM, runs the data mover for each disk into the hub's NBD
targets, releases the VM, and keeps ``JOB_DIR/status.json`` (a
`JobStatusReport`, written atomically) current for the node's status
endpoint. SIGTERM asks for a cancel. Its log is ``JOB_DIR/job.log``; it
never contains a credential.

The hub's targets require TLS with a pre-shared key per disk: the node wrote
the keys to ``JOB_DIR/tls-<disk key>.psk`` (node/runner.py) and the job names
those files; the worker's NBD handle of a target requires TLS with that key
(libnbd ``set_tls(TLS_REQUIRE)``, ``set_tls_username``,
``set_tls_psk_file``) and the worker removes the files once its copies have
ended, whatever the outcome.

A process per job isolates the mover's memory (its peak RSS is reported) and
lets a job finish its cleanup even when the node agent itself dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import nbd
from pydantic import ValidationError

from sendense.connectors.base import Connector, DiskView
from sendense.connectors.file.connector import FileConnector
from sendense.connectors.registry import make_connector
from sendense.core.errors import Cancelled, Error
from sendense.mover import digest as dg
from sendense.mover.copy import Mover, Progress, Retrying, connect_uri
from sendense.nbd import psk
from sendense.protocol.node import (
    HUB_ASKED,
    TLS_SCHEMES,
    DiskStatus,
    JobError,
    JobStatusReport,
    RetryInfo,
    WorkerJob,
)
from sendense.protocol.node import parse_targets as parse_targets  # re-exported: was here

log = logging.getLogger("sendense.node.worker")

KEEP_HASH_LISTS = 3
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,100}")
HASHED_PREFIX = "cid-"


def peak_rss() -> int:
    """This process's own peak RSS (VmHWM). ``ru_maxrss`` would also count the
    parent's memory at fork, which Linux carries across exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StatusFile:
    """``JOB_DIR/status.json``: the job's `JobStatusReport`, rewritten whole
    (atomically) at every change; the disks' threads update it under `lock`."""

    def __init__(self, job_dir: Path, job_id: str) -> None:
        self.path = job_dir / "status.json"
        # Every field set explicitly: the file has had these keys since the
        # first release, and it is written with exclude_unset.
        self.report = JobStatusReport(
            job_id=job_id,
            status="running",
            step="starting",
            pid=os.getpid(),
            started_at=datetime.now(UTC),
            finished_at=None,
            disks={},
            error=None,
            messages=[],
        )
        self.lock = threading.Lock()
        self.write()

    def message(self, text: str) -> None:
        with self.lock:
            self.report.messages.append(text)

    def update_disk(self, key: int, **fields: Any) -> None:
        """Set fields of a disk's `DiskStatus` and write the file."""
        with self.lock:
            entry = self.report.disks[str(key)]
            for name, value in fields.items():
                setattr(entry, name, value)
        self.write()

    def write(self, **fields: Any) -> None:
        """Set fields of the report, then write the file."""
        with self.lock:
            for name, value in fields.items():
                setattr(self.report, name, value)
            self.report.mover_peak_rss_bytes = (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )
            self.report.updated_at = datetime.now(UTC)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(self.report.model_dump_json(exclude_unset=True))
            os.replace(tmp, self.path)


def _open_source(view: DiskView) -> nbd.NBD:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    if view.dirty_context:
        h.add_meta_context(view.dirty_context)
    connect_uri(h, view.nbd_url)  # with a timeout: a hung server fails the attempt
    return h


def _hash_list_name(change_id: str, algorithm: str) -> str:
    """The file name of a change id's block hash list: the change id itself
    when it is a safe name (QEMU's ``sendense-...``), else a hash of it
    (VMware's look like ``52 de 0a ... 3e/12``: spaces and a slash)."""
    if SAFE_NAME.fullmatch(change_id):
        return f"{change_id}.{algorithm}"
    digest = hashlib.sha256(change_id.encode()).hexdigest()[:32]
    return f"{HASHED_PREFIX}{digest}.{algorithm}"


def _hash_list_dir(data_dir: Path, vm_name: str, key: int) -> Path:
    return data_dir / "blockhash" / vm_name.replace("/", "_") / str(key)


def hub_silent(job: WorkerJob, now: float | None = None) -> str | None:
    """Why a reconnecting copy should stop now, or None to keep trying.

    The hub asks for the job's status every second or so while it follows
    the job (the node touches ``HUB_ASKED`` then). Silence longer than
    ``hub_silence`` means the hub gave the job up (node unreachable past its
    timeout; it stopped the targets and removed the files) or this node's
    agent is gone and nothing reports to the hub: the targets will not come
    back, so the VM's frozen view is released now rather than at the
    reconnect deadline.
    """
    if job.hub_silence <= 0:
        return None
    try:
        asked = (job.job_dir / HUB_ASKED).stat().st_mtime
    except OSError:
        return None  # never asked yet: the deadline alone counts
    silent = (time.time() if now is None else now) - asked
    if silent <= job.hub_silence:
        return None
    return (
        f"the hub has not asked about this job for {silent:.0f} s (more than "
        f"SENDENSE_NODE_HUB_SILENCE={job.hub_silence:g}): it gave the job up or this "
        "node's agent is gone"
    )


def run(job: WorkerJob, data_dir: Path, cancel: threading.Event) -> int:
    job_id = job.job_id
    status = StatusFile(job.job_dir, job_id)
    targets = job.targets()
    previous = job.change_ids()
    connector: Connector | None = None
    success = False
    final: Literal["completed", "failed", "cancelled"] = "failed"
    error: JobError | None = None
    try:
        connector = make_connector(job.source.model_dump(), workdir=str(job.job_dir / "work"))
        # A connector that works long inside freeze (the file source hashes the
        # whole image for an incremental) stops on the job's cancel and shows
        # its step ("hashing disk 2000: 45%").
        if isinstance(connector, FileConnector):
            connector.cancel_event = cancel
            connector.on_step = lambda text: status.write(step=text)
        status.write(step="freezing")
        pit = connector.freeze(job.vm_name, sorted(targets), previous)
        log.info("job=%s frozen disks=%s", job_id, [v.disk.key for v in pit.views])
        for view in pit.views:
            key = view.disk.key
            status.report.disks[str(key)] = DiskStatus(
                disk_key=key,
                mode="incremental" if view.incremental else "full",
                bytes_done=0,
                bytes_total=0,
                status="pending",
                fallback_reason=view.fallback_reason,
                change_id=None,
                digest=None,
            )
            if view.fallback_reason:
                msg = f"disk {key}: full read instead of incremental: {view.fallback_reason}"
                status.message(msg)
                log.warning("job=%s %s", job_id, msg)
        status.write()
        if job.transfer == "pull":  # issue 11: the hub reads the frozen disks (node/pull.py)
            from sendense.node import pull

            pull.serve_disks(pit.views, job, data_dir, status, cancel)
        else:
            _copy_disks(pit.views, targets, job, data_dir, status, cancel, previous=previous)
        success = True
    except Cancelled as e:
        final, error = "cancelled", JobError(code="cancelled", message=str(e))
    except Exception as e:
        code = e.code if isinstance(e, Error) else "node_error"
        message = e.message if isinstance(e, Error) else f"{type(e).__name__}: {e}"
        log.exception("job=%s failed", job_id)
        final, error = "failed", JobError(code=code, message=message)
    finally:
        _drop_keys(job)
        # The job stays "running" until the VM is released: the hub stops the
        # targets as soon as it sees an end state, and the next job of this VM
        # must find it clean.
        status.write(step="releasing")
        try:
            if connector is not None:
                connector.release(success)
        except Exception as e:  # never hide the first error
            log.exception("job=%s release failed", job_id)
            if success:
                success = False
                final, error = "failed", JobError(code="release_failed", message=str(e))
    if success:
        final, error = "completed", None
        _prune_hash_lists(data_dir, job.vm_name, status)
    else:
        with status.lock:
            for disk in status.report.disks.values():
                if disk.status != "completed":
                    disk.status = final
    status.write(status=final, error=error, step=final, finished_at=datetime.now(UTC))
    log.info("job=%s status=%s", job_id, final)
    return 0 if success else 1


def _drop_keys(job: WorkerJob) -> None:
    """The targets' key files: no connection is made after the copies."""
    for tls in job.nbd_tls_files.values():
        try:
            tls.psk_file.unlink(missing_ok=True)
        except OSError as e:  # never hide the job's own outcome
            log.warning("job=%s could not remove %s: %s", job.job_id, tls.psk_file.name, e)


def _connect_target(h: nbd.NBD, url: str, job: WorkerJob, key: int) -> None:
    """Connect a disk's target, with TLS and its pre-shared key when it has one."""
    tls = job.tls_file(key)
    if tls is not None:
        psk.use_key_file(h, tls.psk_file, tls.username)
    elif url.startswith(TLS_SCHEMES):  # the request's validation prevents it
        raise Error(f"target of disk {key} requires TLS and the job has no key for it")
    connect_uri(h, url)


def _copy_disks(
    views: list[DiskView],
    targets: dict[int, str],
    job: WorkerJob,
    data_dir: Path,
    status: StatusFile,
    cancel: threading.Event,
    *,
    previous: dict[int, str],
) -> None:
    """Copy the disks, up to ``parallel_disks`` at a time (separate NBD
    connections and a mover each). The first failure stops the others and is
    the job's error; a user's cancel makes it ``Cancelled``."""
    parallel = max(1, min(job.parallel_disks, len(views)))
    failures: list[BaseException] = []

    def one(view: DiskView) -> None:
        if cancel.is_set():
            return
        try:
            _copy_disk(view, targets[view.disk.key], job, data_dir, status, cancel, previous)
        except BaseException as e:
            if not isinstance(e, Cancelled):
                failures.append(e)
                cancel.set()  # stop the other disks: the job has failed
            raise

    with ThreadPoolExecutor(parallel, "disk") as pool:
        futures = [pool.submit(one, v) for v in views]
        for f in futures:
            f.exception()  # wait for every disk, whatever happened
    if failures:
        raise failures[0]
    if cancel.is_set():  # without a failure, only a user's cancel sets it
        raise Cancelled("job cancelled")


def _copy_disk(
    view: DiskView,
    target_url: str,
    job: WorkerJob,
    data_dir: Path,
    status: StatusFile,
    cancel: threading.Event,
    previous: dict[int, str],
) -> None:
    key = view.disk.key
    size = view.disk.capacity_bytes
    algorithm = job.digest or dg.DEFAULT_ALGORITHM
    job_id = job.job_id
    status.write(step=f"copying disk {key}")
    status.update_disk(key, status="running")
    hdir = _hash_list_dir(data_dir, job.vm_name, key)
    hdir.mkdir(parents=True, exist_ok=True)
    base = None

    def open_target() -> nbd.NBD:
        h = nbd.NBD()
        try:
            _connect_target(h, target_url, job, key)
        except BaseException:
            with contextlib.suppress(Exception):
                h.close()
            raise
        return h

    src = _open_source(view)
    dst = nbd.NBD()
    mover: Mover | None = None
    try:
        # The target may be down at the first connect too (killed, being
        # served again by the hub): the same backoff and deadline as a drop.
        dst = _first_connect(open_target, job, key, cancel, _RetryReporter(status, key, job_id))
        if dst.get_size() != size:
            raise Error(
                f"target for disk {key} is {dst.get_size()} bytes, the disk is {size}",
                code="target_size_mismatch",
            )
        if view.incremental:
            prev_list = hdir / _hash_list_name(previous[key], algorithm)
            if prev_list.exists():
                base = prev_list
        hashes = dg.BlockHashList(
            hdir / _hash_list_name(str(view.new_change_id), algorithm),
            size,
            base=base,
            algorithm=algorithm,
        )
        retrying = _RetryReporter(status, key, job_id)
        if view.incremental and base is None:
            # No block hash list of the previous restore point on this node:
            # the digest needs every block, so read the unchanged ones too.
            msg = f"disk {key}: no block hash list for {previous[key]}; digest needs a full read"
            status.message(msg)
            log.warning("job=%s %s", job_id, msg)
            reader = Mover(
                src,
                None,
                size,
                hashes=hashes,
                finish_hashes=False,
                cancel_event=cancel,
                reconnect_source=lambda: _open_source(view),
                reconnect_deadline=job.reconnect_deadline,
                on_retry=retrying,
                abandoned=lambda: hub_silent(job),
                label=f"disk {key}",
            )
            try:
                reader.run()
            except BaseException:
                hashes.abort()
                raise
            finally:
                src = reader.src  # a reconnect replaces it

        def on_progress(p: Progress) -> None:
            status.update_disk(key, **p.as_dict())

        mover = Mover(
            src,
            dst,
            size,
            dirty_context=view.dirty_context,
            dirty_extents=view.changed_extents,
            # A disk with a previous change id has a target with a backing file
            # (even when the change id was unusable): zero runs must be written.
            target_is_zero=key not in previous,
            hashes=hashes,
            in_flight=job.in_flight,
            request_size=job.request_size,
            window_bytes=job.window_bytes,
            connections=job.target_connections,
            on_progress=on_progress,
            cancel_event=cancel,
            max_rate=float(job.max_rate) or None,
            # Issue 11: a dropped connection is made again (same URL, same
            # key file: the hub serves the target again on the same port).
            reconnect_source=lambda: _open_source(view),
            reconnect_target=open_target,
            reconnect_deadline=job.reconnect_deadline,
            flush_bytes=job.flush_bytes,
            flush_seconds=job.flush_seconds,
            on_retry=retrying,
            abandoned=lambda: hub_silent(job),
            label=f"disk {key}",
        )
        result = mover.run()
    except nbd.Error as e:
        if mover is not None:
            src, dst = mover.src, mover.dst or dst
        raise _copy_failure(key, src, dst, e) from e
    finally:
        if mover is not None:
            mover.close()
        for h in (src, dst):
            with contextlib.suppress(Exception):
                h.shutdown()
    status.update_disk(
        key,
        status="completed",
        change_id=view.new_change_id,
        digest=result.digest,
        bytes_done=result.data_bytes,
        data_bytes=result.data_bytes,
        zero_bytes=result.zero_bytes,
        requests=result.requests,
        seconds=round(result.seconds, 3),
    )
    log.info(
        "job=%s disk=%s mode=%s data_bytes=%d zero_bytes=%d seconds=%.3f",
        job_id,
        key,
        status.report.disks[str(key)].mode,
        result.data_bytes,
        result.zero_bytes,
        result.seconds,
    )


class _RetryReporter:
    """A disk's reconnects in the status file: the disk's ``retry``, the job's
    ``retry`` and step "retrying" while any disk reconnects, and a message
    once it copies again (issue 11)."""

    def __init__(self, status: StatusFile, key: int, job_id: str) -> None:
        self.status = status
        self.key = key
        self.job_id = job_id
        self.last: Retrying | None = None

    def __call__(self, retry: Retrying | None) -> None:
        status, key = self.status, self.key
        if retry is not None and retry.gave_up:
            self.last = None  # the job's error tells; no "reconnected" message
            retry = None
        if retry is not None:
            info = RetryInfo.model_validate(retry.as_dict())
            self.last = retry
            status.update_disk(key, retry=info)
            status.write(step="retrying", retry=info)
            return
        last, self.last = self.last, None
        status.update_disk(key, retry=None)
        with status.lock:
            others = [d.retry for d in status.report.disks.values() if d.retry is not None]
        if others:
            status.write(retry=others[0])
        else:
            status.write(step=f"copying disk {key}", retry=None)
        if last is not None:
            end = "the hub's target" if last.end == "target" else "the VM's disk"
            msg = f"disk {key}: reconnected to {end} after {last.attempt} attempts"
            status.message(msg)
            status.write()
            log.warning("job=%s %s", self.job_id, msg)


def _first_connect(
    open_target: Callable[[], nbd.NBD],
    job: WorkerJob,
    key: int,
    cancel: threading.Event,
    report: Callable[[Retrying | None], None],
) -> nbd.NBD:
    """Connect a disk's target, trying again as `Mover` does after a drop:
    backoff 0.5 s doubling to 10 s within ``reconnect_deadline``, stopping
    early on cancel or when the hub has gone silent (`hub_silent`)."""
    since = time.time()
    deadline = since + job.reconnect_deadline
    attempt = 0
    while True:
        try:
            h = open_target()
        except nbd.Error as e:
            given_up = hub_silent(job)
            if job.reconnect_deadline <= 0 or time.time() >= deadline or given_up:
                if attempt:
                    report(Retrying("target", str(e), attempt, since, deadline, True))
                if given_up:
                    raise Error(
                        f"could not connect to the hub's target of disk {key}: {given_up}; "
                        f"last error: {e}",
                        code="target_lost",
                    ) from e
                raise
            attempt += 1
            report(Retrying("target", f"target connection failed: {e}", attempt, since, deadline))
            wait = min(0.5 * 2 ** (attempt - 1), 10.0, max(0.0, deadline - time.time()))
            if cancel.wait(wait):
                raise Cancelled("job cancelled while connecting to its target") from None
            continue
        if attempt:
            report(None)  # "reconnected to the hub's target after N attempts"
        return h


def _copy_failure(key: int, src: nbd.NBD, dst: nbd.NBD, e: nbd.Error) -> Error:
    """The job's error for a failed copy, naming the end that went away.

    libnbd only says e.g. "read: command failed: ... (ENOTCONN)", which does
    not tell a person whether to look at the VM or at the hub; the handle
    whose connection died or was closed by its server does (libnbd(3),
    nbd_aio_is_dead, nbd_aio_is_closed).
    """
    if src.aio_is_dead() or src.aio_is_closed():
        return Error(
            f"lost the connection to disk {key} of the VM during the copy "
            f"(did the VM's QEMU process stop?): {e}",
            code="source_lost",
        )
    if dst.aio_is_dead() or dst.aio_is_closed():
        return Error(
            f"lost the connection to the hub's NBD target of disk {key}: {e}",
            code="target_lost",
        )
    return Error(f"copy of disk {key} failed: {e}", code="copy_failed")


def _prune_hash_lists(data_dir: Path, vm_name: str, status: StatusFile) -> None:
    for key in status.report.disks:
        hdir = _hash_list_dir(data_dir, vm_name, int(key))
        lists = sorted(
            [*hdir.glob("sendense-*"), *hdir.glob(f"{HASHED_PREFIX}*")],
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in lists[KEEP_HASH_LISTS:]:
            old.unlink(missing_ok=True)


def _cancel_on_signals(cancel: threading.Event) -> None:
    """SIGTERM/SIGINT set ``cancel``, received by a thread of their own.

    A handler would interrupt whatever syscall runs when the signal lands, and
    libnbd's synchronous calls (block status, connect, flush) fail on EINTR:
    a cancel would turn into a "failed" copy. Blocked in every thread and
    taken with sigwait, the signal interrupts nothing.
    """
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # inherited by later threads

    def wait() -> None:
        while True:
            signal.sigwait(signals)
            cancel.set()

    threading.Thread(target=wait, name="signals", daemon=True).start()


def main() -> int:
    """``worker --serve DATA_DIR``: wait on stdin for a `WorkerJob` (JSON).

    The node keeps one such worker started ahead of time, with its imports
    done, so a job does not pay for interpreter start-up (about 0.1-0.3 s).
    End of input without a job (the node went away) ends it quietly.
    """
    if len(sys.argv) != 3 or sys.argv[1] != "--serve":
        print("usage: python -m sendense.node.worker --serve DATA_DIR", file=sys.stderr)
        return 2
    data_dir = Path(sys.argv[2])
    cancel = threading.Event()
    _cancel_on_signals(cancel)
    raw = sys.stdin.read()
    if not raw.strip():
        return 0
    message = json.loads(raw)
    job_dir = Path(message["job_dir"])
    # From here on, stray output goes to the job's own files (the node shows
    # worker.stderr when a worker ends without a result).
    fd = os.open(job_dir / "worker.stderr", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        job = WorkerJob.model_validate(message)
    except ValidationError as e:  # a node of another version; the errors quote no input
        print(f"the node's job does not validate: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        filename=job_dir / "job.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if cancel.is_set():
        log.info("job=%s cancelled before it started", job.job_id)
    t0 = time.monotonic()
    rc = run(job, data_dir, cancel)
    log.info("job=%s worker_seconds=%.3f", job.job_id, time.monotonic() - t0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
