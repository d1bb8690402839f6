"""Dependencies of the hub's routes, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from sendense.auth import bearer, token_matches
from sendense.core.errors import Unauthorized
from sendense.hub.state import HubState


def get_hub(request: Request) -> HubState:
    st: HubState = request.app.state.hub
    return st


HubDep = Annotated[HubState, Depends(get_hub)]


def current_user(st: HubDep, authorization: Annotated[str | None, Header()] = None) -> str:
    """The caller's identity from the bearer token (roles: a later issue)."""
    if not token_matches(bearer(authorization), st.admin_token):
        raise Unauthorized("missing or invalid bearer token (see <data-dir>/admin.token)")
    return "admin"


User = Annotated[str, Depends(current_user)]
