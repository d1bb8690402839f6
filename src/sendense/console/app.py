"""The web console at ``/ui/``: a sub-application mounted by the hub.

Server-rendered Jinja2 pages (autoescape on: names from VMs, guests and users
are text), htmx (vendored, ``static/``) for the parts that refresh. The
console calls the hub's services in-process with the signed-in token's
`Principal`, so roles and scopes apply exactly as in the API; it never calls
the API over HTTP.

Every answer carries the security headers (`SECURITY_HEADERS`); no inline
script or style exists anywhere, so the Content-Security-Policy allows only
files from the hub itself. Mutating requests and refusals are written to the
audit log like the API's (route ``/ui/...``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from sendense.catalog.models import AuditEntry
from sendense.console import render
from sendense.console.page import CsrfRefused, SignInNeeded
from sendense.core.access import Principal
from sendense.core.errors import Error
from sendense.web.errors import status_of

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATIC = Path(__file__).parent / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class ConsoleMiddleware:
    """Security headers on every answer; the audit entry of a mutating or
    refused request (who, route template, target ids, status)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                names = {name for name, _ in SECURITY_HEADERS}
                headers = [(k, v) for k, v in message.get("headers", []) if k not in names]
                message["headers"] = headers + SECURITY_HEADERS
                if not scope.get("path", "").startswith(("/ui/static/", "/static/")):
                    message["headers"].append((b"cache-control", b"no-store"))
            await send(message)

        try:
            await self.app(scope, receive, with_headers)
        finally:
            method = scope.get("method", "")
            if method in MUTATING or status in (401, 403):
                _audit(scope, method, status)


def _audit(scope: Scope, method: str, status: int) -> None:
    st = hub_state_of(scope.get("app"))
    writer = getattr(st, "audit", None)
    if writer is None:
        return
    who = (scope.get("state") or {}).get("principal")
    route = scope.get("route")
    template = getattr(route, "path", None) or scope.get("path", "")
    root = scope.get("root_path", "")
    client = scope.get("client")
    writer.put(
        AuditEntry(
            at=datetime.now(UTC),
            token_id=who.token_id if isinstance(who, Principal) else None,
            token_name=who.name if isinstance(who, Principal) else None,
            method=method[:10],
            route=(template if template.startswith(root) else root + template)[:300],
            path=str(scope.get("path", ""))[:1000],
            target={str(k): str(v)[:200] for k, v in (scope.get("path_params") or {}).items()},
            status=status,
            client=f"{client[0]}:{client[1]}"[:100] if client else None,
        )
    )


def hub_state_of(app: Any) -> Any:
    parent = getattr(getattr(app, "state", None), "parent", None)
    return getattr(getattr(parent, "state", None), "hub", None)


def create_console(hub: FastAPI) -> FastAPI:
    """The console application; the hub mounts it at ``/ui``."""
    from sendense.console.routes import ROUTERS

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.parent = hub
    app.add_middleware(ConsoleMiddleware)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for router in ROUTERS:
        app.include_router(router)

    @app.exception_handler(SignInNeeded)
    async def sign_in_needed(request: Request, exc: SignInNeeded) -> Response:
        if request.headers.get("hx-request"):
            # A refreshing fragment: htmx follows HX-Redirect to the sign-in page.
            return Response(status_code=401, headers={"HX-Redirect": "/ui/signin"})
        target = "/ui/signin"
        if request.method == "GET":
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            target += f"?next={render.quote(here)}"
        # A form sent after the session ended: sign in again (303: as a GET).
        return RedirectResponse(target, status_code=303)

    @app.exception_handler(CsrfRefused)
    async def csrf_refused(request: Request, exc: CsrfRefused) -> HTMLResponse:
        return render.error_page(
            request,
            403,
            "Form refused",
            "This form was not sent from this console's own page (its security token is"
            " missing, wrong, or from another session). Reload the page and try again.",
            code="csrf",
        )

    @app.exception_handler(Error)
    async def domain_error(request: Request, exc: Error) -> HTMLResponse:
        status = status_of(exc)
        if status == 500:
            log.error("console error on %s: %s", request.url.path, exc, exc_info=exc)
        return render.error_page(
            request,
            status,
            render.reason_title(exc.code, status),
            exc.message,
            code=exc.code,
            details=exc.details,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> HTMLResponse:
        title = "Page not found" if exc.status_code == 404 else "Request refused"
        return render.error_page(request, exc.status_code, title, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> HTMLResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'value'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return render.error_page(request, 400, "Invalid request", problems)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> HTMLResponse:
        log.error("console bug on %s", request.url.path, exc_info=exc)
        return render.error_page(
            request,
            500,
            "Something went wrong",
            "The hub could not show this page; the error is in the hub's log.",
        )

    return app
