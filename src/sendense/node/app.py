"""The node agent's HTTP API (SPEC §4), for the hub alone."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import BackgroundTasks, Depends, FastAPI, Header, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from sendense import __version__
from sendense.auth import bearer, ensure_token, token_matches
from sendense.connectors.registry import make_connector
from sendense.core.errors import InvalidRequest, Unauthorized
from sendense.mover.digest import ALGORITHMS
from sendense.node import pull
from sendense.node.runner import JobRunner
from sendense.protocol.node import (
    BackupStartAnswer,
    BackupStartRequest,
    DiscoverAnswer,
    DiscoverRequest,
    JobLog,
    JobStatusReport,
    NodeHealth,
    WorkerJob,
)
from sendense.settings import NodeSettings
from sendense.web.errors import install_error_handlers

log = logging.getLogger(__name__)


def create_app(settings: NodeSettings) -> FastAPI:
    if settings.digest not in ALGORITHMS:
        raise InvalidRequest(
            f"SENDENSE_NODE_DIGEST={settings.digest!r}: known algorithms {', '.join(ALGORITHMS)}"
        )
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)  # the token, job logs and block hash lists: owner only
    token = ensure_token(data_dir / "node.token")
    runner = JobRunner(data_dir)
    started = time.time()

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if not token_matches(bearer(authorization), token):
            raise Unauthorized("missing or invalid bearer token (see node.token)")

    Auth = Depends(require_token)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner.prune(settings.job_retention)
        runner.refill()
        yield
        runner.close()

    # The API documents the node: like every route but health, it needs the
    # token (FastAPI's own /docs, /redoc and /openapi.json would not).
    app = FastAPI(
        title="Sendense node",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)
    app.state.runner = runner

    @app.get("/openapi.json", dependencies=[Auth], include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=[Auth], include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API")

    @app.get("/redoc", dependencies=[Auth], include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - API")

    @app.get("/api/v1/health")
    def health() -> NodeHealth:
        return NodeHealth(
            version=__version__,
            uptime=round(time.time() - started, 1),
            pid=os.getpid(),
            transfer=settings.transfer,
        )

    @app.post("/api/v1/backup/start", dependencies=[Auth])
    def start_backup(
        body: BackupStartRequest, background: BackgroundTasks, http: Request
    ) -> BackupStartAnswer:
        job_dir = runner.job_dir(body.job_id)
        # A source this node cannot serve, or its config, is a 400 now rather
        # than a failed job later (building a connector checks, does no I/O).
        make_connector(body.source.model_dump(), workdir=str(job_dir / "work"))
        pull.check_request(body, settings)
        runner.prune(settings.job_retention)
        job = WorkerJob.from_request(
            body,
            job_dir=job_dir,
            in_flight=settings.in_flight,
            request_size=settings.request_size,
            max_rate=settings.max_rate,
            digest=settings.digest,
            parallel_disks=settings.parallel_disks,
        )
        job = pull.for_worker(job, settings, http.url.hostname)
        answer = runner.start(job)
        background.add_task(runner.refill)
        return answer

    # exclude_unset: the report as the worker wrote it, no keys added.
    @app.get("/api/v1/status/{job_id}", dependencies=[Auth], response_model_exclude_unset=True)
    def status(job_id: str) -> JobStatusReport:
        return runner.status(job_id)

    @app.post(
        "/api/v1/jobs/{job_id}/cancel", dependencies=[Auth], response_model_exclude_unset=True
    )
    def cancel(job_id: str) -> JobStatusReport:
        return runner.cancel(job_id)

    @app.post("/api/v1/jobs/{job_id}/pulled", dependencies=[Auth])
    def pulled(job_id: str) -> JobStatusReport:
        """Pull (issue 11): the hub read every disk of the job; it may end."""
        return pull.mark_pulled(runner, job_id)

    @app.get("/api/v1/jobs/{job_id}/log", dependencies=[Auth])
    def job_log(job_id: str) -> JobLog:
        path: Path = runner.job_dir(job_id) / "job.log"
        return JobLog(job_id=job_id, log=path.read_text() if path.exists() else "")

    @app.post("/api/v1/discover", dependencies=[Auth])
    def discover(body: DiscoverRequest) -> DiscoverAnswer:
        connector = make_connector(body.source.model_dump(), workdir=str(data_dir / "discover"))
        return DiscoverAnswer.model_validate({"vms": [vm.as_dict() for vm in connector.discover()]})

    return app
