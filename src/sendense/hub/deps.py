"""Dependencies of the hub's routes, as ``Annotated`` aliases.

Handlers read like sentences: ``def delete_backup(backup_id: str, svc:
BackupServiceDep, who: Admin)``. ``Viewer``, ``Operator`` and ``Admin`` are the
caller (a `Principal`) after checking that its role suffices: 401 without a
valid token, 403 ``forbidden`` naming the role needed.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select, update

from sendense.auth import token_matches
from sendense.catalog.models import ApiToken
from sendense.core.access import ADMIN, SCOPED_ROLE_MAX, Principal, Role, Scope
from sendense.core.errors import Forbidden, Unauthorized
from sendense.hub.state import HubState

# The dependencies below are coroutines although they do no I/O: FastAPI runs
# a plain ``def`` dependency on a worker thread, and the three of every route
# (hub, caller, role) were three thread hand-offs per request, more CPU than
# reading a restore point (bench/api_bench.py).


async def get_hub(request: Request) -> HubState:
    st: HubState = request.app.state.hub
    return st


HubDep = Annotated[HubState, Depends(get_hub)]


# auto_error=False: a missing token is answered by our own 401 body.
_bearer = HTTPBearer(
    auto_error=False,
    description="The bootstrap token in <data-dir>/admin.token, or one from POST /api/v1/tokens",
)


LAST_USED_EVERY = timedelta(minutes=1)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def principal_of(st: HubState, given: str | None) -> Principal:
    """The caller behind a bearer token; `Unauthorized` when there is none.

    The bootstrap token is compared in constant time; API tokens are looked up
    by the SHA-256 of the whole secret (a prefix or an extension of a token
    hashes to something else).
    """
    if not given:
        raise Unauthorized("missing bearer token (see <data-dir>/admin.token)")
    if token_matches(given, st.admin_token):
        return ADMIN
    # A read without a transaction (one round trip on PostgreSQL): the row as
    # committed now, so a revocation or a role change applies to the very
    # next request, on every hub.
    with st.db.read() as s:
        row = s.execute(
            select(
                ApiToken.id,
                ApiToken.name,
                ApiToken.role,
                ApiToken.scope,
                ApiToken.revoked_at,
                ApiToken.expires_at,
                ApiToken.last_used_at,
            ).where(ApiToken.token_hash == token_hash(given))
        ).first()
    if row is None or row.revoked_at is not None:
        raise Unauthorized("invalid or revoked bearer token")
    now = datetime.now(UTC)
    if row.expires_at is not None and row.expires_at <= now:
        raise Unauthorized(f"token {row.name} expired at {row.expires_at.isoformat()}")
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_EVERY:
        with st.db.session() as s:  # at most one write a minute per token
            s.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
    scope = Scope.parse(row.scope) if row.scope is not None else None
    role = Role(row.role)
    if scope is not None and not SCOPED_ROLE_MAX.allows(role):
        role = SCOPED_ROLE_MAX  # whatever the row says, a tenant is no admin
    return Principal(name=row.name, role=role, token_id=row.id, scope=scope)


async def current_principal(
    request: Request,
    st: HubDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> Principal:
    # hub/limits.py already checked the token (before the body was read).
    who = getattr(request.state, "principal", None)
    if isinstance(who, Principal):
        return who
    given = credentials.credentials if credentials else None
    # A catalog read: not on the event loop.
    found: Principal = await anyio.to_thread.run_sync(principal_of, st, given)
    request.state.principal = found  # for the audit log
    return found


CurrentUser = Annotated[Principal, Depends(current_principal)]


def require_role(needed: Role):  # type: ignore[no-untyped-def]
    async def check(who: CurrentUser) -> Principal:
        if not who.role.allows(needed):
            raise Forbidden(
                f"this needs the {needed.value} role; token {who.name} has {who.role.value}",
                role_needed=needed.value,
            )
        return who

    return check


Viewer = Annotated[Principal, Depends(require_role(Role.viewer))]
Operator = Annotated[Principal, Depends(require_role(Role.operator))]
Admin = Annotated[Principal, Depends(require_role(Role.admin))]
