"""API tokens: issue (the secret shown once, its SHA-256 stored), list, revoke.

The bootstrap token in ``<data-dir>/admin.token`` is not in the catalog and
cannot be revoked through the API (replace the file and restart the hub).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sendense.catalog.models import ApiToken
from sendense.catalog.stores import TokenStore
from sendense.core.access import Principal
from sendense.core.errors import Conflict, NotFound
from sendense.hub.deps import token_hash
from sendense.hub.state import HubState
from sendense.hub.tokens.schemas import TokenCreate

PREFIX = "sdt_"  # recognisable in a leaked-secret scan


def token_view(t: ApiToken) -> dict[str, Any]:
    return {
        "token_id": t.id,
        "name": t.name,
        "role": t.role,
        "scope": t.scope,
        "expires_at": t.expires_at,
        "created_at": t.created_at,
        "created_by": t.created_by,
        "revoked_at": t.revoked_at,
        "last_used_at": t.last_used_at,
    }


def create_token(st: HubState, who: Principal, body: TokenCreate) -> dict[str, Any]:
    secret = PREFIX + secrets.token_urlsafe(32)
    with st.db.session() as s:
        # Two creations of one name at once, in any hub process: one wins,
        # the other sees it and answers 409 (no constraint can say "unique
        # among live tokens").
        TokenStore(s).lock_names()
        if TokenStore(s).by_name(body.name) is not None:
            raise Conflict(f"a token named {body.name} already exists", name=body.name)
        row = ApiToken(
            name=body.name,
            role=body.role,
            token_hash=token_hash(secret),
            scope=body.scope.model_dump() if body.scope is not None else None,
            expires_at=body.expires_at,
            created_by=who.name,
        )
        s.add(row)
        s.flush()
        return {**token_view(row), "token": secret}


def list_tokens(st: HubState, *, include_revoked: bool) -> list[dict[str, Any]]:
    with st.db.session() as s:
        return [token_view(t) for t in TokenStore(s).all(include_revoked=include_revoked)]


def revoke_token(st: HubState, token_id: str) -> dict[str, Any]:
    """Revoked at once: the next request with it is 401 (no cache to expire)."""
    with st.db.session() as s:
        row = TokenStore(s).get(token_id)
        if row is None:
            raise NotFound(f"token {token_id} not found", token_id=token_id)
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
        return token_view(row)
