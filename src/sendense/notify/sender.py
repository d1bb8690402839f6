"""The hub's webhook thread: record job ends, then POST what is due.

Each tick (``SENDENSE_WEBHOOK_INTERVAL`` seconds, default 2):

1. Job ends. The poller (`JobPoller`) finds the jobs that ended since its
   last pass (every kind: backup, verify, retention, restore, ...) and
   records ``job.completed`` (status completed) or ``job.failed`` (status
   failed, which includes a timeout: error code ``timeout``) with the event
   key ``job.<completed|failed>:<job id>``. A cancelled job is an
   operator's act and sends nothing. No hook in the engine: any hub process
   may poll, the unique event key makes it once. At start it also reads
   the jobs that ended in the last `START_LOOKBACK` (while this process was
   starting or down). A webhook is told only of jobs that ended after it
   was created.
2. Deliveries. Due ones are claimed (notify/outbox.py) and POSTed, one at a
   time, with no session open during the request.

The request (``Content-Type: application/json``)::

    POST <url>
    User-Agent: Sendense/<version>
    X-Sendense-Event: job.failed
    X-Sendense-Delivery: <delivery id>         (the same on every retry)
    X-Sendense-Timestamp: <unix seconds>
    X-Sendense-Signature: sha256=<hex>         (only when the webhook has a secret)

    {"event": "job.failed", "event_key": "job.failed:<job id>",
     "occurred_at": "<ISO 8601>", "data": {...}}

The secret never travels: the signature is HMAC-SHA256 with the secret as
key over ``<timestamp>.<body>`` (the exact bytes sent). A receiver
recomputes it, compares in constant time and refuses old timestamps
(replays). Any 2xx is delivered; anything else (3xx included: redirects are
not followed), a timeout or a connection error is retried with the backoff
of `Backoff`. Logs and ``last_error`` name the webhook by id and its URL by
scheme and host only (a URL's path can be a credential, as Slack's are); the
secret is in neither.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import func, select

from sendense import __version__
from sendense.catalog.db import Database
from sendense.catalog.models import Backup, BackupJob, Vm, Webhook
from sendense.engine.lifecycle import ACTIVE
from sendense.notify import outbox
from sendense.notify.outbox import Backoff, Due
from sendense.notify.sealed import unseal
from sendense.secretbox import SecretBox, scrub

log = logging.getLogger(__name__)

START_LOOKBACK = timedelta(hours=1)
OVERLAP = timedelta(minutes=2)
PAGE = 500
BATCH = 20
PRUNE_EVERY = 3600.0
JOB_EVENTS = (outbox.JOB_COMPLETED, outbox.JOB_FAILED)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of ``<timestamp>.<body>`` keyed by the secret."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def url_for_log(url: str) -> str:
    """``scheme://host[:port]``: what logs and errors may say of a URL."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    return f"{parts.scheme}://{host}{port}"


def job_event(status: str) -> str | None:
    if status == "completed":
        return outbox.JOB_COMPLETED
    if status == "failed":
        return outbox.JOB_FAILED
    return None


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None


def job_payload(
    job: BackupJob, vm_name: str | None, backups: list[tuple[str, int]]
) -> dict[str, Any]:
    """What a job event says: no secret (params and result stay in the API)."""
    tags = job.tags or {}
    payload: dict[str, Any] = {
        "job_id": job.id,
        "kind": job.kind,
        "status": job.status,
        "vm_name": vm_name,
        "vm_id": job.vm_id,
        "repository_id": job.repository_id,
        "node_id": job.node_id,
        "requested_type": job.requested_type,
        "error": (
            {"code": job.error_code, "message": job.error_message}
            if job.status != "completed" and (job.error_code or job.error_message)
            else None
        ),
        "policy": tags.get("policy"),
        "policy_id": tags.get("policy_id"),
        "policy_run_id": tags.get("policy_run_id"),
        "trigger": tags.get("trigger"),
        "created_by": job.created_by,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
    }
    if job.kind == "backup":
        payload["backups"] = [b for b, _ in backups]
        payload["bytes_transferred"] = sum(size for _, size in backups)
    return payload


class JobPoller:
    """Records job ends as events (see the module's docstring).

    Cheap on a catalog with many jobs (``finished_at`` has no index): each
    pass reads the active jobs (``status`` index) and the jobs created since
    the last pass, less `OVERLAP` (``created_at`` index). A job that was
    active at the last pass and is not now has ended; one created and ended
    between two passes is among the new ones. The first pass also reads the
    jobs that ended in the last `START_LOOKBACK` (once, whatever it costs).
    """

    def __init__(self, db: Database, now: datetime | None = None) -> None:
        self.db = db
        now = now or datetime.now(UTC)
        self.since = now - START_LOOKBACK  # created after this: read each pass
        self.lookback: datetime | None = now - START_LOOKBACK  # first pass only
        self.watch: set[str] = set()  # active at the last pass

    def _wanted(self, s: Any) -> bool:
        rows = s.execute(select(Webhook.events).where(Webhook.enabled.is_(True))).scalars()
        return any(e in JOB_EVENTS for events in rows for e in events or [])

    def poll(self, now: datetime | None = None) -> int:
        """One pass; how many deliveries were recorded."""
        now = now or datetime.now(UTC)
        recorded = 0
        with self.db.session() as s:
            active = set(s.scalars(select(BackupJob.id).where(BackupJob.status.in_(ACTIVE))))
            if self._wanted(s):
                # One condition per query, each on its index, and the status
                # checked here: SQLite would pick the status index for
                # "status IN (...) AND ..." and read every completed job.
                found: dict[str, Any] = {}
                conditions = [BackupJob.created_at >= self.since - OVERLAP]
                if self.watch - active:
                    conditions.append(BackupJob.id.in_(sorted(self.watch - active)))
                if self.lookback is not None:
                    conditions.append(BackupJob.finished_at >= self.lookback)
                for condition in conditions:
                    for row in s.execute(
                        select(BackupJob, Vm.name)
                        .outerjoin(Vm, Vm.id == BackupJob.vm_id)
                        .where(condition)
                    ).all():
                        if job_event(row[0].status) is not None:
                            found[row[0].id] = row
                rows = sorted(found.values(), key=lambda r: (r[0].finished_at or now, r[0].id))
                recorded = self._record(s, rows, now)
        self.watch = active
        self.since = now
        self.lookback = None
        return recorded

    def _record(self, s: Any, rows: Sequence[Any], now: datetime) -> int:
        keys = {job.id: f"{job_event(job.status)}:{job.id}" for job, _ in rows}
        known: set[str] = set()
        values = list(keys.values())
        for at in range(0, len(values), PAGE):  # an IN list of bounded length
            known |= outbox.recorded_keys(s, values[at : at + PAGE])
        todo = [(job, name) for job, name in rows if keys[job.id] not in known]
        sizes = self._backups(s, [job.id for job, _ in todo if job.kind == "backup"])
        recorded = 0
        for job, vm_name in todo:
            event = job_event(job.status)
            if event is None or job.finished_at is None:  # pragma: no cover - by the query
                continue
            recorded += outbox.record_event(
                s,
                event,
                job_payload(job, vm_name, sizes.get(job.id, [])),
                policy_id=(job.tags or {}).get("policy_id"),
                event_key=keys[job.id],
                occurred_at=job.finished_at,
                now=now,
            )
        return recorded

    @staticmethod
    def _backups(s: Any, job_ids: list[str]) -> dict[str, list[tuple[str, int]]]:
        out: dict[str, list[tuple[str, int]]] = {}
        for at in range(0, len(job_ids), PAGE):
            rows = s.execute(
                select(Backup.job_id, Backup.id, func.coalesce(Backup.bytes_transferred, 0))
                .where(Backup.job_id.in_(job_ids[at : at + PAGE]), Backup.status == "completed")
                .order_by(Backup.job_id, Backup.disk_index)
            ).all()
            for job_id, backup_id, size in rows:
                out.setdefault(job_id, []).append((backup_id, int(size)))
        return out


class WebhookSender:
    """The thread: job poller, then due deliveries, every ``interval`` seconds."""

    def __init__(
        self,
        db: Database,
        secrets: SecretBox,
        *,
        interval: float = 2.0,
        timeout: float = 10.0,
        backoff: Backoff | None = None,
        retention_days: int = 30,
    ) -> None:
        self.db = db
        self.secrets = secrets
        self.interval = interval
        self.timeout = timeout
        self.backoff = backoff or Backoff()
        self.poller = JobPoller(db)
        self.retention_days = retention_days
        self._next_prune = 0.0  # at once, then every PRUNE_EVERY seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._http = httpx.Client(timeout=timeout, follow_redirects=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="webhook-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the request in flight, if any: waits at most a few
        seconds (the thread is a daemon; an unfinished delivery's lease
        expires and it is sent again, by this hub after restart or another)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=min(self.timeout, 5.0) + 1)
            if self._thread.is_alive():
                return  # still in a request: closing its client under it helps no one
        self._http.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = False
            try:
                self.poller.poll()
                busy = self.send_due() == BATCH
                if time.monotonic() >= self._next_prune:
                    self._next_prune = time.monotonic() + PRUNE_EVERY
                    self.prune()
            except Exception:
                log.exception("webhook pass failed")
            if not busy and self._stop.wait(self.interval):
                return

    def prune(self) -> int:
        """Drop ended deliveries older than the retention (0: keep them)."""
        if self.retention_days <= 0:
            return 0
        before = datetime.now(UTC) - timedelta(days=self.retention_days)
        with self.db.session() as s:
            removed = outbox.prune(s, before)
        if removed:
            log.info(
                "webhook deliveries older than %d days removed: %d", self.retention_days, removed
            )
        return removed

    def send_due(self, now: datetime | None = None) -> int:
        """Claim and POST the due deliveries (at most `BATCH`); how many were tried."""
        lease = timedelta(seconds=self.timeout + 30)
        with self.db.session() as s:
            due = outbox.claim_due(s, lease=lease, limit=BATCH, now=now)
        for d in due:
            if self._stop.is_set():
                break  # the lease expires; this or another hub sends it later
            error = self.post(d)
            with self.db.session() as s:
                status = outbox.settle(s, d, error, self.backoff)
            where = url_for_log(d.url)
            if error is None:
                log.info(
                    "webhook delivered webhook=%s delivery=%s event=%s to=%s attempt=%d",
                    d.webhook_id, d.delivery_id, d.event, where, d.attempts,
                )  # fmt: skip
            else:
                log.warning(
                    "webhook delivery failed webhook=%s delivery=%s event=%s to=%s "
                    "attempt=%d status=%s error=%s",
                    d.webhook_id, d.delivery_id, d.event, where, d.attempts, status, error,
                )  # fmt: skip
        return len(due)

    def post(self, d: Due) -> str | None:
        """POST one delivery; None when the receiver took it, else why not
        (with neither the secret nor the URL's path or query)."""
        try:
            url, secret = unseal(self.secrets, d.url, d.secret_encrypted)
        except Exception as e:
            name = type(e).__name__
            return f"cannot decrypt the webhook's secret ({name}): was secret.key replaced?"
        body = json.dumps(d.payload, separators=(",", ":"), sort_keys=True).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"Sendense/{__version__}",
            "X-Sendense-Event": d.event,
            "X-Sendense-Delivery": d.delivery_id,
            "X-Sendense-Timestamp": timestamp,
        }
        if secret:
            headers["X-Sendense-Signature"] = sign(secret, timestamp, body)
        try:
            r = self._http.post(url, content=body, headers=headers)
        except httpx.TimeoutException:
            return f"timed out after {self.timeout:g}s"
        except Exception as e:
            return self._clean(f"{type(e).__name__}: {e}", url, secret)
        if 200 <= r.status_code < 300:
            return None
        text = r.text[:200].strip() if r.content else ""
        note = " (redirects are not followed)" if 300 <= r.status_code < 400 else ""
        return self._clean(f"HTTP {r.status_code}{note}: {text}".rstrip(": "), url, secret)

    @staticmethod
    def _clean(message: str, url: str, secret: str | None) -> str:
        message = message.replace(url, url_for_log(url))
        parts = urlsplit(url)
        hidden = [
            p for p in (parts.path, parts.query, parts.password or "", secret or "") if len(p) > 1
        ]
        return scrub(message, hidden)
