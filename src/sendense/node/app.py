"""The node agent's HTTP API (SPEC §4), for the hub alone."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import BackgroundTasks, Depends, FastAPI, Header
from pydantic import BaseModel, Field, field_validator

from sendense import __version__
from sendense.auth import bearer, ensure_token, token_matches
from sendense.connectors.registry import make_connector
from sendense.core.errors import InvalidRequest, Unauthorized
from sendense.mover.digest import ALGORITHMS
from sendense.node.runner import JobRunner
from sendense.node.worker import parse_targets
from sendense.settings import NodeSettings
from sendense.web.errors import install_error_handlers

log = logging.getLogger(__name__)


class SourceSpec(BaseModel):
    type: str = Field(min_length=1)
    config: dict[str, Any]


class BackupStart(BaseModel):
    job_id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    vm_name: str = Field(min_length=1)
    source: SourceSpec
    vm_path: str = ""
    nbd_targets: str = Field(min_length=1)
    backup_type: Literal["full", "incremental"]
    previous_change_ids: dict[str, str] = Field(default_factory=dict)
    in_flight: int | None = Field(default=None, ge=1, le=64)
    request_size: int | None = Field(default=None, ge=65536, le=32 << 20)

    @field_validator("nbd_targets")
    @classmethod
    def _targets(cls, v: str) -> str:
        parse_targets(v)
        return v

    def __repr__(self) -> str:  # never show the source's credentials
        return f"BackupStart(job_id={self.job_id!r}, vm_name={self.vm_name!r})"


class Discover(BaseModel):
    source: SourceSpec


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
        runner.refill()
        yield
        runner.close()

    app = FastAPI(title="Sendense node", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.state.runner = runner

    @app.get("/api/v1/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "uptime": round(time.time() - started, 1),
            "pid": os.getpid(),
        }

    @app.post("/api/v1/backup/start", dependencies=[Auth])
    def start_backup(body: BackupStart, background: BackgroundTasks) -> dict[str, Any]:
        request = body.model_dump()
        request["in_flight"] = body.in_flight or settings.in_flight
        request["request_size"] = body.request_size or settings.request_size
        request["max_rate"] = settings.max_rate
        request["digest"] = settings.digest
        request["parallel_disks"] = settings.parallel_disks
        runner.reap()
        answer = runner.start(request)
        background.add_task(runner.refill)
        return answer

    @app.get("/api/v1/status/{job_id}", dependencies=[Auth])
    def status(job_id: str) -> dict[str, Any]:
        return runner.status(job_id)

    @app.post("/api/v1/jobs/{job_id}/cancel", dependencies=[Auth])
    def cancel(job_id: str) -> dict[str, Any]:
        return runner.cancel(job_id)

    @app.get("/api/v1/jobs/{job_id}/log", dependencies=[Auth])
    def job_log(job_id: str) -> dict[str, Any]:
        path: Path = runner.job_dir(job_id) / "job.log"
        return {"job_id": job_id, "log": path.read_text() if path.exists() else ""}

    @app.post("/api/v1/discover", dependencies=[Auth])
    def discover(body: Discover) -> dict[str, Any]:
        connector = make_connector(body.source.model_dump(), workdir=str(data_dir / "discover"))
        return {"vms": [vm.as_dict() for vm in connector.discover()]}

    return app
