"""Notifications: webhooks on job and policy-run events, through an outbox.

- `record_event(s, event, payload, policy_id=...)`: in the caller's
  transaction, one pending delivery per enabled webhook that wants the
  event (global ones and the policy's), once per event whichever hub
  records it (outbox.py). The scheduler calls it through
  ``scheduler/events.emit`` for ``run.missed`` and ``run.finished``.
- `WebhookSender` (sender.py): the hub's thread recording job ends
  (``job.completed``, ``job.failed``) and POSTing due deliveries, signed
  with HMAC-SHA256 when the webhook has a secret, retried with `Backoff`.
"""

from sendense.notify.outbox import EVENTS, Backoff, record_event
from sendense.notify.sender import WebhookSender, sign

__all__ = ["EVENTS", "Backoff", "WebhookSender", "record_event", "sign"]
