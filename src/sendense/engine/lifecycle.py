"""The life of a job, whatever its kind: claim, run, finish, recover.

Every job is a row in ``backup_jobs`` with an owner and a lease::

    pending ──► running ──► completed | failed | cancelled
       │                      ▲
       └──────────────────────┘  (failed or cancelled before it ran)

- **Owner and lease.** The hub process that creates a job owns it
  (``owner`` = ``host/pid/instance``) and renews ``lease_until`` while it runs.
  Only the owner finishes, cancels or recovers a job. Another hub process may
  take a job over only when its lease has expired, or, on the same host, when
  the owner's process is gone (a hub restarted after a crash).
- **Conditional status writes.** Every status change is one
  ``UPDATE ... WHERE id = :id AND status IN (:from) AND owner = :me``; a write
  that matches no row did not happen. A ``cancelled`` job never becomes
  ``running`` again, and two finishers never both win.
- **Queued jobs have no owner.** A backup waiting for a slot on its node
  (``pending``, step ``queued``, owner NULL; engine/dispatch.py) runs
  nothing: `orphans` leaves it out, and the hub that claims it becomes its
  owner then.
- **Cancel crosses processes.** `request_cancel` only sets
  ``cancel_requested_at``; the owner's runner sees it and stops.
- **No slow I/O in a transaction.** Callers read what they need in a short
  session, do the slow work (stop qemu-nbd, ``qemu-img check``, merge) with no
  session open and no global lock held, then write the outcome conditionally.

Jobs that run in the hub itself (consolidate, verify, rescan) implement
`LocalJob`: ``execute`` does the work from the job's ``params`` (the plan,
written when the job was created, so a dry run is the same plan unexecuted),
and ``recover`` rolls a crashed run forward or back at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import and_, delete, not_, or_, select, update

from sendense.catalog.db import Database
from sendense.catalog.models import BackupHold, BackupJob
from sendense.core.errors import Cancelled, Error
from sendense.engine import hubs

log = logging.getLogger(__name__)

ACTIVE = ("pending", "running")
TERMINAL = ("completed", "failed", "cancelled")
# A backup job waiting for a slot on its node (engine/dispatch.py): pending,
# this step, and no owner: it runs nothing, so it is no orphan.
QUEUED_STEP = "queued"


def queued_clause(model: Any = BackupJob) -> Any:
    """SQL: the job is queued (engine/dispatch.py). ``model``: an alias."""
    return and_(
        model.kind == "backup",
        model.status == "pending",
        model.owner.is_(None),
        model.step == QUEUED_STEP,
    )


def new_owner() -> str:
    """This hub process's identity: host, pid and a random instance id."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def owner_is_dead(
    owner: str | None,
    seen: Mapping[str, hubs.Seen] | None = None,
    lease: timedelta = timedelta(seconds=30),
) -> bool:
    """True when ``owner`` was a hub process that no longer runs.

    On this host ``/proc`` tells at once: the pid alone could have been
    reused, but the instance id makes ``owner`` unique, and a live process of
    that pid that is not a hub cannot be it. Another host's owner is dead when
    its row in ``hubs`` (``seen``, engine/hubs.py) says it stopped, or its
    heartbeat is older than ``lease``; without a row, only its job leases
    tell (False here).
    """
    if not owner:
        return True
    return bool(hubs.is_dead(owner, (seen or {}).get(owner), lease))


class JobContext:
    """What a running local job sees: progress reports and the cancel flag."""

    def __init__(self, lifecycle: JobLifecycle, job_id: str) -> None:
        self.lifecycle = lifecycle
        self.job_id = job_id
        self._last_write = 0.0
        self._cancelled = False

    def progress(
        self, step: str, *, done: int | None = None, total: int | None = None, force: bool = False
    ) -> None:
        """Record the current step (and bytes done/total), at most twice a second."""
        now = time.monotonic()
        if not force and now - self._last_write < 0.5:
            return
        self._last_write = now
        progress = {} if done is None else {"bytes_done": done, "bytes_total": total or 0}
        with self.lifecycle.db.session() as s:
            s.execute(
                update(BackupJob)
                .where(BackupJob.id == self.job_id, BackupJob.status == "running")
                .values(step=step[:100], progress={"job": progress} if progress else {})
            )

    def cancelled(self) -> bool:
        """True once a cancel was asked (checked in the catalog, any hub)."""
        if not self._cancelled:
            self._cancelled = self.lifecycle.cancel_requested(self.job_id)
        return self._cancelled

    def check_cancel(self) -> None:
        if self.cancelled():
            raise Cancelled("cancelled by user")


class LocalJob(Protocol):
    """A kind of job the hub runs itself."""

    kind: str

    def execute(self, job_id: str, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        """Do the work; return the job's result. Raise `Cancelled` to stop."""
        ...

    def recover(self, job_id: str, params: dict[str, Any]) -> None:
        """A run of this job died with its hub: make the catalog and files whole."""
        ...

    def on_end(self, job_id: str, params: dict[str, Any], status: str) -> None:
        """After the final status is written (holds are already dropped)."""
        ...


@dataclass
class _Waiters:
    """Coroutines waiting for a job's end, each with its event loop."""

    loops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)


class JobLifecycle:
    def __init__(self, db: Database, *, lease_seconds: float = 30.0, owner: str = "") -> None:
        self.db = db
        self.owner = owner or new_owner()
        self.lease = timedelta(seconds=lease_seconds)
        self.kinds: dict[str, LocalJob] = {}
        self._waiters: dict[str, _Waiters] = {}
        self._waiters_lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._stopping = threading.Event()
        self._renewer: threading.Thread | None = None
        # Called with the job id after a job of this process ended (the
        # dispatcher: a slot may be free).
        self.on_end: list[Callable[[str], Any]] = []

    # ------------------------------------------------------------- ownership

    def lease_until(self) -> datetime:
        return datetime.now(UTC) + self.lease

    def claim_fields(self) -> dict[str, Any]:
        """Columns of a new job row this process owns."""
        return {"owner": self.owner, "lease_until": self.lease_until()}

    def start_renewing(self, on_tick: Callable[[], Any] | None = None) -> None:
        """Renew this process's leases every third of the lease, then call
        ``on_tick`` (the hub takes over jobs whose owner died meanwhile)."""

        def loop() -> None:
            while not self._stopping.wait(self.lease.total_seconds() / 3):
                try:
                    self.renew()
                    if on_tick is not None:
                        on_tick()
                except Exception:
                    log.exception("lease renewal failed")

        self._renewer = threading.Thread(target=loop, name="lease-renewer", daemon=True)
        self._renewer.start()

    def renew(self) -> int:
        with self.db.session() as s:
            result = s.execute(
                update(BackupJob)
                .where(BackupJob.owner == self.owner, BackupJob.status.in_(ACTIVE))
                .values(lease_until=self.lease_until())
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def orphans(self) -> list[tuple[str, str, str | None]]:
        """(job id, kind, old owner) of active jobs no live hub owns."""
        now = datetime.now(UTC)
        with self.db.session() as s:
            rows = s.execute(
                select(BackupJob.id, BackupJob.kind, BackupJob.owner, BackupJob.lease_until).where(
                    BackupJob.status.in_(ACTIVE),
                    or_(BackupJob.owner.is_(None), BackupJob.owner != self.owner),
                    not_(queued_clause()),  # queued: runs nothing, any hub claims it
                )
            ).all()
            # Other hosts' owners: their heartbeats in the registry.
            seen = hubs.seen(s, {owner for _, _, owner, _ in rows}) if rows else {}
        return [
            (job_id, kind, owner)
            for job_id, kind, owner, lease in rows
            if lease is None or lease < now or owner_is_dead(owner, seen, self.lease)
        ]

    def take_over(self, job_id: str, old_owner: str | None) -> bool:
        """Become the owner of an orphaned job; False if another hub got it first."""
        with self.db.session() as s:
            q = update(BackupJob).where(BackupJob.id == job_id, BackupJob.status.in_(ACTIVE))
            q = q.where(
                BackupJob.owner.is_(None) if old_owner is None else BackupJob.owner == old_owner
            )
            result = s.execute(q.values(owner=self.owner, lease_until=self.lease_until()))
            return bool(getattr(result, "rowcount", 0))

    # ---------------------------------------------------------------- status

    def transition(
        self, job_id: str, to: str, *, allowed_from: Iterable[str] = ACTIVE, **values: Any
    ) -> bool:
        """Set the job's status if it is in ``allowed_from`` and ours; True if done."""
        if to in TERMINAL:
            values.setdefault("finished_at", datetime.now(UTC))
            values.setdefault("step", to)
        if to == "running":
            values.setdefault("started_at", datetime.now(UTC))
        with self.db.session() as s:
            result = s.execute(
                update(BackupJob)
                .where(
                    BackupJob.id == job_id,
                    BackupJob.status.in_(tuple(allowed_from)),
                    BackupJob.owner == self.owner,
                )
                .values(status=to, **values)
            )
            done = bool(getattr(result, "rowcount", 0))
            if done and to in TERMINAL:
                s.execute(delete(BackupHold).where(BackupHold.holder_id == job_id))
        if done and to in TERMINAL:
            self.notify(job_id)
            self.ended(job_id)
        return done

    def ended(self, job_id: str) -> None:
        """Tell the ``on_end`` listeners that a job ended."""
        for listener in list(self.on_end):
            try:
                listener(job_id)
            except Exception:
                log.exception("job=%s end listener failed", job_id)

    def request_cancel(self, job_id: str) -> bool:
        """Ask for a cancel (any hub); False when the job has already ended."""
        with self.db.session() as s:
            result = s.execute(
                update(BackupJob)
                .where(BackupJob.id == job_id, BackupJob.status.in_(ACTIVE))
                .values(cancel_requested_at=datetime.now(UTC))
            )
            return bool(getattr(result, "rowcount", 0))

    def cancel_requested(self, job_id: str) -> bool:
        with self.db.session() as s:
            at = s.scalar(select(BackupJob.cancel_requested_at).where(BackupJob.id == job_id))
            return at is not None

    # ----------------------------------------------------------- local jobs

    def register(self, job: LocalJob) -> None:
        self.kinds[job.kind] = job

    def new_local_job(
        self,
        s: Any,
        kind: str,
        params: dict[str, Any],
        *,
        vm_id: str | None = None,
        repository_id: str | None = None,
        created_by: str = "admin",
        holds: Iterable[str] = (),
        step: str = "queued",
        tags: dict[str, Any] | None = None,
    ) -> BackupJob:
        """Insert a pending local job and its holds in the caller's transaction.

        Start it with `launch` after the transaction commits. ``tags``: what
        the job belongs to (e.g. the policy and run that started it).
        """
        if kind not in self.kinds:
            raise Error(f"unknown job kind {kind}")
        now = datetime.now(UTC)
        job = BackupJob(
            kind=kind,
            vm_id=vm_id,
            repository_id=repository_id,
            node_id=None,
            status="pending",
            step=step,
            requested_type=kind,
            params=params,
            tags=dict(tags or {}),
            created_by=created_by,
            created_at=now,
            **self.claim_fields(),
        )
        s.add(job)
        s.flush()
        for backup_id in dict.fromkeys(holds):
            s.add(BackupHold(backup_id=backup_id, holder_type="job", holder_id=job.id))
        return job

    def launch(self, job_id: str) -> None:
        """Run a pending local job in a thread of this process."""
        t = threading.Thread(
            target=self._run_local, args=(job_id,), name=f"job-{job_id[:8]}", daemon=True
        )
        self._threads[job_id] = t
        t.start()

    def _run_local(self, job_id: str) -> None:
        with self.db.session() as s:
            job = s.get(BackupJob, job_id)
            if job is None:
                return
            kind, params = job.kind, dict(job.params or {})
        runner = self.kinds[kind]
        status, result, code, message = "failed", {}, None, None
        try:
            if not self.transition(job_id, "running", allowed_from=("pending",), step="starting"):
                return  # cancelled before it ran
            result = runner.execute(job_id, params, JobContext(self, job_id))
            status = "completed"
        except Cancelled as e:
            status, code, message = "cancelled", e.code, e.message
        except Error as e:
            code, message = e.code, e.message
            log.warning("job=%s kind=%s failed: %s", job_id, kind, e.message)
        except Exception as e:  # a bug: never leave a job running
            log.exception("job=%s kind=%s crashed", job_id, kind)
            code, message = "internal_error", f"internal error: {type(e).__name__}: {e}"
        finally:
            self._threads.pop(job_id, None)
        self.transition(
            job_id,
            status,
            result=result or {},
            error_code=code,
            error_message=message,
        )
        with contextlib.suppress(Exception):
            runner.on_end(job_id, params, status)

    def recover_local(self) -> list[str]:
        """Take over orphaned local jobs: let their kind repair, then fail them."""
        resolved = []
        for job_id, kind, old in self.orphans():
            if kind not in self.kinds or not self.take_over(job_id, old):
                continue
            with self.db.session() as s:
                job = s.get(BackupJob, job_id)
                params = dict(job.params or {}) if job else {}
            try:
                self.kinds[kind].recover(job_id, params)
                message = "the hub stopped while this job ran; its work was made consistent"
            except Exception as e:
                log.exception("job=%s recovery failed", job_id)
                message = f"the hub stopped while this job ran and recovery failed: {e}"
            self.transition(job_id, "failed", error_code="hub_restarted", error_message=message)
            resolved.append(job_id)
        return resolved

    # ----------------------------------------------------------------- waits

    def _waiters_for(self, job_id: str) -> _Waiters:
        with self._waiters_lock:
            return self._waiters.setdefault(job_id, _Waiters())

    def notify(self, job_id: str) -> None:
        """Wake everyone waiting for this job's end (threads and coroutines)."""
        with self._waiters_lock:
            w = self._waiters.pop(job_id, None)
        if w is None:
            return
        for loop, event in w.loops:
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(event.set)

    async def wait_ended_async(
        self, job_id: str, timeout: float, is_ended: Callable[[], Any] | None = None
    ) -> None:
        """Wait without holding a thread: woken at once by a job this process
        runs, else re-checks ``is_ended`` (a catalog read) every second, so a
        job another hub runs ends the wait too."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        w = self._waiters_for(job_id)
        with self._waiters_lock:
            w.loops.append((loop, event))
        deadline = loop.time() + timeout
        try:
            while (left := deadline - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(left, 1.0))
                    return
                if is_ended is not None and await is_ended():
                    return
        finally:
            with self._waiters_lock:
                with contextlib.suppress(ValueError):
                    w.loops.remove((loop, event))
                if not w.loops and self._waiters.get(job_id) is w:
                    # Nobody waits any more; a later notify finds nothing to wake.
                    del self._waiters[job_id]

    def stopping(self, timeout: float = 0.0) -> bool:
        """Wait up to ``timeout`` s for this process to begin stopping; True once it has."""
        return self._stopping.wait(timeout)

    def shutdown(self) -> None:
        self._stopping.set()
        for t in list(self._threads.values()):
            t.join(timeout=2)
