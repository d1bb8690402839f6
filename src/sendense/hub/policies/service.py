"""Policies: create, change, delete, show; run now; retention plan and apply.

Rules:

- A policy is checked whole on every write (a PATCH merges, then checks):
  ``schedule`` through `policy.schedule.Schedule.parse` in ``timezone``
  (IANA), ``window`` through `Window.parse`, ``repository_id`` must exist
  (400 naming it, as for a backup), the selector must name VMs or tags
  (an empty one would match nothing, for ever), and retention must have at
  least one rule: with every ``keep_*`` at 0 the planner keeps everything,
  which a reader of ``{"keep_last": 0}`` would not guess; ``-1`` says "keep
  every bucket" explicitly. Names are unique (409 ``conflict``).
- A scoped caller sees the policies whose repository is in its scope (the
  others are 404 as if absent); within them, ``matched_vms``, ``last_runs``
  and the retention plan show only VMs of its scope, and ``selector.vms``
  only the names it may see. Running a policy that matches VMs outside its
  scope is refused (403): it would back up another tenant's VMs.
- ``DELETE`` removes the policy, its runs and queue (what was queued never
  starts) and its own webhooks with their outbox; jobs it already started
  run on and stay in the job history (they do not point at the policy).
- Retention apply starts one ``retention`` job per matched VM that has
  something to remove (`engine.retention.apply_for_vm`); ``job_id`` is the
  first, ``job_ids`` all, null / empty when nothing is to be removed.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sendense.catalog.models import Policy
from sendense.catalog.stores import JobStore, RepositoryStore
from sendense.catalog.stores.policies import PolicyStore
from sendense.core.access import Principal
from sendense.core.errors import Conflict, Forbidden, InvalidRequest, NotFound
from sendense.engine import retention
from sendense.hub.policies.schemas import PolicyCreate, PolicyUpdate
from sendense.hub.state import HubState
from sendense.policy.retention import RULES, RetentionRules
from sendense.policy.schedule import Schedule, Window
from sendense.scheduler.runs import run_policy_now
from sendense.scheduler.selector import selector_matches

log = logging.getLogger(__name__)

NEXT_RUNS = 3
FIELDS = (
    "name",
    "enabled",
    "selector",
    "repository_id",
    "schedule",
    "timezone",
    "full_every",
    "retention",
    "verify_after",
    "window",
)


def _t(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=UTC)
    return value.isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------- checks


def _field_error(e: InvalidRequest) -> InvalidRequest:
    """The parser's error in this API's shape: ``details.fields`` names the field."""
    field = e.details.get("field")
    fields = [field] if field else list(e.details.get("fields") or [])
    message = e.message
    if fields and not message.startswith(fields[0]):
        message = f"{fields[0]}: {message}"
    return InvalidRequest(message, fields=fields)


def check_policy(s: Session, who: Principal, p: dict[str, Any]) -> Schedule:
    """Everything about a whole policy that needs more than its body."""
    try:
        schedule = Schedule.parse(p["schedule"], p["timezone"])
        Window.parse(p["window"])
    except InvalidRequest as e:
        raise _field_error(e) from e
    selector = p["selector"]
    if not selector.get("vms") and not selector.get("tags"):
        raise InvalidRequest(
            "selector must name VMs (vms) or tags (tags): an empty selector matches no VM",
            fields=["selector"],
        )
    rules = RetentionRules.from_dict(p["retention"])
    if rules.empty:
        raise InvalidRequest(
            "retention has no rule: set at least one of "
            f"{', '.join(RULES)} (-1 keeps every bucket of that rule)",
            fields=["retention"],
        )
    repo = RepositoryStore(s).get(p["repository_id"])
    if repo is None or not who.can_see_repository(repo.id):
        raise InvalidRequest(
            f"repository_id {p['repository_id']} does not exist",
            fields=["repository_id"],
            repository_id=p["repository_id"],
        )
    return schedule


def _check_name_free(s: Session, name: str, exclude: str | None = None) -> None:
    other = PolicyStore(s).by_name(name)
    if other is not None and other.id != exclude:
        raise Conflict(f"a policy named {name} already exists", policy_id=other.id)


def _as_dict(policy: Policy) -> dict[str, Any]:
    return {f: getattr(policy, f) for f in FIELDS}


# ----------------------------------------------------------------- views


def visible_policy(s: Session, who: Principal, policy_id: str) -> Policy:
    """The policy, or NotFound (also when its repository is outside the caller's scope)."""
    policy = PolicyStore(s).get(policy_id)
    if policy is None or not who.can_see_repository(policy.repository_id):
        raise NotFound(f"policy {policy_id} not found", policy_id=policy_id)
    return policy


def _matched(policy: Policy, who: Principal, vm_rows: list[Any]) -> list[Any]:
    return [
        r
        for r in vm_rows
        if selector_matches(policy.selector, r.name, r.tags or {})
        and who.can_see_vm(r.name, r.tags)
    ]


def policy_view(
    policy: Policy, who: Principal, vm_rows: list[Any], now: datetime
) -> dict[str, Any]:
    """A policy as the API shows it, with its next runs and the VMs it matches now."""
    schedule = Schedule.parse(policy.schedule, policy.timezone)
    selector = dict(policy.selector or {})
    names = list(selector.get("vms") or [])
    if who.scope is not None:
        # Another tenant's VM names are not shown (tags carry no names).
        names = [n for n in names if who.scope.allows_vm(n, _tags_of(vm_rows, n))]
    rules = {k: int((policy.retention or {}).get(k) or 0) for k in RULES}
    return {
        "policy_id": policy.id,
        "name": policy.name,
        "enabled": policy.enabled,
        "selector": {"vms": names, "tags": dict(selector.get("tags") or {})},
        "repository_id": policy.repository_id,
        "schedule": policy.schedule,
        "schedule_description": schedule.describe(),
        "timezone": policy.timezone,
        "full_every": policy.full_every,
        "retention": rules,
        "verify_after": policy.verify_after,
        "window": policy.window,
        "created_by": policy.created_by,
        "created_at": _t(policy.created_at),
        "updated_at": _t(policy.updated_at),
        "last_scheduled_at": _t(policy.last_scheduled_at),
        "next_runs": [_t(t) for t in schedule.next_runs(now, NEXT_RUNS)] if policy.enabled else [],
        "matched_vms": [r.name for r in _matched(policy, who, vm_rows)],
    }


def _tags_of(vm_rows: list[Any], name: str) -> dict[str, Any] | None:
    for r in vm_rows:
        if r.name == name:
            return dict(r.tags or {})
    return None


def _last_runs(s: Session, who: Principal, policy: Policy) -> list[dict[str, Any]]:
    store = PolicyStore(s)
    rows = [r for r in store.last_run_vms(policy.id) if who.can_see_vm(r.vm_name, r.vm_tags)]
    made = store.backups_of_jobs(r.PolicyRunVm.job_id for r in rows if r.PolicyRunVm.job_id)
    out = []
    for row in rows:
        entry, run = row.PolicyRunVm, row.PolicyRun
        # What the scheduler noted for this VM: its verify and retention jobs.
        noted = ((run.summary or {}).get("vms") or {}).get(row.vm_name) or {}
        error = None
        if row.job_error_code or row.job_error_message:
            error = {"code": row.job_error_code, "message": row.job_error_message}
        out.append(
            {
                "vm_name": row.vm_name,
                "run_id": run.id,
                "trigger": run.trigger,
                "scheduled_at": _t(run.scheduled_at),
                "missed_count": run.missed_count,
                "status": entry.status,
                "reason": entry.reason,
                "backup_type": entry.backup_type,
                "attempts": entry.attempts,
                "job_id": entry.job_id,
                "job_status": row.job_status,
                "error": error,
                "backup_ids": made.get(entry.job_id or "", []),
                "verify_job_ids": list(noted.get("verify_job_ids") or []),
                "retention_job_id": noted.get("retention_job_id"),
                "queued_at": _t(entry.created_at),
                "finished_at": _t(row.job_finished_at),
            }
        )
    return out


def _detail(s: Session, who: Principal, policy: Policy) -> dict[str, Any]:
    store = PolicyStore(s)
    view = policy_view(policy, who, list(store.vm_rows()), datetime.now(UTC))
    view["last_runs"] = _last_runs(s, who, policy)
    return view


# ------------------------------------------------------------------ CRUD


def create_policy(st: HubState, who: Principal, body: PolicyCreate) -> dict[str, Any]:
    p = body.model_dump()
    try:
        with st.db.session() as s:
            schedule = check_policy(s, who, p)
            _check_name_free(s, body.name)
            policy = Policy(
                **{**p, "schedule": schedule.expression, "timezone": schedule.tz.key},
                created_by=who.name,
            )
            s.add(policy)
            s.flush()
            policy_id = policy.id
    except IntegrityError as e:  # a concurrent create took the name
        raise Conflict(f"a policy named {body.name} already exists") from e
    log.info("policy created policy=%s name=%s by=%s", policy_id, body.name, who.name)
    with st.db.session() as s:
        return _detail(s, who, visible_policy(s, who, policy_id))


def list_policies(
    st: HubState, who: Principal, *, name: str | None, limit: int, offset: int
) -> dict[str, Any]:
    now = datetime.now(UTC)
    with st.db.session() as s:
        store = PolicyStore(s)
        if name is not None:
            one = store.by_name(name)
            rows = [one] if one is not None and who.can_see_repository(one.repository_id) else []
            total = len(rows)
            rows = rows[offset : offset + limit]
        else:
            repos = None if who.scope is None else who.scope.repositories
            found, total = store.page(repository_ids=repos, limit=limit, offset=offset)
            rows = list(found)
        vm_rows = list(store.vm_rows()) if rows else []
        return {"policies": [policy_view(p, who, vm_rows, now) for p in rows], "total": total}


def get_policy(st: HubState, who: Principal, policy_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        return _detail(s, who, visible_policy(s, who, policy_id))


def update_policy(
    st: HubState, who: Principal, policy_id: str, body: PolicyUpdate
) -> dict[str, Any]:
    given = body.model_fields_set
    changes = body.model_dump(include=given)
    for field in sorted(given - {"full_every", "window"}):
        if changes[field] is None:
            raise InvalidRequest(f"{field} cannot be null", fields=[field])
    try:
        with st.db.session() as s:
            policy = visible_policy(s, who, policy_id)
            merged = {**_as_dict(policy), **changes}
            schedule = check_policy(s, who, merged)
            if "name" in given:
                _check_name_free(s, merged["name"], exclude=policy.id)
            merged["schedule"], merged["timezone"] = schedule.expression, schedule.tz.key
            now = datetime.now(UTC)
            if _restarts_schedule(policy, merged, now):
                policy.last_scheduled_at = now
            for field, value in merged.items():
                if getattr(policy, field) != value:
                    setattr(policy, field, value)
            policy.updated_at = now
            s.flush()
    except IntegrityError as e:
        raise Conflict(f"a policy named {changes.get('name')} already exists") from e
    log.info("policy changed policy=%s fields=%s by=%s", policy_id, sorted(given), who.name)
    return get_policy(st, who, policy_id)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _restarts_schedule(policy: Policy, merged: dict[str, Any], now: datetime) -> bool:
    """Whether the scheduler should count due runs from now on, not from the
    last run (it counts from ``last_scheduled_at``, scheduler/loop.py):

    - a policy switched back on: the runs while it was off were not missed,
      they were not wanted (no catch-up run at the next tick);
    - a new schedule or time zone: its times before the edit do not count,
      unless the old schedule has a run due and not yet claimed (an edit a
      few seconds after a scheduled time, before the scheduler's tick): that
      run still happens.
    """
    if not merged["enabled"]:
        return False
    if not policy.enabled:
        return True
    if (merged["schedule"], merged["timezone"]) == (policy.schedule, policy.timezone):
        return False
    base = _aware(policy.last_scheduled_at or policy.created_at)
    due = Schedule.parse(policy.schedule, policy.timezone).latest_run(now)
    return due is None or due <= base


def delete_policy(st: HubState, who: Principal, policy_id: str) -> None:
    with st.db.session() as s:
        policy = visible_policy(s, who, policy_id)
        counts = PolicyStore(s).remove(policy)
    log.info(
        "policy deleted policy=%s by=%s dropped_queued=%s runs=%s webhooks=%s",
        policy_id,
        who.name,
        counts["queued"],
        counts["runs"],
        counts["webhooks"],
    )


# ------------------------------------------------------------------- run


def run_policy(st: HubState, who: Principal, policy_id: str) -> dict[str, Any]:
    """Run the policy now (a ``manual`` run through the scheduler's queue)."""
    with st.db.session() as s:
        policy = visible_policy(s, who, policy_id)
        if who.scope is not None:
            hidden = [
                r.name
                for r in PolicyStore(s).matched_vms(policy.selector)
                if not who.can_see_vm(r.name, r.tags)
            ]
            if hidden:
                raise Forbidden(
                    f"policy {policy.name} also protects VMs outside the scope of token "
                    f"{who.name}; an unscoped operator may run it",
                    vms_outside_scope=len(hidden),
                )
    result = dict(run_policy_now(st, policy_id, created_by=who.name))
    result.setdefault("job_ids", [])
    return result


# ------------------------------------------------------------- retention


def _plan_vm_ids(s: Session, who: Principal, policy: Policy) -> list[str]:
    return [r.id for r in _matched(policy, who, list(PolicyStore(s).vm_rows()))]


def plan_retention(st: HubState, who: Principal, policy_id: str) -> dict[str, Any]:
    """The dry run: what retention would keep and remove now, per matched VM."""
    with st.db.session() as s:
        policy = visible_policy(s, who, policy_id)
        return retention.plan_for_vms(
            s,
            _plan_vm_ids(s, who, policy),
            policy.retention,
            datetime.now(UTC),
            policy.timezone,
            repository_id=policy.repository_id,
        )


def apply_retention(st: HubState, who: Principal, policy_id: str) -> dict[str, Any]:
    """Start retention: one job per matched VM with something to remove."""
    with st.db.session() as s:
        policy = visible_policy(s, who, policy_id)
        vms = [(r.id, r.name) for r in _matched(policy, who, list(PolicyStore(s).vm_rows()))]
        rules, tz, repo = dict(policy.retention), policy.timezone, policy.repository_id
    now = datetime.now(UTC)
    out = []
    for vm_id, vm_name in vms:
        job_id = retention.apply_for_vm(
            st, vm_id, rules, tz, repository_id=repo, created_by=who.name, now=now
        )
        removes = 0
        if job_id is not None:
            with st.db.session() as s:
                job = JobStore(s).get(job_id)
                removes = len((job.params or {}).get("backup_ids") or []) if job else 0
        out.append({"vm_name": vm_name, "job_id": job_id, "removes": removes})
    job_ids = [v["job_id"] for v in out if v["job_id"]]
    log.info("retention applied policy=%s jobs=%s by=%s", policy_id, job_ids, who.name)
    return {"job_id": job_ids[0] if job_ids else None, "job_ids": job_ids, "vms": out}
