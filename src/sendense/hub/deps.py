"""Dependencies of the hub's routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sendense.auth import token_matches
from sendense.core.errors import Unauthorized
from sendense.hub.state import HubState


def get_hub(request: Request) -> HubState:
    st: HubState = request.app.state.hub
    return st


HubDep = Annotated[HubState, Depends(get_hub)]


# auto_error=False: a missing token is answered by our own 401 body.
_bearer = HTTPBearer(auto_error=False, description="The token in <data-dir>/admin.token")


def current_user(
    st: HubDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> str:
    """The caller's identity from the bearer token (roles: a later issue)."""
    given = credentials.credentials if credentials else None
    if not token_matches(given, st.admin_token):
        raise Unauthorized("missing or invalid bearer token (see <data-dir>/admin.token)")
    return "admin"


User = Annotated[str, Depends(current_user)]
