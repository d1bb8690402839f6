"""The webhook outbox: record an event once per matching webhook, claim due
deliveries, and settle them with exponential backoff.

Every function takes the caller's `Session` and never commits: an event is
recorded in the transaction that makes it true (a scheduler's claim of a
missed run), or, for job ends, by the sender's poller (notify/sender.py).

Once per event, whichever hub records it: a delivery's ``event_key`` is
unique per webhook (``uq_webhook_deliveries_event``), and the insert is
``INSERT ... ON CONFLICT DO NOTHING`` (SQLite and PostgreSQL alike): a
second hub process recording the same event inserts nothing and raises
nothing, so the caller's transaction goes on.

A delivery's life::

    pending ──POST 2xx──> delivered
      │  ▲
      │  └── refused / error / timeout: attempts += 1,
      │      next_attempt_at = now + backoff(attempts)
      └── the attempts-th failure with attempts == max_attempts ──> failed

A claim (`claim_due`) moves ``next_attempt_at`` ahead by a lease with a
conditional update: several hub processes sending from one catalog never
POST the same delivery at once, and one that dies mid-POST leaves the
delivery to the others once the lease is over (at-least-once delivery:
receivers dedupe by the ``X-Sendense-Delivery`` header or the event key).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from sendense.catalog.models import Webhook, WebhookDelivery, new_id

JOB_FAILED = "job.failed"
JOB_COMPLETED = "job.completed"
RUN_MISSED = "run.missed"
RUN_FINISHED = "run.finished"
# What a webhook may subscribe to (scheduler/events.py documents the run
# events' payloads; notify/sender.py the job events').
EVENTS = (JOB_FAILED, JOB_COMPLETED, RUN_MISSED, RUN_FINISHED)
# Sent on request only (POST /api/v1/webhooks/{id}/test), never subscribed to.
TEST = "webhook.test"

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
STATUSES = (PENDING, DELIVERED, FAILED)

# A recorded error is cut to this many characters.
MAX_ERROR = 500


@dataclass(frozen=True)
class Backoff:
    """Seconds to wait after the ``attempts``-th failed attempt:
    ``base * 2^(attempts-1)``, at most ``cap``; after ``max_attempts``
    failures the delivery is given up (``failed``)."""

    base: float = 5.0
    cap: float = 3600.0
    max_attempts: int = 12

    def delay(self, attempts: int) -> timedelta:
        exponent = min(max(attempts - 1, 0), 40)  # 2^40 * anything is past any cap
        return timedelta(seconds=min(self.base * 2**exponent, self.cap))

    def gives_up(self, attempts: int) -> bool:
        return attempts >= self.max_attempts


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC)


def default_event_key(event: str, payload: dict[str, Any]) -> str:
    """``<event>:<id>`` for a payload naming its run or job, else a digest of
    the payload (the same event recorded by two hubs has the same payload)."""
    for field in ("job_id", "run_id"):
        if payload.get(field):
            return f"{event}:{payload[field]}"
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return f"{event}:{hashlib.sha256(canonical.encode()).hexdigest()[:40]}"


def subscribers(
    s: Session, event: str, policy_id: str | None, *, since: datetime | None = None
) -> list[str]:
    """Ids of the enabled webhooks that want ``event`` for ``policy_id``:
    the global ones and that policy's. ``since``: only webhooks that existed
    then (a webhook added later is not told of older events)."""
    q = select(Webhook.id, Webhook.events, Webhook.policy_id).where(Webhook.enabled.is_(True))
    if since is not None:
        q = q.where(Webhook.created_at <= since)
    return [
        hook_id
        for hook_id, events, hook_policy in s.execute(q).all()
        if event in (events or []) and (hook_policy is None or hook_policy == policy_id)
    ]


def _insert(s: Session) -> Any:
    if s.get_bind().dialect.name == "postgresql":
        return pg_insert(WebhookDelivery)
    return sqlite_insert(WebhookDelivery)


def record_event(
    s: Session,
    event: str,
    payload: dict[str, Any],
    *,
    policy_id: str | None = None,
    event_key: str | None = None,
    occurred_at: datetime | None = None,
    now: datetime | None = None,
) -> int:
    """Put ``event`` in the outbox of every enabled webhook that wants it
    (global ones, and ``policy_id``'s), in the caller's transaction. Already
    recorded (same ``event_key`` for that webhook, by this hub or another):
    nothing happens. How many deliveries were added."""
    now = _now(now)
    key = (event_key or default_event_key(event, payload))[:200]
    hooks = subscribers(s, event, policy_id, since=occurred_at)
    if not hooks:
        return 0
    body = {
        "event": event,
        "event_key": key,
        "occurred_at": _now(occurred_at or now).isoformat(),
        "data": payload,
    }
    added = 0
    for hook_id in hooks:
        stmt = (
            _insert(s)
            .values(
                id=new_id(),
                webhook_id=hook_id,
                event=event,
                event_key=key,
                payload=body,
                status=PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["webhook_id", "event_key"])
            .returning(WebhookDelivery.id)
        )
        # RETURNING, not rowcount: psycopg answers -1 for a row not inserted.
        added += len(s.execute(stmt).all())
    return added


def record_test(s: Session, webhook_id: str, requested_by: str, now: datetime | None = None) -> str:
    """A ``webhook.test`` delivery for one webhook, whatever it subscribes
    to (an administrator checking the receiver and its signature check).
    Its id."""
    now = _now(now)
    delivery_id = new_id()
    s.add(
        WebhookDelivery(
            id=delivery_id,
            webhook_id=webhook_id,
            event=TEST,
            event_key=f"{TEST}:{delivery_id}",
            payload={
                "event": TEST,
                "event_key": f"{TEST}:{delivery_id}",
                "occurred_at": now.isoformat(),
                "data": {"webhook_id": webhook_id, "requested_by": requested_by},
            },
            status=PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )
    s.flush()
    return delivery_id


def recorded_keys(s: Session, keys: list[str]) -> set[str]:
    """Which of ``keys`` are in the outbox already (for any webhook)."""
    if not keys:
        return set()
    rows = s.execute(
        select(WebhookDelivery.event_key).where(WebhookDelivery.event_key.in_(keys)).distinct()
    )
    return set(rows.scalars())


@dataclass(frozen=True)
class Due:
    """A claimed delivery: what the sender POSTs, and where."""

    delivery_id: str
    webhook_id: str
    event: str
    payload: dict[str, Any]
    attempts: int  # this attempt's number (1 for the first)
    url: str
    secret_encrypted: str | None


def claim_due(
    s: Session, *, lease: timedelta, limit: int, now: datetime | None = None
) -> list[Due]:
    """Pending deliveries of enabled webhooks due now, each claimed for
    ``lease`` (its ``next_attempt_at`` moved ahead; another hub process skips
    it meanwhile) and its attempt counted. Oldest first."""
    now = _now(now)
    rows = s.execute(
        select(
            WebhookDelivery.id,
            WebhookDelivery.next_attempt_at,
            WebhookDelivery.webhook_id,
            WebhookDelivery.event,
            WebhookDelivery.payload,
            WebhookDelivery.attempts,
            Webhook.url,
            Webhook.secret_encrypted,
        )
        .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
        .where(
            WebhookDelivery.status == PENDING,
            WebhookDelivery.next_attempt_at <= now,
            Webhook.enabled.is_(True),
        )
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.created_at)
        .limit(limit)
    ).all()
    claimed = []
    for delivery_id, due_at, hook_id, event, payload, attempts, url, secret in rows:
        taken = s.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == PENDING,
                WebhookDelivery.next_attempt_at == due_at,
            )
            .values(next_attempt_at=now + lease, attempts=WebhookDelivery.attempts + 1)
        )
        if getattr(taken, "rowcount", 0) == 1:
            claimed.append(
                Due(delivery_id, hook_id, event, dict(payload), attempts + 1, url, secret)
            )
    return claimed


def settle(
    s: Session,
    due: Due,
    error: str | None,
    backoff: Backoff,
    *,
    now: datetime | None = None,
) -> str:
    """Record an attempt's outcome: delivered (``error`` None), retried after
    the backoff, or given up. The delivery's new status."""
    now = _now(now)
    values: dict[str, Any]
    if error is None:
        # last_error stays: what the attempts before this one met.
        values = {"status": DELIVERED, "delivered_at": now}
    elif backoff.gives_up(due.attempts):
        values = {"status": FAILED, "last_error": error[:MAX_ERROR]}
    else:
        values = {
            "next_attempt_at": now + backoff.delay(due.attempts),
            "last_error": error[:MAX_ERROR],
        }
    s.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == due.delivery_id, WebhookDelivery.status == PENDING)
        .values(**values)
    )
    return str(values.get("status", PENDING))


def prune(s: Session, before: datetime) -> int:
    """Remove deliveries that ended (delivered or failed) before ``before``;
    pending ones stay whatever their age. How many went."""
    gone = s.execute(
        delete(WebhookDelivery).where(
            or_(
                and_(WebhookDelivery.status == DELIVERED, WebhookDelivery.delivered_at < before),
                and_(WebhookDelivery.status == FAILED, WebhookDelivery.next_attempt_at < before),
            )
        )
    )
    return int(getattr(gone, "rowcount", 0) or 0)


def counts_by_status(s: Session) -> dict[str, int]:
    rows = s.execute(
        select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
    ).all()
    return {status: int(n) for status, n in rows}
