"""Webhooks: add, list, remove; their deliveries (the outbox, notify/).

Rules:

- Admin only (a webhook sends job and VM names to a URL of the caller's
  choice).
- The secret is encrypted at rest (`SecretBox`) and never answered; a
  webhook shows ``has_secret``. A password in the URL is encrypted with it
  (the row keeps the URL with ``***`` in its place: notify/sealed.py), and
  the URL is answered that way.
- ``policy_id`` must name a policy (400 naming the field otherwise): such a
  webhook hears only that policy's jobs and runs; without one, everything.
- ``DELETE`` removes the webhook and its outbox (pending deliveries are
  not sent).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select

from sendense.catalog.models import Policy, Webhook, WebhookDelivery
from sendense.core.access import Principal
from sendense.core.errors import Conflict, InvalidRequest, NotFound
from sendense.hub.state import HubState
from sendense.hub.webhooks.schemas import WebhookCreate, WebhookUpdate
from sendense.notify import outbox
from sendense.notify.sealed import credentials, seal, shown_url, unseal
from sendense.secretbox import SecretBox


def _stats(s: Any, hook_ids: list[str]) -> dict[str, dict[str, Any]]:
    stats: dict[str, dict[str, Any]] = {h: {"pending": 0, "failed": 0} for h in hook_ids}
    if not hook_ids:
        return stats
    for hook_id, status, n, last in s.execute(
        select(
            WebhookDelivery.webhook_id,
            WebhookDelivery.status,
            func.count(),
            func.max(WebhookDelivery.delivered_at),
        )
        .where(WebhookDelivery.webhook_id.in_(hook_ids))
        .group_by(WebhookDelivery.webhook_id, WebhookDelivery.status)
    ).all():
        if status in (outbox.PENDING, outbox.FAILED):
            stats[hook_id][status] = int(n)
        elif status == outbox.DELIVERED:
            stats[hook_id]["last_delivered_at"] = last
    return stats


def webhook_view(h: Webhook, stats: dict[str, Any], box: SecretBox) -> dict[str, Any]:
    try:
        has_secret = credentials(box, h.secret_encrypted)[0] is not None
    except Exception:  # secret.key replaced: the sender says so on each delivery
        has_secret = bool(h.secret_encrypted)
    return {
        "webhook_id": h.id,
        "url": shown_url(h.url),
        "events": list(h.events or []),
        "policy_id": h.policy_id,
        "enabled": h.enabled,
        "has_secret": has_secret,
        "created_at": h.created_at,
        "created_by": h.created_by,
        "pending": stats.get("pending", 0),
        "failed": stats.get("failed", 0),
        "last_delivered_at": stats.get("last_delivered_at"),
    }


def delivery_view(d: WebhookDelivery) -> dict[str, Any]:
    return {
        "delivery_id": d.id,
        "webhook_id": d.webhook_id,
        "event": d.event,
        "event_key": d.event_key,
        "status": d.status,
        "attempts": d.attempts,
        "next_attempt_at": d.next_attempt_at if d.status == outbox.PENDING else None,
        "last_error": d.last_error,
        "created_at": d.created_at,
        "delivered_at": d.delivered_at,
        "payload": d.payload or {},
    }


def _get(s: Any, webhook_id: str) -> Webhook:
    hook = s.get(Webhook, webhook_id)
    if hook is None:
        raise NotFound(f"webhook {webhook_id} not found", webhook_id=webhook_id)
    return hook


def _check_policy(s: Any, policy_id: str | None) -> None:
    if policy_id is not None and s.get(Policy, policy_id) is None:
        raise InvalidRequest(
            f"policy_id {policy_id} does not exist", fields=["policy_id"], policy_id=policy_id
        )


def create_webhook(st: HubState, who: Principal, body: WebhookCreate) -> dict[str, Any]:
    with st.db.session() as s:
        _check_policy(s, body.policy_id)
        url, sealed = seal(st.secrets, body.url, body.secret)
        hook = Webhook(
            url=url,
            events=list(body.events),
            policy_id=body.policy_id,
            enabled=body.enabled,
            secret_encrypted=sealed,
            created_by=who.name,
        )
        s.add(hook)
        s.flush()
        return webhook_view(hook, {}, st.secrets)


def list_webhooks(st: HubState) -> list[dict[str, Any]]:
    with st.db.session() as s:
        hooks = list(s.scalars(select(Webhook).order_by(Webhook.created_at, Webhook.id)))
        stats = _stats(s, [h.id for h in hooks])
        return [webhook_view(h, stats[h.id], st.secrets) for h in hooks]


def get_webhook(st: HubState, webhook_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        hook = _get(s, webhook_id)
        return webhook_view(hook, _stats(s, [hook.id])[hook.id], st.secrets)


def update_webhook(st: HubState, webhook_id: str, body: WebhookUpdate) -> dict[str, Any]:
    """Change what is given. Deliveries already recorded keep their payload;
    a disabled webhook's pending ones wait (and are sent once it is enabled
    again, if their attempts allow)."""
    given = body.model_fields_set
    with st.db.session() as s:
        hook = _get(s, webhook_id)
        if "policy_id" in given:
            _check_policy(s, body.policy_id)
            hook.policy_id = body.policy_id
        # url, events and enabled are never null when given (schemas.py).
        if body.events is not None:
            hook.events = list(body.events)
        if body.enabled is not None:
            hook.enabled = body.enabled
        if body.url is not None or "secret" in given:
            url, secret = unseal(st.secrets, hook.url, hook.secret_encrypted)
            hook.url, hook.secret_encrypted = seal(
                st.secrets,
                body.url if body.url is not None else url,
                body.secret if "secret" in given else secret,
            )
        s.flush()
        return webhook_view(hook, _stats(s, [hook.id])[hook.id], st.secrets)


def test_webhook(st: HubState, who: Principal, webhook_id: str) -> dict[str, Any]:
    """Queue a ``webhook.test`` delivery (sent within a pass, retried like
    any other); 409 on a disabled webhook, which sends nothing."""
    with st.db.session() as s:
        hook = _get(s, webhook_id)
        if not hook.enabled:
            raise Conflict(
                f"webhook {webhook_id} is disabled: enable it first", webhook_id=webhook_id
            )
        delivery_id = outbox.record_test(s, hook.id, who.name)
        return delivery_view(s.get_one(WebhookDelivery, delivery_id))


def delete_webhook(st: HubState, webhook_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        hook = _get(s, webhook_id)
        gone = s.execute(delete(WebhookDelivery).where(WebhookDelivery.webhook_id == hook.id))
        s.delete(hook)
        return {
            "webhook_id": webhook_id,
            "deleted": True,
            "deliveries_removed": int(getattr(gone, "rowcount", 0) or 0),
        }


def list_deliveries(
    st: HubState, webhook_id: str, *, status: str | None, limit: int
) -> list[dict[str, Any]]:
    """The webhook's latest deliveries, newest first."""
    with st.db.session() as s:
        _get(s, webhook_id)
        q = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
        if status is not None:
            q = q.where(WebhookDelivery.status == status)
        q = q.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()).limit(limit)
        return [delivery_view(d) for d in s.scalars(q)]
