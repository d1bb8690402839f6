"""What the scheduler tells others: one call site, `emit`, for every event.

Events (``payload`` is JSON):

- ``run.missed``: a policy missed scheduled runs (the hub was down); the one
  run that stands for them was just claimed. ``{"policy_id", "policy",
  "run_id", "scheduled_at", "missed_count", "first_missed"}``.
- ``run.finished``: every VM of a run is done. ``{"policy_id", "policy",
  "run_id", "trigger", "status", "counts", "failed": [{"vm_name", "reason"}]}``
  (a VM that could not even start a job is only visible here).

`emit` is called inside the transaction that records what happened (the
claim, the run's end), so an event is recorded exactly once whichever hub
process claims it. It hands the event to ``sendense.notify.record_event(s,
event, payload, policy_id=...)`` when that module exists (webhook outbox),
then to the hooks registered with `subscribe`. Each runs in a savepoint: a
failing receiver is logged and never undoes the scheduler's own work.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

Hook = Callable[[Session, str, dict[str, Any], str | None], None]

_hooks: list[Hook] = []

RUN_MISSED = "run.missed"
RUN_FINISHED = "run.finished"


def subscribe(hook: Hook) -> None:
    """Call ``hook(s, event, payload, policy_id)`` on every event."""
    if hook not in _hooks:
        _hooks.append(hook)


def unsubscribe(hook: Hook) -> None:
    if hook in _hooks:
        _hooks.remove(hook)


def _notify_receiver() -> Hook | None:
    try:
        notify = importlib.import_module("sendense.notify")
    except ImportError:
        return None
    record = getattr(notify, "record_event", None)
    if record is None:
        return None

    def receive(s: Session, event: str, payload: dict[str, Any], policy_id: str | None) -> None:
        record(s, event, payload, policy_id=policy_id)

    return receive


def emit(s: Session, event: str, payload: dict[str, Any], *, policy_id: str | None = None) -> None:
    """Record ``event`` with every receiver, in the caller's transaction."""
    receivers = [r for r in (_notify_receiver(), *_hooks) if r is not None]
    for receive in receivers:
        try:
            with s.begin_nested():
                receive(s, event, payload, policy_id)
        except Exception:
            log.exception("event receiver failed event=%s policy_id=%s", event, policy_id)
