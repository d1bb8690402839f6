"""The hub's backup job: plan, targets, node, finish or clean up.

Flow of one job (one VM, one or more disks)::

    start()   validate -> plan each disk (full / incremental, parent)
              -> one transaction: job row, then its backup rows
              -> per disk: QCOW2 target (backing = parent, relative), a port,
                 a qemu-nbd export of it
              -> node POST /backup/start with the targets string
    monitor   polls the node's status; copies progress into the job row;
              fails the job if the node stays unreachable past node_timeout
              or the job runs past its timeout
    finish    completed: stop exports (qemu-nbd flushes), release ports,
              qemu-img check, sizes, sidecars, catalog rows completed
              failed/cancelled: stop exports, release ports, remove the
              partial files; the chain stays as it was
              a target whose qemu-nbd died is served again (same port,
              export, key); the node's mover reconnects and goes on
    recover   at hub start, jobs a dead hub process left running are taken
              over (engine/lifecycle.py: owner and lease): adopted when the
              node still copies (dead targets served again), finished when
              the node completed meanwhile, else failed with a reason

Status changes go through `JobLifecycle.transition` (conditional on the
current status and on this process owning the job). Finishing stops qemu-nbd
and runs ``qemu-img check`` with no database session open and no global lock
held; the outcome is written afterwards in one short transaction.

NBD targets require TLS with a pre-shared key of their own (one per disk and
job; sendense/nbd/psk.py, docs/security.md): the key is made here, written to
``run/tls-<backup id>/keys.psk`` (0600, in a 0700 folder) for qemu-nbd, sent
to the node in the start request (``nbd_tls``, over the authenticated API)
and removed with the target (`_stop_target`: completed, failed, cancelled,
and left-overs of a dead hub at `recover`). ``SENDENSE_NBD_TLS=false`` turns
it off, for the benchmark's no-TLS round only.

QCOW2 cluster size of targets: 64 KiB, measured (docs/performance.md). It
equals the dirty-bitmap granularity the connector creates, so an incremental
writes whole clusters and never copies-on-write from its backing file (with
2 MiB clusters a 64 KiB change costs a 2 MiB cluster: 32x the size). For
fulls, larger clusters did not make the NBD path faster here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select as select_module
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select

from sendense import keystore
from sendense.catalog.db import Database
from sendense.catalog.models import (
    Backup,
    BackupHold,
    BackupJob,
    Node,
    Repository,
    Source,
    Vm,
    VmDisk,
)
from sendense.catalog.stores import BackupStore, JobStore, RepositoryStore, VmStore, disk_of
from sendense.core.errors import (
    DiskBusy,
    Error,
    InsufficientSpace,
    InvalidRequest,
    NoParent,
    NotFound,
    Unavailable,
)
from sendense.engine import dispatch, pull
from sendense.engine.lifecycle import ACTIVE, TERMINAL, JobLifecycle
from sendense.engine.node_client import NodeClient, NodeUnreachable, cached_client
from sendense.nbd import psk
from sendense.nbd.ports import PortAllocator
from sendense.protocol.node import (
    BackupStartRequest,
    DiskStatus,
    JobError,
    JobStatusReport,
    NbdTlsKey,
    SourceSpec,
)
from sendense.qemu import img
from sendense.qemu.nbd_server import QemuNbdServer, is_qemu_nbd, stop_pid
from sendense.restore.disk import direct_io_ok
from sendense.secretbox import SecretBox
from sendense.settings import HubSettings
from sendense.storage import backends, immutability, layout

log = logging.getLogger(__name__)


@dataclass
class BackupRequest:
    vm_name: str
    repository_id: str
    backup_type: str = "auto"
    disk_id: int | None = None
    tags: dict[str, Any] | None = None
    created_by: str = "admin"
    # Wait behind a job already on the VM instead of 409 disk_busy.
    queue: bool = False
    # The caller holds a slot of the node (the scheduler's ``starting``
    # item): start now whatever the node's count (engine/dispatch.py).
    reserved: bool = False


class JobFailed(Error):
    code = "job_failed"


def report_of(answer: dict[str, Any]) -> JobStatusReport:
    """The node's status answer, checked against the contract."""
    try:
        return JobStatusReport.model_validate(answer)
    except ValidationError as e:
        raise JobFailed(f"node sent a status the hub cannot read: {e}") from e


def progress_of(st: JobStatusReport) -> dict[str, Any]:
    """Per-disk progress as the job row keeps it (JSON)."""
    return {key: disk.model_dump(mode="json") for key, disk in st.disks.items()}


def retry_of(st: JobStatusReport) -> dict[str, Any] | None:
    """The node's job-level ``retry`` (its mover reconnecting), as JSON."""
    retry = getattr(st, "retry", None)
    if retry is None:
        return None
    if hasattr(retry, "model_dump"):
        dumped: dict[str, Any] = retry.model_dump(mode="json")
        return dumped
    return dict(retry) if isinstance(retry, dict) else None


# Seconds a target served again shows as the job's ``retry`` when the node
# does not report a retry of its own (it reconnected before its next report).
HUB_RETRY_SHOWN = 3.0

# The shortest delay between two status calls of a job's monitor (see
# BackupEngine._poll_delay).
FAST_POLL = 0.02

# An incremental's estimate (its dirty bytes are unknown before it starts).
MIN_FREE = 1 << 20


def estimate_bytes(backup_type: str, capacity: int, cluster_size: int) -> int:
    """Upper bound of a restore point's size: data plus QCOW2 metadata
    (an 8-byte L2 entry and a 2-byte refcount per cluster, header, L1)."""
    if backup_type != "full":
        return MIN_FREE
    clusters = -(-capacity // cluster_size)
    return capacity + clusters * 10 + 4 * cluster_size


def lock_end(repo: Repository | None, created_at: datetime) -> datetime | None:
    """When a new restore point's immutable lock ends (None: not immutable)."""
    if repo is None or not repo.immutable or repo.retention_days <= 0:
        return None
    return created_at + timedelta(days=repo.retention_days)


def node_client(node: Node, secrets: SecretBox) -> NodeClient:
    return cached_client(
        node.id,
        node.url,
        secrets.decrypt(node.token_encrypted),
        certificate=node.certificate,  # pinned at registration (hub <-> node TLS)
        name=node.name,
    )


def source_spec(source: Source, secrets: SecretBox) -> dict[str, Any]:
    """The source as the node needs it: config with credentials put back."""
    config = dict(source.config)
    if source.secret_encrypted:
        config.update(secrets.decrypt(source.secret_encrypted))
    return {"type": source.type, "config": config}


class BackupEngine:
    def __init__(
        self,
        db: Database,
        settings: HubSettings,
        ports: PortAllocator,
        secrets: SecretBox,
        lifecycle: JobLifecycle,
    ) -> None:
        self.db = db
        self.lifecycle = lifecycle
        self.settings = settings
        self.ports = ports
        self.secrets = secrets
        self.run_dir = settings.data_dir.resolve() / "run"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = settings.data_dir.resolve() / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not settings.nbd_tls:
            log.warning(
                "SENDENSE_NBD_TLS=false: NBD targets are served WITHOUT TLS and without a key; "
                "anyone who can reach %s during a job can read or write restore points "
                "(for benchmarks only)",
                settings.nbd_bind,
            )
        # "Two jobs never write the same disk": the busy check and the insert
        # happen under this lock in this process, and under a row lock on the
        # VM (SELECT ... FOR UPDATE) across hub processes on PostgreSQL.
        self._plan_lock = threading.Lock()
        self._servers: dict[str, QemuNbdServer] = {}
        self._ports: dict[str, int] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._stopping = threading.Event()
        # One finish at a time per job: the monitor, a cancel and recovery may
        # race; the conditional status write settles it across processes.
        self._finishing: dict[str, threading.Lock] = {}
        self._finishing_lock = threading.Lock()
        # Claims queued jobs for this process (engine/dispatch.py); started
        # by the hub (hub/state.py) once recovery is done.
        self.dispatcher = dispatch.Dispatcher(db, lifecycle, settings, self.launch_claimed)
        # Targets that survive (issue 11): job -> its backups' ids, the pids of
        # adopted targets (started by an earlier hub process: not our
        # children), and how often each target was served again.
        self._job_targets: dict[str, list[str]] = {}
        self._adopted_pids: dict[str, int] = {}
        self._restarts: dict[str, int] = {}
        # A target served again: the job shows it (step "retrying", `retry`)
        # until the node reports its own retry or HUB_RETRY_SHOWN seconds pass.
        self._hub_retry: dict[str, tuple[dict[str, Any], float]] = {}

    # ------------------------------------------------------------------ start

    def start(self, req: BackupRequest) -> str:
        """Start a backup job now, or queue it when its node is at its limit
        (engine/dispatch.py: the job waits ``pending``, step ``queued``, and
        any hub process starts it when a slot frees). Either way the request
        is checked now (VM, repository, disks, parent, space): a backup that
        could not run is refused at once, not queued."""
        if req.backup_type not in ("full", "incremental", "auto"):
            raise InvalidRequest("backup_type must be one of full, incremental, auto")
        t0 = time.monotonic()
        # statvfs with no lock held and no session open (a share may be slow).
        available = self._repository_space(req.repository_id)
        queued: str | None = None
        with self._plan_lock, self.db.session() as s:
            vm = VmStore(s).by_name(req.vm_name)
            if vm is None:
                raise NotFound(
                    f"VM {req.vm_name} not found (run discovery first)", vm_name=req.vm_name
                )
            repo = RepositoryStore(s).get(req.repository_id)
            if repo is None:
                raise InvalidRequest(
                    f"repository_id {req.repository_id} does not exist",
                    repository_id=req.repository_id,
                )
            # Encrypted repository: a missing or wrong master key is a clear 503
            # now, not a failed job later.
            keystore.key_of_repository(s, self.settings, repo)
            source = vm.source
            # Across hub processes: the node's row lock serializes the count
            # of its slots, the VM's the busy check. Node first, then VM: the
            # order every claimer takes them in (engine/dispatch.py).
            dispatch.lock_node(s, source.node_id)
            s.execute(select(Vm.id).where(Vm.id == vm.id).with_for_update())
            disks = self._disks(vm, req.disk_id)
            wait = self._vm_busy(s, vm, queue=req.queue)
            plans = [self._plan_disk(s, vm, repo, d, req.backup_type) for d in disks]
            # Before the job row: a backup that cannot fit writes nothing.
            self._check_space(vm, repo, disks, plans, available)
            if wait is None and not req.reserved:
                wait = dispatch.node_full(s, source.node_id, self.settings)
            if wait is not None:
                # Queued: no restore point rows, no target, no port yet; the
                # claim plans again (the chain may have moved meanwhile).
                job = dispatch.new_queued_job(
                    s,
                    vm_id=vm.id,
                    repository_id=repo.id,
                    node_id=source.node_id,
                    requested_type=req.backup_type,
                    disk_id=req.disk_id,
                    tags=req.tags or {},
                    created_by=req.created_by,
                    reason=wait,
                )
                queued = wait
                job_id = job.id
            else:
                now = datetime.now(UTC)
                job = BackupJob(
                    vm_id=vm.id,
                    repository_id=repo.id,
                    node_id=source.node_id,
                    status="pending",
                    step="preparing targets",
                    requested_type=req.backup_type,
                    tags=req.tags or {},
                    created_by=req.created_by,
                    created_at=now,
                    timeout_at=now + timedelta(seconds=self.settings.job_timeout),
                    **self.lifecycle.claim_fields(),
                )
                s.add(job)
                s.flush()  # the job row first, then the backups that reference it
                self._add_backups(s, job.id, vm, repo, disks, plans, now, req.tags or {})
                job_id = job.id
        if queued is not None:
            log.info("job=%s vm=%s queued: %s", job_id, req.vm_name, queued)
            return job_id
        log.info("job=%s vm=%s planned in %.3fs", job_id, req.vm_name, time.monotonic() - t0)
        try:
            self._launch(job_id)
        except Exception as e:
            self._fail(job_id, e)
            if isinstance(e, Error):
                e.details["job_id"] = job_id  # the failed job is on record
            raise
        return job_id

    def _vm_busy(self, s: Any, vm: Vm, *, queue: bool) -> str | None:
        """409 ``disk_busy`` while another job keeps the VM busy, or, when the
        request asked to queue, why the new job waits (None: the VM is free)."""
        # Per VM, not per disk: a job freezes all of its VM's disks at once
        # (and the node runs one job per VM), so a second job on another
        # disk of the same VM must wait too.
        busy = BackupStore(s).active_for_vm(vm.id)
        if busy:
            error = DiskBusy(
                f"VM {vm.name} disk(s) {sorted({b.disk_index for b in busy})} are being "
                f"backed up by job {busy[0].job_id}; one job per VM at a time",
                job_id=busy[0].job_id,
            )
        else:
            other = dispatch.vm_busy_job(s, vm.id)
            if other is None:
                return None
            if other.kind == "backup":
                state = "queued" if other.owner is None else "starting"
                error = DiskBusy(
                    f"VM {vm.name} has backup job {other.id} ({state}); one job per VM at "
                    "a time (ask with queue=true to wait for it)",
                    job_id=other.id,
                )
            else:
                # A merge (consolidation, or retention merging old points)
                # holds QEMU's write lock on the chain: a target backed by it
                # could not be opened.
                error = DiskBusy(
                    f"VM {vm.name} is being consolidated by job {other.id} ({other.kind}); "
                    "start the backup when it has ended",
                    job_id=other.id,
                )
        if not queue:
            raise error
        return f"waiting for VM {vm.name}: {error.message}"

    def _add_backups(
        self,
        s: Any,
        job_id: str,
        vm: Vm,
        repo: Repository,
        disks: list[VmDisk],
        plans: list[tuple[str, Backup | None]],
        now: datetime,
        tags: dict[str, Any],
    ) -> None:
        """The job's restore point rows (pending), its parents held."""
        for disk, (btype, parent) in zip(disks, plans, strict=True):
            path = layout.backup_path(Path(repo.path), vm.name, disk.disk_key, now, btype)
            s.add(
                Backup(
                    job_id=job_id,
                    vm_id=vm.id,
                    vm_disk_id=disk.id,
                    disk_index=disk.disk_index,
                    disk_key=disk.disk_key,
                    repository_id=repo.id,
                    parent_id=parent.id if parent else None,
                    backup_type=btype,
                    status="pending",
                    file_path=str(path),
                    nbd_export_name="",
                    total_bytes=disk.capacity_bytes,
                    previous_change_id=parent.change_id if parent else None,
                    tags=tags,
                    created_at=now,
                )
            )
            if parent is not None:
                # The parent is read through while the job runs: it cannot
                # be deleted or merged away meanwhile (409 in_use).
                s.add(BackupHold(backup_id=parent.id, holder_type="job", holder_id=job_id))

    def launch_claimed(self, job_id: str) -> None:
        """Start a job this process claimed from the queue (engine/dispatch.py):
        plan it as a request made now (restore point rows, parents held,
        space), then targets and node. A plan that no longer holds (VM or
        repository gone, chain broken, no space) fails the job with its
        reason."""
        try:
            with self.db.session() as s:
                repository_id = s.scalar(
                    select(BackupJob.repository_id).where(BackupJob.id == job_id)
                )
            available = self._repository_space(repository_id or "")
            with self._plan_lock, self.db.session() as s:
                job = JobStore(s).get(job_id)
                if job is None or job.status != "pending" or job.owner != self.lifecycle.owner:
                    return  # cancelled (or taken) since the claim
                vm = job.vm
                if vm is None:
                    raise NotFound("the VM was removed while its backup was queued")
                repo = RepositoryStore(s).get(job.repository_id or "")
                if repo is None:
                    raise InvalidRequest(
                        f"repository {job.repository_id} was removed while the backup was queued"
                    )
                keystore.key_of_repository(s, self.settings, repo)
                s.execute(select(Vm.id).where(Vm.id == vm.id).with_for_update())
                disks = self._disks(vm, (job.params or {}).get("disk_id"))
                plans = [self._plan_disk(s, vm, repo, d, job.requested_type) for d in disks]
                self._check_space(vm, repo, disks, plans, available)
                now = datetime.now(UTC)
                job.step = "preparing targets"
                job.timeout_at = now + timedelta(seconds=self.settings.job_timeout)
                waited = (now - job.created_at).total_seconds() if job.created_at else 0.0
                hub = dict(job.messages or {})
                hub["hub"] = [
                    *(hub.get("hub") or []),
                    f"started after {waited:.0f}s in the queue",
                ]
                job.messages = hub
                self._add_backups(s, job.id, vm, repo, disks, plans, now, dict(job.tags or {}))
        except Exception as e:
            self._fail(job_id, e)
            return
        try:
            self._launch(job_id)
        except Exception as e:
            self._fail(job_id, e)

    def _repository_space(self, repository_id: str) -> int | None:
        """Bytes available in the repository (None: unknown or not checked).

        A share that is not mounted is refused (503 ``repository_offline``):
        its mount point is then a plain folder on the hub's own disk, and
        restore points written there would land on the wrong filesystem.
        """
        with self.db.session() as s:
            repo = RepositoryStore(s).get(repository_id)
            where = (repo.name, repo.type, repo.path) if repo else None
        if where is None:
            return None  # refused below, with the other checks
        name, kind, path = where
        if kind in backends.FSTYPES and not backends.is_mounted(kind, path):
            raise Unavailable(
                f"repository {name} is offline: {path} is not an {kind} mount",
                code="repository_offline",
                repository_id=repository_id,
            )
        if not self.settings.space_check:
            return None
        cap = backends.capacity(path)
        return cap.available_bytes if cap else None

    def _check_space(
        self,
        vm: Vm,
        repo: Repository,
        disks: list[VmDisk],
        plans: list[tuple[str, Backup | None]],
        available: int | None,
    ) -> None:
        """409 ``insufficient_space`` when the estimate exceeds the free space.

        The estimate: a full needs its disk's capacity (the node cannot say
        how much of a disk is allocated before it reads it, so this is an
        upper bound: QCOW2 stores only allocated, non-zero data) plus QCOW2
        metadata. An incremental's dirty bytes are not known before the
        point in time is taken: it needs only ``MIN_FREE`` (so a full
        repository refuses it), and a repository that fills up during its
        copy fails the job cleanly (ENOSPC). Other running jobs' remaining
        writes are not reserved. ``SENDENSE_SPACE_CHECK=false`` turns the
        check off.
        """
        if available is None:
            return
        cluster = self.settings.cluster_size
        needed = 0
        for disk, (btype, _parent) in zip(disks, plans, strict=True):
            needed += estimate_bytes(btype, disk.capacity_bytes, cluster)
        if needed > available:
            raise InsufficientSpace(
                f"repository {repo.name} has {available} bytes available; the backup of VM "
                f"{vm.name} may need up to {needed} bytes ("
                + ", ".join(
                    f"disk {d.disk_index}: {b} backup"
                    for d, (b, _) in zip(disks, plans, strict=True)
                )
                + "); free space or use another repository",
                needed_bytes=needed,
                available_bytes=available,
                repository_id=repo.id,
            )

    def _disks(self, vm: Vm, disk_id: int | None) -> list[VmDisk]:
        if not vm.disks:
            raise InvalidRequest(f"VM {vm.name} has no discovered disks (run discovery again)")
        if disk_id is None:
            return list(vm.disks)
        disk = disk_of(vm, disk_id)
        if disk is None:
            raise InvalidRequest(
                f"disk_id {disk_id} is out of range: VM {vm.name} has disks 0..{len(vm.disks) - 1}",
                disk_id=disk_id,
            )
        return [disk]

    def _plan_disk(
        self, s: Any, vm: Vm, repo: Repository, disk: VmDisk, requested: str
    ) -> tuple[str, Backup | None]:
        if requested == "full":
            return "full", None
        parent = BackupStore(s).latest_completed(disk.id, repo.id)
        reason = None
        if parent is None:
            reason = f"no completed backup of disk {disk.disk_index} in repository {repo.name}"
        elif not parent.change_id:
            reason = f"the last backup of disk {disk.disk_index} has no change id"
        elif not Path(parent.file_path).exists():
            reason = f"the parent file {parent.file_path} is missing"
        elif parent.total_bytes != disk.capacity_bytes:
            reason = (
                f"disk {disk.disk_index} changed size ({parent.total_bytes} -> "
                f"{disk.capacity_bytes} bytes) since the last backup"
            )
        if reason is None:
            return "incremental", parent
        if requested == "incremental":
            raise NoParent(
                f"incremental backup of VM {vm.name} impossible: {reason}; run a full backup first",
                disk_id=disk.disk_index,
            )
        return "full", None

    def _launch(self, job_id: str) -> None:
        """Targets up, then the node told to start; the monitor thread takes over.

        No transaction stays open across a subprocess (issue 12): one short
        session reads what the launch needs, the targets come up with none
        open (``qemu-img create``, a port claimed in the catalog, qemu-nbd),
        a second short session records their ports and pids, then the node
        is called. Every target is known in memory (``_servers``, ``_ports``,
        ``_job_targets``) before its process starts, so a failure at any
        point is cleaned up by `_fail` -> `_finish` (ports back, qemu-nbd
        stopped, files removed) whether or not its row says so yet. The
        job's finish lock is held while the targets come up: a cancel
        arriving meanwhile waits for them, then stops them all.

        A job of several disks brings its targets up at once (one thread per
        disk): ``qemu-img create`` and qemu-nbd's start are process start-up
        and handshake waits, not CPU.
        """
        if pull.wanted(self, job_id):  # issue 11: the hub reads the node's disks (engine/pull.py)
            pull.launch(self, job_id)
            return
        t0 = time.monotonic()
        with self.db.session() as s:
            job = JobStore(s).get(job_id)
            assert job is not None
            vm = job.vm
            assert vm is not None
            source = vm.source
            # Encrypted repository: every target is LUKS-encrypted (qemu/img.py).
            key = keystore.key_of_repository(s, self.settings, job.repository_id)
            targets = [_NewTarget.of(b, BackupStore(s)) for b in job.backups]
            spec = SourceSpec.model_validate(source_spec(source, self.secrets))
            vm_name, vm_path = vm.name, vm.path
            client = node_client(source.node, self.secrets)
        t1 = time.monotonic()
        with self._job_lock(job_id):
            self._targets_up(job_id, targets, key)
            t2 = time.monotonic()
            with self.db.session() as s:
                job = JobStore(s).get(job_id)
                assert job is not None
                by_id = {t.backup_id: t for t in targets}
                for b in job.backups:
                    t = by_id[b.id]
                    b.nbd_port, b.nbd_export_name, b.nbd_pid = t.port, t.export, t.pid
                job.step = "starting on node"
        t3 = time.monotonic()
        if self.lifecycle.cancel_requested(job_id):
            self._finish(job_id, None, "cancelled", "cancelled by user")
            return
        scheme = "nbds" if self.settings.nbd_tls else "nbd"
        request = BackupStartRequest(
            job_id=job_id,
            vm_name=vm_name,
            source=spec,
            vm_path=vm_path,
            nbd_targets=",".join(
                f"{t.disk_key}:{scheme}://{self.settings.advertise_host}:{t.port}/{t.export}"
                for t in targets
            ),
            nbd_tls={t.disk_key: t.tls for t in targets if t.tls is not None},
            # Per disk the plan may differ (auto); the node reads
            # previous_change_ids for the incremental ones only.
            backup_type=(
                "incremental" if any(t.backup_type == "incremental" for t in targets) else "full"
            ),
            previous_change_ids={
                t.disk_key: t.parent_change_id or ""
                for t in targets
                if t.backup_type == "incremental"
            },
        )
        client.start_backup(request.model_dump(mode="json"))
        t4 = time.monotonic()
        log.info(
            "job=%s launched in %.3fs: read %.3f, %d target(s) up %.3f, recorded %.3f, node %.3f",
            job_id,
            t4 - t0,
            t1 - t0,
            len(targets),
            t2 - t1,
            t3 - t2,
            t4 - t3,
        )
        if not self.lifecycle.transition(job_id, "running", allowed_from=("pending",)):
            # Cancelled while the targets came up: the node stops, we clean up.
            self._follow(job_id, client)
            return
        with self.db.session() as s:
            job = JobStore(s).get(job_id)
            assert job is not None
            job.step = "freezing"
            for b in job.backups:
                b.status = "running"
                b.started_at = job.started_at
        self._follow(job_id, client)

    @contextlib.contextmanager
    def _job_lock(self, job_id: str) -> Any:
        """The job's finish lock (see `_finish`), held by a launch while its
        targets come up."""
        with self._finishing_lock:
            lock = self._finishing.setdefault(job_id, threading.Lock())
        try:
            with lock:
                yield
        finally:
            with self._finishing_lock:
                if self._finishing.get(job_id) is lock and not lock.locked():
                    self._finishing.pop(job_id, None)

    def _targets_up(self, job_id: str, targets: list[_NewTarget], key: Any) -> None:
        """Bring up every target of a job, those of several disks at once.
        Raises the first failure after all have ended (each one is already
        registered for the cleanup)."""
        if len(targets) == 1:
            self._target_up(job_id, targets[0], key)
            return
        with ThreadPoolExecutor(max_workers=min(len(targets), 8)) as pool:
            futures = [pool.submit(self._target_up, job_id, t, key) for t in targets]
        for f in futures:
            e = f.exception()
            if e is not None:
                raise e

    def _target_up(self, job_id: str, t: _NewTarget, key: Any) -> None:
        """One target: its port claimed first (nothing on disk when none is
        free), the QCOW2 (backing = the parent, relative), its TLS key, then
        its qemu-nbd. No session open: the port claim writes its own row."""
        port = self.ports.allocate(backup_id=t.backup_id)  # named in its catalog claim
        self._ports[t.backup_id] = port
        self._job_targets.setdefault(job_id, []).append(t.backup_id)
        t.port = port
        path = Path(t.file_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if t.backup_type == "incremental":
            assert t.parent_file is not None
            img.create(
                str(path),
                t.total_bytes if key else None,
                backing=os.path.relpath(t.parent_file, path.parent),
                cluster_size=self.settings.cluster_size,
                key=key,
            )
        else:
            img.create(str(path), t.total_bytes, cluster_size=self.settings.cluster_size, key=key)
        tls_dir = None
        if self.settings.nbd_tls:
            tls_key = psk.new_key()
            tls_dir = str(psk.make_server_dir(self._tls_dir(t.backup_id), tls_key))
            t.tls = NbdTlsKey(username=psk.USERNAME, psk=tls_key)
        server = self._target_server(
            t.backup_id, str(path), port, t.export, tls_dir, key, t.backup_type
        )
        self._servers[t.backup_id] = server
        server.start()
        t.pid = server.pid

    def _target_server(
        self,
        backup_id: str,
        path: str,
        port: int,
        export: str,
        tls_dir: str | None,
        key: img.ImageKey | None,
        backup_type: str = "full",
    ) -> QemuNbdServer:
        """The qemu-nbd export of one target (made at launch, and again with
        the same port, export name and key when its process died mid-copy)."""
        return QemuNbdServer(
            path,
            export_name=export,
            host=self.settings.nbd_bind,
            port=port,
            # Zeros the source sends as data (a thick VMware disk, a
            # block device, a guest that wrote zeros) are stored as
            # zero clusters, not as data: measured, 256 MiB of zeros
            # then 64 MiB of random data make a 64.3 MiB file.
            detect_zeroes="unmap",
            **self._target_io(path, backup_type),
            pidfile=str(self.run_dir / f"nbd-{backup_id}.pid"),
            log_path=str(self.log_dir / f"nbd-{backup_id}.log"),
            key=key,
            tls_psk_dir=tls_dir,
        )

    def _target_io(self, path: str, backup_type: str = "full") -> dict[str, Any]:
        """qemu-nbd cache and aio modes of a target (``--cache``, ``--aio``).

        Default ("auto"): ``--cache=none --aio=native`` (O_DIRECT, Linux AIO;
        io_uring for an incremental, see below) where the repository's
        filesystem takes O_DIRECT, else qemu's
        ``writeback``. Measured (bench/target_bench.py, docs/performance.md
        "Targets"): a full through the page cache pays a copy into it on the
        target's core and the write-back at the flush; O_DIRECT took 0.76x
        the time of writeback for a full and ~0.6 CPU-s less per GiB on
        qemu-nbd's core (the core TLS also runs on), and incrementals ran the
        same. io_uring measured like native; native is everywhere (io_uring
        may be disabled by a seccomp profile). Durability is unchanged: the
        node's NBD flush is an fdatasync either way. tmpfs before Linux 6.6
        and some network file systems refuse O_DIRECT: writeback there.
        """
        cache = self.settings.nbd_target_cache
        aio = self.settings.nbd_target_aio or None
        if cache == "auto":
            cache = "none" if direct_io_ok(Path(path).parent) else "writeback"
        if aio is None and cache in ("none", "directsync"):
            # Native AIO (needs O_DIRECT) for a full; io_uring for an
            # incremental where qemu can use it here. A qemu-nbd with native
            # AIO takes 26-44 ms to exit on SIGTERM (tearing down its Linux
            # AIO context), with io_uring 1 ms, and every job waits for its
            # targets' exit before its check: 1 % incremental, finish 0.077
            # -> 0.062 s, its target's stop 0.041 -> 0.015 s. Fulls stay
            # native: three alternating fulls per mode measured 7.9 s native,
            # 9.9 s io_uring (bench/launch_bench.py, docs/performance.md).
            incremental = backup_type == "incremental"
            aio = "io_uring" if incremental and io_uring_ok(self.run_dir) else "native"
        return {"cache": cache, "aio": aio}

    # ---------------------------------------------------- targets that survive

    def _dead_targets(self, job_id: str) -> list[str]:
        """Targets of the job whose qemu-nbd is gone (killed, crashed, OOM)."""
        dead = []
        for backup_id in self._job_targets.get(job_id, []):
            server = self._servers.get(backup_id)
            if server is not None:
                gone = server.proc is not None and server.proc.poll() is not None
            else:
                pid = self._adopted_pids.get(backup_id)
                gone = pid is not None and not is_qemu_nbd(pid)
            if gone:
                dead.append(backup_id)
        return dead

    def _reserve_target(self, job_id: str, backup_id: str) -> None:
        """Serve a dead target again: same file, host:port, export name and
        TLS key, so that the node's mover reconnects to the URL it has and
        re-writes from its last flushed position.

        qemu-nbd killed with SIGKILL loses what it had not flushed (the QCOW2
        L2 cache lives in its memory); QCOW2 writes refcounts before the L2
        entries that use them, so the file stays consistent but may have
        leaked clusters (allocated, referenced by nothing). ``qemu-img check
        -r leaks`` frees them (refcounts only, never data; a few ms for a
        partial file's metadata) and refuses a corrupt file, which fails the
        job instead of serving it. The data after the last flush is written
        again by the mover. Raises JobFailed when it cannot.
        """
        attempt = self._restarts.get(backup_id, 0) + 1
        limit = self.settings.nbd_target_restarts
        with self.db.session() as s:
            b = BackupStore(s).get(backup_id)
            assert b is not None
            path, port, export, disk_key = b.file_path, b.nbd_port, b.nbd_export_name, b.disk_key
            backup_type = b.backup_type
            old_pid = b.nbd_pid
            key = keystore.key_of_repository(s, self.settings, b.repository_id)
        what = f"the NBD target of disk {disk_key} (qemu-nbd pid {old_pid})"
        if attempt > limit:
            raise JobFailed(
                f"{what} stopped {attempt} times; given up after {limit} restarts "
                "(SENDENSE_NBD_TARGET_RESTARTS)"
            )
        if port is None or not export:
            raise JobFailed(f"{what} stopped and its port is not on record")
        tls_dir = None
        if self.settings.nbd_tls:
            tls_dir = str(self._tls_dir(backup_id))
            if not (Path(tls_dir) / psk.SERVER_FILE).exists():
                raise JobFailed(f"{what} stopped and its TLS key is gone")
        old = self._servers.pop(backup_id, None)
        if old is not None:
            old.stop()  # reaps the dead process, drops its pidfile
        self._adopted_pids.pop(backup_id, None)
        started = time.monotonic()
        while True:
            self._restarts[backup_id] = attempt
            try:
                img.repair_leaks(path, key=key)
            except Error as e:
                raise JobFailed(f"{what} stopped and left a damaged file: {e}") from e
            server = self._target_server(backup_id, path, port, export, tls_dir, key, backup_type)
            self._servers[backup_id] = server
            try:
                server.start()  # on failure it leaves no process behind
                break
            except Error as e:  # killed again while starting, port taken, ...
                self._servers.pop(backup_id, None)
                attempt += 1
                if attempt > limit:
                    raise JobFailed(
                        f"{what} stopped {attempt} times; given up after {limit} restarts "
                        f"(SENDENSE_NBD_TARGET_RESTARTS): {e.message}"
                    ) from e
                time.sleep(0.2)
        took = time.monotonic() - started
        note = (
            f"{what} stopped; served again on port {port} (restart {attempt} of {limit}, "
            f"{took:.1f}s); the node re-copies from its last flushed position"
        )
        log.warning("job=%s backup=%s %s", job_id, backup_id, note)
        now = datetime.now(UTC)
        with self.db.session() as s:
            b = BackupStore(s).get(backup_id)
            assert b is not None
            b.nbd_pid = server.pid
            job = JobStore(s).get(job_id)
            assert job is not None
            messages = dict(job.messages or {})
            messages["hub"] = [*messages.get("hub", []), f"{now:%H:%M:%S} {note}"]
            job.messages = messages
            retry = {
                "reason": f"{what} stopped; served again",
                "attempt": attempt,
                "since": now.isoformat(),
                "deadline": None,
            }
            self._hub_retry[job_id] = (retry, time.monotonic() + HUB_RETRY_SHOWN)
            if job.status == "running":
                job.step = "retrying"
                job.progress = {**(job.progress or {}), "retry": retry}

    def _keep_targets(self, job_id: str) -> None:
        """Serve again the job's targets whose qemu-nbd died (not while the
        job is being finished: then they are stopped on purpose)."""
        if job_id in self._finishing:
            return
        for backup_id in self._dead_targets(job_id):
            if job_id in self._finishing:
                return
            self._reserve_target(job_id, backup_id)

    def _follow(self, job_id: str, client: NodeClient) -> None:
        """Start the monitor thread that follows a job on its node to the end."""
        cancel = threading.Event()
        self._cancel[job_id] = cancel
        t = threading.Thread(
            target=self._monitor,
            args=(job_id, client, cancel),
            name=f"job-{job_id[:8]}",
            daemon=True,
        )
        self._threads[job_id] = t
        t.start()

    # ---------------------------------------------------------------- monitor

    def _monitor(self, job_id: str, client: NodeClient, cancel: threading.Event) -> None:
        started = last_ok = time.monotonic()
        last_write = 0.0
        last_step = ""
        cancel_sent = False
        try:
            while not self._stopping.is_set():
                if not cancel.is_set() and self.lifecycle.cancel_requested(job_id):
                    cancel.set()  # asked through another hub process, or before we ran
                if cancel.is_set() and not cancel_sent:
                    cancel_sent = True
                    try:
                        client.cancel(job_id)
                    except Error as e:
                        log.warning("job=%s cancel on node failed: %s", job_id, e.message)
                        self._finish(
                            job_id, None, "cancelled", "cancelled by user (node unreachable)"
                        )
                        return
                try:
                    st = report_of(client.status(job_id))
                    last_ok = time.monotonic()
                except NodeUnreachable as e:
                    if time.monotonic() - last_ok > self.settings.node_timeout:
                        self._finish(
                            job_id,
                            None,
                            "failed",
                            f"node unreachable for more than {self.settings.node_timeout:.0f}s: "
                            f"{e.message}",
                            code="node_unreachable",
                        )
                        with contextlib.suppress(Error):
                            client.cancel(job_id)
                        return
                    time.sleep(self.settings.poll_interval)
                    continue
                except Error as e:
                    self._finish(
                        job_id, None, "failed", f"node status failed: {e.message}", code=e.code
                    )
                    return
                status: str = st.status
                if status == "failed" and cancel_sent:
                    # Stopped on our request (user cancel or timeout): what
                    # the node saw while stopping is not the job's reason.
                    status = "cancelled"
                    st.error = JobError(code="cancelled", message="cancelled by user")
                if status in TERMINAL:
                    err = st.error
                    self._finish(
                        job_id,
                        st,
                        status,
                        err.message if err else None,
                        code=err.code if err else None,
                    )
                    return
                if not cancel.is_set():
                    try:
                        self._keep_targets(job_id)
                    except Error as e:
                        self._finish(job_id, None, "failed", e.message, code="target_lost")
                        with contextlib.suppress(Error):
                            client.cancel(job_id)
                        return
                now = time.monotonic()
                # At most twice a second, and at once when the step changes
                # (a short "retrying" must show).
                if now - last_write >= 0.5 or st.step != last_step:
                    last_write, last_step = now, st.step
                    if self._update_progress(job_id, st):
                        # The job timed out.
                        cancel.set()
                time.sleep(self._poll_delay(st, now - started))
        except Exception as e:  # a bug: never leave a job running
            log.exception("job=%s monitor crashed", job_id)
            self._finish(job_id, None, "failed", f"internal error: {e}", code="internal_error")

    def _poll_delay(self, st: JobStatusReport, elapsed: float) -> float:
        """Seconds until the next status call to the node.

        The end of a job is seen at the first poll after it: on average half
        the delay late, and every job pays it. A fixed 0.1 s cost a 1 %
        incremental (0.5-0.7 s end to end) 64 ms median from the worker's
        end to the hub's finish; 0.02 s cost 9 ms (bench/launch_bench.py).
        So the delay grows with the job's age (a tenth of it, from
        FAST_POLL up to ``poll_interval``): a short job is seen ending within
        a few percent of its time, a long one is polled as before, and the
        extra calls per job are bounded (~16, all in its first second). Also
        fast when the node says the end is near (its ETA at most twice the
        interval, or it is releasing the VM); never while it retries a
        connection.
        """
        base = self.settings.poll_interval
        fast = min(base, FAST_POLL)
        if st.step == "retrying":
            return base
        if st.step == "releasing":
            return fast
        etas = [d.eta for d in st.disks.values() if d.status == "running" and d.eta is not None]
        if etas and max(etas) <= 2 * base:  # the worker reports every 0.2 s
            return fast
        return max(fast, min(base, elapsed / 10))

    def _update_progress(self, job_id: str, st: JobStatusReport) -> bool:
        with self.db.session() as s:
            job = JobStore(s).get(job_id)
            if job is None or job.status != "running":
                return False
            job.step = st.step or job.step
            progress = progress_of(st)
            retry = retry_of(st)
            hub = self._hub_retry.get(job_id)
            if hub is not None:
                if retry is not None or time.monotonic() > hub[1]:
                    self._hub_retry.pop(job_id, None)  # the node's own now, or over
                else:
                    retry = hub[0]
                    job.step = "retrying"
            if retry is not None:
                progress["retry"] = retry
            job.progress = progress
            if st.messages:
                job.messages = {**(job.messages or {}), "node": st.messages}
            timeout_at = job.timeout_at
            if timeout_at and datetime.now(UTC) > timeout_at:
                job.error_code = "timeout"
                job.error_message = self._timeout_message()
                return True
        return False

    def _timeout_message(self) -> str:
        return (
            f"job ran past its timeout of {self.settings.job_timeout:g}s "
            "(SENDENSE_JOB_TIMEOUT); it was stopped and its partial files removed"
        )

    # ----------------------------------------------------------------- finish

    def _finish(
        self,
        job_id: str,
        st: JobStatusReport | None,
        status: str,
        message: str | None,
        *,
        code: str | None = None,
    ) -> None:
        """End a job: stop its exports, release ports, then either record the
        restore points or remove their files.

        Three steps, so that slow I/O never runs inside a transaction: read
        what is needed, do the file work with no session open, then write the
        outcome with a status change conditional on the job still being ours
        and active.
        """
        with self._finishing_lock:
            lock = self._finishing.setdefault(job_id, threading.Lock())
        with lock:
            self._finish_locked(job_id, st, status, message, code)
        with self._finishing_lock:
            self._finishing.pop(job_id, None)

    def _finish_locked(
        self,
        job_id: str,
        st: JobStatusReport | None,
        status: str,
        message: str | None,
        code: str | None,
    ) -> None:
        t0 = time.monotonic()
        with self.db.session() as s:
            job = JobStore(s).get(job_id)
            assert job is not None
            if job.status in TERMINAL:
                return
            if job.error_code == "timeout" and status == "cancelled":
                status, code, message = "failed", "timeout", self._timeout_message()
            vm_name = job.vm.name if job.vm else ""
            targets = [_Target.of(b, BackupStore(s)) for b in job.backups]
            messages = dict(job.messages or {})
        t1 = time.monotonic()
        # All targets told to stop first: their exits overlap.
        for t in targets:
            self._signal_target(t.backup_id)
        for t in targets:
            self._stop_target(t.backup_id, t.nbd_pid, t.nbd_port)
        t2 = time.monotonic()
        disks = st.disks if st else {}
        if status == "completed":
            try:
                for t in targets:
                    self._record_files(job_id, vm_name, t, disks.get(str(t.disk_key)))
            except Exception as e:
                log.exception("job=%s finishing failed", job_id)
                status = "failed"
                code = e.code if isinstance(e, Error) else "finish_failed"
                message = f"restore point check failed: {getattr(e, 'message', e)}"
        if status != "completed":
            for t in targets:
                layout.remove_backup_files(Path(t.file_path))
        t3 = time.monotonic()
        now = datetime.now(UTC)
        values: dict[str, Any] = {"finished_at": now, "step": status}
        if status != "completed":
            values.update(error_code=code or status, error_message=message or status)
        if st and disks:
            values["progress"] = progress_of(st)
        if st and st.messages:
            messages["node"] = st.messages
        if messages:
            values["messages"] = messages
        with self.db.session() as s:
            for t in targets:
                b = BackupStore(s).get(t.backup_id)
                assert b is not None
                if status == "completed":
                    t.apply(b)
                else:
                    b.status = "failed" if status == "failed" else "cancelled"
                    b.error = message
                    b.finished_at = now
                    b.change_id = None
                    b.digest = None
        if status == "completed":
            # The lock is in the catalog; now the files (where the filesystem
            # allows). A crash before this: the lock sweeper sets them.
            for t in targets:
                if t.immutable_until is not None:
                    immutability.lock_point(t.file_path)
        t4 = time.monotonic()
        # After the backup rows: a waiter woken by the job's end reads them.
        if not self.lifecycle.transition(job_id, status, **values):
            log.warning("job=%s was finished elsewhere; status %s not written", job_id, status)
        t5 = time.monotonic()
        log.info(
            "job=%s status=%s error=%s (finished in %.3fs: read %.3f, targets stopped %.3f, "
            "files %.3f, records %.3f, status %.3f)",
            job_id,
            status,
            message,
            t5 - t0,
            t1 - t0,
            t2 - t1,
            t3 - t2,
            t4 - t3,
            t5 - t4,
        )
        self._cancel.pop(job_id, None)
        self._threads.pop(job_id, None)
        self._hub_retry.pop(job_id, None)
        for backup_id in self._job_targets.pop(job_id, []):
            self._restarts.pop(backup_id, None)
            self._adopted_pids.pop(backup_id, None)

    def _record_files(self, job_id: str, vm_name: str, t: _Target, disk: DiskStatus | None) -> None:
        """Check one finished target and write its sidecar; fills ``t``'s outcome."""
        path = Path(t.file_path)
        with self.db.session() as s:
            key = keystore.key_of_repository(s, self.settings, t.repository_id)
        if disk is None or not disk.change_id or not disk.digest:
            raise JobFailed(f"node reported no change id/digest for disk {t.disk_key}")
        if t.backup_type == "incremental" and disk.mode == "full":
            # The node could not use the change id and read the whole disk into
            # this target: every cluster is written (data or zero), so it no
            # longer needs its backing file. Make it a full.
            img.rebase(str(path), "", key=key)
            t.backup_type = "full"
            t.parent_id = None
            t.parent_file = None
            t.previous_change_id = None
            # ... and name it as one (layout: <stamp>-full.qcow2), or the
            # repository shows an "-incr" file with no backing file. The export
            # is stopped and nothing refers to the file yet; its sidecar is
            # written below, under the new name.
            full_path = path.with_name(path.name.removesuffix("-incr.qcow2") + "-full.qcow2")
            if full_path != path and not full_path.exists():
                os.rename(path, full_path)
                path = full_path
                t.file_path = str(full_path)
        if self._restarts.get(t.backup_id):
            # Served again after its qemu-nbd died mid-copy: clusters the dead
            # process had allocated but not yet referenced are freed before it
            # was served again, yet a bench run (4 GiB, target killed at 44 %)
            # still ended with one such leak at the final check. A leak is
            # wasted space only (reads are unaffected, and the node's digest
            # and the tests' qemu-img compare cover the data), so a resumed
            # target has its leaks freed again rather than fail the backup.
            img.repair_leaks(str(path), key=key)
        img.check(str(path), key=key)
        t.change_id = disk.change_id
        t.digest = disk.digest
        t.bytes_transferred = int(disk.data_bytes or disk.bytes_done or 0)
        t.finished_at = datetime.now(UTC)
        layout.write_sidecar(path, t.sidecar(job_id, vm_name))
        t.size_on_disk = img.disk_usage(str(path))

    def _signal_target(self, backup_id: str) -> None:
        """SIGTERM to a target's qemu-nbd started by this process (it flushes
        and exits); `_stop_target` then waits for it."""
        server = self._servers.get(backup_id)
        proc = server.proc if server is not None else None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def _stop_target(self, backup_id: str, nbd_pid: int | None, nbd_port: int | None) -> None:
        server = self._servers.pop(backup_id, None)
        if server is not None:
            if server.proc is not None:
                wait_exit(server.proc)
            try:
                server.stop()
            except Exception:
                log.exception("backup=%s stopping qemu-nbd failed", backup_id)
        elif nbd_pid:
            stop_pid(nbd_pid)
        else:
            # Started by a hub process that died before recording its pid
            # (the launch records ports and pids after the targets are up):
            # its pidfile names it (stop_pid kills only a qemu-nbd).
            with contextlib.suppress(ValueError, OSError):
                stop_pid(int((self.run_dir / f"nbd-{backup_id}.pid").read_text().strip()))
        Path(self.run_dir / f"nbd-{backup_id}.pid").unlink(missing_ok=True)
        psk.remove_dir(self._tls_dir(backup_id))  # after qemu-nbd: it reads it per handshake
        self.ports.release(self._ports.pop(backup_id, None) or nbd_port)

    def _tls_dir(self, backup_id: str) -> Path:
        """The folder of a target's TLS key (qemu-nbd's tls-creds-psk ``dir``)."""
        return self.run_dir / f"tls-{backup_id}"

    def _fail(self, job_id: str, e: Exception) -> None:
        code = e.code if isinstance(e, Error) else "internal_error"
        message = e.message if isinstance(e, Error) else f"{type(e).__name__}: {e}"
        if not isinstance(e, Error):
            log.exception("job=%s launch failed", job_id)
        self._finish(job_id, None, "failed", message, code=code)

    # ----------------------------------------------------------------- cancel

    def cancel(self, job_id: str) -> None:
        """Ask for a cancel. The owning hub process acts on it (this one at once)."""
        if dispatch.cancel_queued(self.db, self.lifecycle, job_id):
            return  # it was still queued: nothing ran, nothing on disk
        with self.db.session() as s:
            job = JobStore(s).get(job_id)
            if job is None:
                raise NotFound(f"job {job_id} not found")
            if job.status in TERMINAL:
                return
            ours = job.owner == self.lifecycle.owner
        self.lifecycle.request_cancel(job_id)
        if not ours:
            return  # its owner's monitor sees the request in the catalog
        ev = self._cancel.get(job_id)
        if ev is None:
            self._finish(job_id, None, "cancelled", "cancelled by user")
            return
        ev.set()

    # ---------------------------------------------------------------- recover

    def recover(self, *, sweep_pidfiles: bool = True) -> list[str]:
        """Resolve jobs a previous hub process left running; stop orphan exports.

        A job whose node still runs it (copying, or reconnecting: step
        "retrying") is adopted: its ports are held again, targets whose
        qemu-nbd died with the old hub are served again on the same port,
        export name and TLS key (`_reserve_target`), and a monitor follows it
        to the end; the node's mover re-copies from its last flushed position.
        A job the node finished while the hub was down is finished now
        (targets stopped and flushed, restore points checked and recorded).
        Anything else is failed with a reason and its partial files removed.
        """
        resolved = []
        adopted: set[str] = set()
        # Job id -> the host its dead owner ran on ("host/pid/instance").
        old_hosts = {
            job_id: (old or "").partition("/")[0]
            for job_id, kind, old in self.lifecycle.orphans()
            if kind == "backup" and self.lifecycle.take_over(job_id, old)
        }
        mine = list(old_hosts)
        with self.db.session() as s:
            todo = []
            for job_id in mine:
                j = JobStore(s).get(job_id)
                assert j is not None and j.vm is not None
                todo.append(
                    (j.id, j.vm.source.node, [(b.id, b.nbd_pid, b.nbd_port) for b in j.backups])
                )
        for job_id, node, targets in todo:
            if not targets and dispatch.requeue_unplanned(self.db, self.lifecycle, job_id):
                # Claimed from the queue by a hub that died before planning
                # it: nothing ran, nothing on disk; any hub claims it again.
                resolved.append(job_id)
                continue
            client = node_client(node, self.secrets)
            try:
                st: JobStatusReport | None = report_of(client.status(job_id))
            except Error as e:
                log.warning("job=%s node status after restart failed: %s", job_id, e.message)
                st = None
            state = st.status if st else None
            if state == "completed":
                log.warning("job=%s finished on the node while the hub was down", job_id)
                self._finish(job_id, st, "completed", None)
                adopted.update(b for b, _, _ in targets)
            elif (
                state in ("running", "pending")
                and (why := self._adopt(job_id, targets, old_hosts[job_id])) is None
            ):
                log.warning("job=%s still running on the node: adopted", job_id)
                adopted.update(b for b, _, _ in targets)
                self._follow(job_id, client)
            else:
                log.warning("job=%s left running by a previous hub process: failing it", job_id)
                if state in ("running", "pending"):
                    reason = f"its NBD targets could not be served again: {why}"
                else:
                    reason = "its node no longer runs it"
                with contextlib.suppress(Error):
                    client.cancel(job_id)
                self._finish(
                    job_id,
                    None,
                    "failed",
                    f"the hub restarted while this job was running and could not take it "
                    f"back ({reason}); partial files were removed",
                    code="hub_restarted",
                )
            resolved.append(job_id)
        if not sweep_pidfiles:
            return resolved
        with self.db.session() as s:
            # Targets of jobs that are still active are not orphans.
            live = set(
                s.scalars(
                    select(Backup.id).join(BackupJob).where(BackupJob.status.in_(ACTIVE))
                ).all()
            )
        for pidfile in self.run_dir.glob("nbd-*.pid"):
            if pidfile.stem.removeprefix("nbd-") in adopted | live:
                continue
            with contextlib.suppress(ValueError, OSError):
                stop_pid(int(pidfile.read_text().strip()))
            pidfile.unlink(missing_ok=True)
        # Keys of targets that are gone (their server stopped just above, or
        # never started).
        for tls_dir in self.run_dir.glob("tls-*"):
            if tls_dir.name.removeprefix("tls-") not in adopted | live:
                psk.remove_dir(tls_dir)
        return resolved

    def _adopt(
        self, job_id: str, targets: list[tuple[str, int | None, int | None]], old_host: str
    ) -> str | None:
        """Take back the targets of a job a dead hub process left running:
        their ports held again, live qemu-nbd processes kept, dead ones (gone
        with the old hub, as systemd stops a service's whole cgroup) served
        again on the same port and key. None when done, else why not.

        Only a hub on the host the targets ran on can: their pids are that
        host's, and the node dials that host's address."""
        if not targets:
            return "the job has no targets"
        if old_host and old_host != socket.gethostname():
            return f"they were served by the hub on host {old_host}"
        for backup_id, _, port in targets:
            if port is None:
                return "a target's port is not on record"
            self.ports.reserve(port, backup_id=backup_id)
            self._ports[backup_id] = port
            self._job_targets.setdefault(job_id, []).append(backup_id)
        for backup_id, pid, _ in targets:
            if pid and is_qemu_nbd(pid):
                self._adopted_pids[backup_id] = pid
                continue
            try:
                self._reserve_target(job_id, backup_id)
            except Error as e:
                return e.message
        return None

    def shutdown(self) -> None:
        """Stop monitoring (the hub is exiting); jobs are resolved at next start."""
        self._stopping.set()
        self.lifecycle.shutdown()
        for t in list(self._threads.values()):
            t.join(timeout=2)


_io_uring: dict[str, bool] = {}


def io_uring_ok(run_dir: Path) -> bool:
    """Whether qemu can use io_uring in this process's environment (kernel,
    seccomp profile, qemu build): ``qemu-io --aio=io_uring`` reads a scratch
    file once per process; False on any failure."""
    if "ok" not in _io_uring:
        probe = run_dir / f".io-uring-probe-{os.getpid()}"
        try:
            probe.write_bytes(bytes(4096))
            r = subprocess.run(
                ["qemu-io", "-f", "raw", "--aio=io_uring", "-c", "read 0 4096", str(probe)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            _io_uring["ok"] = r.returncode == 0 and "read 4096/4096" in r.stdout
            if not _io_uring["ok"]:
                log.info("io_uring not usable here (targets use native AIO): %s", r.stderr.strip())
        except (OSError, subprocess.SubprocessError) as e:
            _io_uring["ok"] = False
            log.info("io_uring probe failed (targets use native AIO): %s", e)
        finally:
            probe.unlink(missing_ok=True)
    return _io_uring["ok"]


def wait_exit(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Wait until a child process has exited (not reaped), woken by its exit.

    ``Popen.wait(timeout=)`` polls with sleeps doubling up to 50 ms: measured,
    a target's qemu-nbd exits 33 ms after SIGTERM and was seen after 65-70 ms,
    on every job. A pidfd becomes readable the moment the process exits.
    Without one (Linux < 5.3) or past ``timeout`` this returns and the
    caller's own wait (QemuNbdServer.stop: SIGTERM, then SIGKILL) goes on.
    """
    if proc.poll() is not None:
        return
    try:
        fd = os.pidfd_open(proc.pid)
    except (OSError, AttributeError):
        return
    try:
        poller = select_module.poll()
        poller.register(fd, select_module.POLLIN)
        poller.poll(timeout * 1000)
    finally:
        os.close(fd)


@dataclass
class _NewTarget:
    """One target being brought up at launch: read from its row in a short
    session, then filled by the file and process work with no session open."""

    backup_id: str
    disk_key: str
    file_path: str
    backup_type: str
    total_bytes: int
    parent_file: str | None
    parent_change_id: str | None
    export: str
    port: int | None = None
    pid: int | None = None
    tls: NbdTlsKey | None = None

    @classmethod
    def of(cls, b: Backup, backups: BackupStore) -> _NewTarget:
        parent = backups.get(b.parent_id) if b.parent_id else None
        if b.backup_type == "incremental" and parent is None:
            raise JobFailed(f"the parent of restore point {b.id} is gone")
        return cls(
            backup_id=b.id,
            disk_key=str(b.disk_key),
            file_path=b.file_path,
            backup_type=b.backup_type,
            total_bytes=b.total_bytes,
            parent_file=parent.file_path if parent else None,
            parent_change_id=parent.change_id if parent else None,
            export=f"sendense-{b.id}",
        )


@dataclass
class _Target:
    """One restore point being finished: read from its row in a short session,
    completed by file work outside any transaction, then written back."""

    backup_id: str
    disk_index: int
    disk_key: int
    file_path: str
    backup_type: str
    parent_id: str | None
    parent_file: str | None
    previous_change_id: str | None
    repository_id: str
    vm_id: str
    total_bytes: int
    tags: dict[str, Any]
    created_at: datetime
    nbd_pid: int | None
    nbd_port: int | None
    change_id: str | None = None
    digest: str | None = None
    bytes_transferred: int = 0
    size_on_disk: int = 0
    finished_at: datetime | None = None
    # Immutable repositories: created_at + retention_days (engine/locks.py).
    immutable_until: datetime | None = None

    @classmethod
    def of(cls, b: Backup, backups: BackupStore) -> _Target:
        parent = backups.get(b.parent_id) if b.parent_id else None
        return cls(
            backup_id=b.id,
            disk_index=b.disk_index,
            disk_key=b.disk_key,
            file_path=b.file_path,
            backup_type=b.backup_type,
            parent_id=b.parent_id,
            parent_file=parent.file_path if parent else None,
            previous_change_id=b.previous_change_id,
            repository_id=b.repository_id,
            vm_id=b.vm_id,
            total_bytes=b.total_bytes,
            tags=dict(b.tags or {}),
            created_at=b.created_at,
            nbd_pid=b.nbd_pid,
            nbd_port=b.nbd_port,
            immutable_until=lock_end(b.repository, b.created_at),
        )

    def sidecar(self, job_id: str, vm_name: str) -> dict[str, Any]:
        assert self.finished_at is not None
        return {
            "backup_id": self.backup_id,
            "job_id": job_id,
            "vm_name": vm_name,
            "vm_context_id": self.vm_id,
            "repository_id": self.repository_id,
            "disk_id": self.disk_index,
            "disk_key": self.disk_key,
            "capacity_bytes": self.total_bytes,
            "backup_type": self.backup_type,
            "parent_backup_id": self.parent_id,
            "backing_file": os.path.basename(self.parent_file) if self.parent_file else None,
            "change_id": self.change_id,
            "digest": self.digest,
            "total_bytes": self.total_bytes,
            "bytes_transferred": self.bytes_transferred,
            "created_at": self.created_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
            "immutable_until": self.immutable_until.isoformat() if self.immutable_until else None,
            "tags": self.tags,
        }

    def apply(self, b: Backup) -> None:
        b.status = "completed"
        b.backup_type = self.backup_type
        b.parent_id = self.parent_id
        b.previous_change_id = self.previous_change_id
        b.file_path = self.file_path
        b.change_id = self.change_id
        b.digest = self.digest
        b.bytes_transferred = self.bytes_transferred
        b.size_on_disk = self.size_on_disk
        b.finished_at = self.finished_at
        b.immutable_until = self.immutable_until
