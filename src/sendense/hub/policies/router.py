"""/api/v1/policies: HTTP only; rules in service.py.

Roles: viewers read (and ask for the retention dry run, which changes
nothing); operators also run a policy now (it starts backups, as
``POST /api/v1/backups`` does); admins create, change and delete policies
and apply retention (it deletes and merges restore points).
"""

from __future__ import annotations

from fastapi import APIRouter, Path, Query, Response

from sendense.hub.backups.schemas import MAX_INT
from sendense.hub.deps import Admin, HubDep, Operator, Viewer
from sendense.hub.openapi import errors
from sendense.hub.policies import service
from sendense.hub.policies.schemas import (
    PolicyCreate,
    PolicyDetail,
    PolicyList,
    PolicyRunStarted,
    PolicyUpdate,
    RetentionApplied,
    RetentionPlanRead,
)

router = APIRouter(prefix="/api/v1/policies", tags=["policies"])

PolicyId = Path(min_length=1, max_length=36)


@router.post("", status_code=201, response_model=PolicyDetail, responses=errors(409))
def create_policy(body: PolicyCreate, st: HubDep, who: Admin) -> dict:
    """Create a policy: what to protect (selector), where, when, what to keep."""
    return service.create_policy(st, who, body)


@router.get("", response_model=PolicyList, responses=errors())
def list_policies(
    st: HubDep,
    who: Viewer,
    name: str | None = Query(default=None, min_length=1, max_length=200),
    limit: int = Query(default=50, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=MAX_INT),
) -> dict:
    """Policies by name, with their next runs and the VMs they match now."""
    return service.list_policies(st, who, name=name, limit=limit, offset=offset)


@router.get("/{policy_id}", response_model=PolicyDetail, responses=errors(404))
def get_policy(st: HubDep, who: Viewer, policy_id: str = PolicyId) -> dict:
    """A policy with its next runs, matched VMs and the last run per VM."""
    return service.get_policy(st, who, policy_id)


@router.patch("/{policy_id}", response_model=PolicyDetail, responses=errors(404, 409))
def update_policy(body: PolicyUpdate, st: HubDep, who: Admin, policy_id: str = PolicyId) -> dict:
    """Change some fields; the policy is checked whole again."""
    return service.update_policy(st, who, policy_id, body)


@router.delete("/{policy_id}", status_code=204, responses=errors(404))
def delete_policy(st: HubDep, who: Admin, policy_id: str = PolicyId) -> Response:
    """Delete a policy with its run history and queue (queued backups never
    start); jobs it started run on."""
    service.delete_policy(st, who, policy_id)
    return Response(status_code=204)


@router.post(
    "/{policy_id}/run",
    status_code=202,
    response_model=PolicyRunStarted,
    responses=errors(404, 409, 503),
)
def run_policy(st: HubDep, who: Operator, policy_id: str = PolicyId) -> dict:
    """Run the policy now: one backup job per matched VM (busy ones are queued)."""
    return service.run_policy(st, who, policy_id)


@router.post("/{policy_id}/retention/plan", response_model=RetentionPlanRead, responses=errors(404))
def plan_retention(st: HubDep, who: Viewer, policy_id: str = PolicyId) -> dict:
    """Dry run: what retention would keep and remove now, with a reason each."""
    return service.plan_retention(st, who, policy_id)


@router.post(
    "/{policy_id}/retention/apply",
    status_code=202,
    response_model=RetentionApplied,
    responses=errors(404, 409),
)
def apply_retention(st: HubDep, who: Admin, policy_id: str = PolicyId) -> dict:
    """Apply retention now: a ``retention`` job per VM with something to remove."""
    return service.apply_retention(st, who, policy_id)
