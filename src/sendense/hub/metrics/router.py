"""``GET /metrics``: HTTP only; what is measured is in service.py.

Auth: a bearer token like every route (hub/limits.py checks only ``/api/``
paths, so it is checked here): any API token (viewer or more; a scoped one
sees its tenant's figures only), or the ``metrics_token`` setting
(``SENDENSE_METRICS_TOKEN``), a token for scrapers that can read
nothing else. Without a token: 401 as elsewhere.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST

from sendense.auth import token_matches
from sendense.core.access import Principal, Role
from sendense.hub.deps import HubDep, principal_of
from sendense.hub.deps import _bearer as bearer_scheme  # the one scheme in the OpenAPI
from sendense.hub.metrics import service
from sendense.hub.openapi import errors

router = APIRouter(tags=["metrics"])

SCRAPER = Principal(name="metrics", role=Role.viewer)


def metrics_caller(
    request: Request,
    st: HubDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)] = None,
) -> Principal:
    given = credentials.credentials if credentials else None
    configured = st.settings.metrics_token
    # Without a valid token: 401 (principal_of); every role may read.
    who = SCRAPER if configured and token_matches(given, configured) else principal_of(st, given)
    request.state.principal = who
    return who


MetricsCaller = Annotated[Principal, Depends(metrics_caller)]


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        **errors(),
        200: {
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition format 0.0.4",
        },
    },
)
def metrics(st: HubDep, who: MetricsCaller) -> Response:
    """Jobs by kind and status, bytes moved, last success per VM, repository
    capacity, scheduler lag, missed runs, webhook outbox (Prometheus text)."""
    return Response(service.render(st, who), media_type=CONTENT_TYPE_LATEST)
