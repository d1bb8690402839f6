"""/api/v1/tokens: HTTP only; rules in service.py. Admin only."""

from __future__ import annotations

from fastapi import APIRouter

from sendense.hub.deps import Admin, HubDep
from sendense.hub.openapi import errors
from sendense.hub.tokens import service
from sendense.hub.tokens.schemas import TokenCreate, TokenCreated, TokenList, TokenRead

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])


@router.post("", status_code=201, response_model=TokenCreated, responses=errors(409))
def create_token(body: TokenCreate, st: HubDep, who: Admin) -> dict:
    """Issue a token. The answer's ``token`` is the secret: it is shown only here."""
    return service.create_token(st, who, body)


@router.get("", response_model=TokenList, responses=errors())
def list_tokens(st: HubDep, who: Admin, include_revoked: bool = False) -> dict:
    return {"tokens": service.list_tokens(st, include_revoked=include_revoked)}


@router.delete("/{token_id}", response_model=TokenRead, responses=errors(404))
def revoke_token(token_id: str, st: HubDep, who: Admin) -> dict:
    """Revoke a token; it stops working at once."""
    return service.revoke_token(st, token_id)
