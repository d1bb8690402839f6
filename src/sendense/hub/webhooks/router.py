"""/api/v1/webhooks: HTTP only; rules in service.py. Admin only."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Path, Query

from sendense.hub.deps import Admin, HubDep
from sendense.hub.openapi import errors
from sendense.hub.webhooks import service
from sendense.hub.webhooks.schemas import (
    DeliveryList,
    DeliveryRead,
    WebhookCreate,
    WebhookDeleted,
    WebhookList,
    WebhookRead,
    WebhookUpdate,
)

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"])

WebhookId = Path(min_length=1, max_length=36)


@router.post("", status_code=201, response_model=WebhookRead, responses=errors())
def create_webhook(body: WebhookCreate, st: HubDep, who: Admin) -> dict:
    """Add a webhook: a JSON POST to ``url`` on each of ``events``, signed
    (``X-Sendense-Signature``) when it has a ``secret``. The secret is never answered."""
    return service.create_webhook(st, who, body)


@router.get("", response_model=WebhookList, responses=errors())
def list_webhooks(st: HubDep, who: Admin) -> dict:
    return {"webhooks": service.list_webhooks(st)}


@router.get("/{webhook_id}", response_model=WebhookRead, responses=errors(404))
def get_webhook(st: HubDep, who: Admin, webhook_id: str = WebhookId) -> dict:
    return service.get_webhook(st, webhook_id)


@router.patch("/{webhook_id}", response_model=WebhookRead, responses=errors(404))
def update_webhook(
    body: WebhookUpdate, st: HubDep, who: Admin, webhook_id: str = WebhookId
) -> dict:
    """Change a webhook (``enabled``, ``events``, ``url``, ``policy_id``,
    ``secret``: null removes it). The secret is never answered."""
    return service.update_webhook(st, webhook_id, body)


@router.post(
    "/{webhook_id}/test", status_code=202, response_model=DeliveryRead, responses=errors(404, 409)
)
def test_webhook(st: HubDep, who: Admin, webhook_id: str = WebhookId) -> dict:
    """Send a ``webhook.test`` event now (signed like the others): the
    delivery is answered; follow it in ``/deliveries``. 409 if disabled."""
    return service.test_webhook(st, who, webhook_id)


@router.delete("/{webhook_id}", response_model=WebhookDeleted, responses=errors(404))
def delete_webhook(st: HubDep, who: Admin, webhook_id: str = WebhookId) -> dict:
    """Remove a webhook and its outbox (what is pending is not sent)."""
    return service.delete_webhook(st, webhook_id)


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList, responses=errors(404))
def list_deliveries(
    st: HubDep,
    who: Admin,
    webhook_id: str = WebhookId,
    status: Literal["pending", "delivered", "failed"] | None = None,
    limit: int = Query(default=50, ge=1, le=1000),
) -> dict:
    """The latest deliveries, newest first: status, attempts, the last error."""
    return {"deliveries": service.list_deliveries(st, webhook_id, status=status, limit=limit)}
