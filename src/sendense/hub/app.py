"""The hub's FastAPI application: routers are included here and nowhere else.

Each resource lives in its own package (``hub/<resource>/``): ``router.py``
(HTTP only), ``service.py`` (rules), ``schemas.py`` (XCreate / XUpdate /
XRead). Stores in ``catalog/stores/`` do the queries; jobs are in ``engine/``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from sendense import __version__
from sendense.console import create_console
from sendense.hub.audit.middleware import AuditMiddleware
from sendense.hub.audit.router import router as audit
from sendense.hub.backups.router import router as backups
from sendense.hub.deps import principal_of
from sendense.hub.jobs.router import router as jobs
from sendense.hub.limits import RequestGuard
from sendense.hub.metrics.router import router as metrics
from sendense.hub.nodes.router import router as nodes
from sendense.hub.openapi import install_openapi
from sendense.hub.policies.router import router as policies
from sendense.hub.repositories.router import router as repositories
from sendense.hub.restore.router import router as restore
from sendense.hub.sources.router import router as sources
from sendense.hub.state import HubState
from sendense.hub.tokens.router import router as tokens
from sendense.hub.vms.router import router as vms
from sendense.hub.webhooks.router import router as webhooks
from sendense.settings import HubSettings
from sendense.web.errors import install_error_handlers

log = logging.getLogger(__name__)

ROUTERS = [nodes, sources, vms, repositories, backups, jobs, tokens, audit, restore, policies]
ROUTERS += [webhooks, metrics]  # notify helper (issue 7)


def create_app(settings: HubSettings, state: HubState | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st = state or HubState.open(settings)
        app.state.hub = st
        # Sync handlers run on anyio's worker threads. On SQLite they are
        # CPU-bound (rows to JSON) under the GIL: past a few threads more of
        # them only add switching (bench/api_bench.py: a list's CPU per
        # request doubled at 50 clients with 40 threads). On PostgreSQL each
        # also waits for its round trips, so more of them overlap (16: see
        # settings.py `api_threads`). Long-polls and launches hold none.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        # What start-up built (modules, routes, schemas) lives as long as the
        # process: out of the collector's sight, a full collection no longer
        # walks it (a 60-90 ms pause every few thousand requests before).
        gc.collect()
        gc.freeze()
        yield
        st.close()

    app = FastAPI(
        title="Sendense hub",
        version=__version__,
        description="Open, API-first backup for virtual machines.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_openapi(app)
    # Token, body size, UTF-8 and depth, before FastAPI reads a body (hub/limits.py).
    app.add_middleware(RequestGuard, max_body=settings.max_body_bytes, authenticate=principal_of)
    # Outermost: sees the guard's 401s too (hub/audit/middleware.py).
    app.add_middleware(AuditMiddleware)

    @app.get("/api/v1/health", tags=["health"])
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    for router in ROUTERS:
        app.include_router(router)

    app.mount("/ui", create_console(app))  # the web console (src/sendense/console/)

    @app.get("/", include_in_schema=False)
    def root() -> JSONResponse:
        return JSONResponse({"name": "Sendense hub", "version": __version__, "docs": "/docs"})

    return app
