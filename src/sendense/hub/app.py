"""The hub's FastAPI application: routes are HTTP only; rules live in engine/."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from sendense import __version__
from sendense.catalog.store import (
    BackupStore,
    JobStore,
    NodeStore,
    RepositoryStore,
    SourceStore,
    VmStore,
)
from sendense.core.errors import InvalidRequest, NotFound
from sendense.engine import inventory
from sendense.engine.backup import BackupRequest
from sendense.hub.deps import HubDep, User
from sendense.hub.errors import install_error_handlers
from sendense.hub.state import HubState
from sendense.hub.views import (
    backup_view,
    job_view,
    node_view,
    repository_view,
    source_view,
    vm_view,
)
from sendense.settings import HubSettings

log = logging.getLogger(__name__)


class NodeCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    url: str = Field(min_length=1)
    token: str = Field(min_length=1)
    verify: bool = True

    def __repr__(self) -> str:
        return f"NodeCreate(name={self.name!r}, url={self.url!r})"


class SourceCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    node_id: str = Field(min_length=1)
    type: str = Field(min_length=1)
    config: dict[str, Any]

    def __repr__(self) -> str:
        return f"SourceCreate(name={self.name!r}, type={self.type!r})"


class DiscoverRequest(BaseModel):
    source_id: str = Field(min_length=1)


class BackupCreate(BaseModel):
    vm_name: str = Field(min_length=1)
    repository_id: str = Field(min_length=1)
    backup_type: Literal["full", "incremental", "auto"] = "auto"
    disk_id: int | None = Field(default=None, ge=0)
    tags: dict[str, Any] | None = None


def create_app(settings: HubSettings, state: HubState | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st = state or HubState.open(settings)
        app.state.hub = st
        yield
        st.close()

    app = FastAPI(
        title="Sendense hub",
        version=__version__,
        description="Open, API-first backup for virtual machines.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    # ------------------------------------------------------------- health
    @app.get("/api/v1/health", tags=["health"])
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    # -------------------------------------------------------------- nodes
    @app.post("/api/v1/nodes", status_code=201, tags=["nodes"])
    def create_node(body: NodeCreate, st: HubDep, user: User) -> dict[str, Any]:
        with st.db.session() as s:
            node = inventory.register_node(
                s, st.secrets, body.name, body.url, body.token, verify=body.verify
            )
            return node_view(node)

    @app.get("/api/v1/nodes", tags=["nodes"])
    def list_nodes(st: HubDep, user: User) -> dict[str, Any]:
        with st.db.session() as s:
            nodes = NodeStore(s).all()
            return {"nodes": [node_view(n, inventory.node_health(n, st.secrets)) for n in nodes]}

    # ------------------------------------------------------------ sources
    @app.post("/api/v1/sources", status_code=201, tags=["sources"])
    def create_source(body: SourceCreate, st: HubDep, user: User) -> dict[str, Any]:
        with st.db.session() as s:
            src = inventory.register_source(
                s, st.secrets, body.name, body.node_id, body.type, body.config
            )
            return source_view(src)

    @app.get("/api/v1/sources", tags=["sources"])
    def list_sources(st: HubDep, user: User) -> dict[str, Any]:
        with st.db.session() as s:
            return {"sources": [source_view(x) for x in SourceStore(s).all()]}

    # ---------------------------------------------------------------- vms
    @app.post("/api/v1/vms/discover", tags=["vms"])
    def discover(body: DiscoverRequest, st: HubDep, user: User) -> dict[str, Any]:
        with st.db.session() as s:
            vms = inventory.discover(s, st.secrets, body.source_id)
            return {"vms": [vm_view(v) for v in vms]}

    @app.get("/api/v1/vms", tags=["vms"])
    def list_vms(st: HubDep, user: User) -> dict[str, Any]:
        with st.db.session() as s:
            return {
                "vms": [vm_view(v, BackupStore(s).latest_for_vm(v.id)) for v in VmStore(s).all()]
            }

    @app.get("/api/v1/vms/{vm_name}", tags=["vms"])
    def get_vm(vm_name: str, st: HubDep, user: User) -> dict[str, Any]:
        with st.db.session() as s:
            vm = VmStore(s).by_name(vm_name)
            if vm is None:
                raise NotFound(f"VM {vm_name} not found")
            return vm_view(vm, BackupStore(s).latest_for_vm(vm.id))

    # ------------------------------------------------------- repositories
    @app.get("/api/v1/repositories", tags=["repositories"])
    def list_repositories(st: HubDep, user: User) -> dict[str, Any]:
        with st.db.session() as s:
            return {
                "repositories": [
                    repository_view(r, inventory.repository_capacity(r))
                    for r in RepositoryStore(s).all()
                ]
            }

    # ------------------------------------------------------------ backups
    @app.post("/api/v1/backups", status_code=202, tags=["backups"])
    def start_backup(body: BackupCreate, st: HubDep, user: User) -> dict[str, Any]:
        job_id = st.engine.start(
            BackupRequest(
                vm_name=body.vm_name,
                repository_id=body.repository_id,
                backup_type=body.backup_type,
                disk_id=body.disk_id,
                tags=body.tags,
                created_by=user,
            )
        )
        with st.db.session() as s:
            job = JobStore(s).get(job_id)
            assert job is not None
            view = job_view(job)
            return {
                "job_id": job_id,
                "status": view["status"],
                "job": view,
                "backups": [backup_view(b) for b in job.backups],
            }

    @app.get("/api/v1/backups", tags=["backups"])
    def list_backups(
        st: HubDep,
        user: User,
        vm_name: str | None = None,
        vm_context_id: str | None = None,
        repository_id: str | None = None,
        backup_type: Literal["full", "incremental"] | None = None,
        status: str | None = None,
        disk_id: int | None = Query(default=None, ge=0),
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = Query(default=100, ge=1, le=1000),
        offset: int = Query(default=0, ge=0),
    ) -> dict[str, Any]:
        with st.db.session() as s:
            vm_id = vm_context_id
            if vm_name:
                vm = VmStore(s).by_name(vm_name)
                if vm is None:
                    return {"backups": [], "total": 0}
                vm_id = vm.id
            rows, total = BackupStore(s).list(
                vm_id=vm_id,
                repository_id=repository_id,
                backup_type=backup_type,
                status=status,
                disk_index=disk_id,
                since=since,
                until=until,
                limit=limit,
                offset=offset,
            )
            return {"backups": [backup_view(b) for b in rows], "total": total}

    @app.get("/api/v1/backups/chain", tags=["backups"])
    def chain_by_context(
        st: HubDep,
        user: User,
        vm_context_id: str = Query(min_length=1),
        disk_id: int | None = Query(default=None, ge=0),
        repository_id: str | None = None,
    ) -> dict[str, Any]:
        with st.db.session() as s:
            vm = VmStore(s).get(vm_context_id)
            if vm is None:
                raise NotFound(f"VM context {vm_context_id} not found")
            return _chain_view(s, vm, disk_id, repository_id)

    @app.get("/api/v1/backups/{vm_name}/chain", tags=["backups"])
    def chain(
        vm_name: str,
        st: HubDep,
        user: User,
        disk_id: int | None = Query(default=None, ge=0),
        repository_id: str | None = None,
    ) -> dict[str, Any]:
        with st.db.session() as s:
            vm = VmStore(s).by_name(vm_name)
            if vm is None:
                raise NotFound(f"VM {vm_name} not found")
            return _chain_view(s, vm, disk_id, repository_id)

    @app.get("/api/v1/backups/{backup_id}", tags=["backups"])
    def get_backup(backup_id: str, st: HubDep, user: User) -> dict[str, Any]:
        with st.db.session() as s:
            b = BackupStore(s).get(backup_id)
            if b is None:
                raise NotFound(f"backup {backup_id} not found")
            return backup_view(b)

    # --------------------------------------------------------------- jobs
    @app.get("/api/v1/jobs", tags=["jobs"])
    def list_jobs(
        st: HubDep,
        user: User,
        status: str | None = None,
        limit: int = Query(default=50, ge=1, le=1000),
        offset: int = Query(default=0, ge=0),
    ) -> dict[str, Any]:
        with st.db.session() as s:
            rows, total = JobStore(s).list(status=status, limit=limit, offset=offset)
            return {"jobs": [job_view(j) for j in rows], "total": total}

    @app.get("/api/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(
        job_id: str,
        st: HubDep,
        user: User,
        wait: float = Query(
            default=0,
            ge=0,
            le=60,
            description="Long-poll: answer as soon as the job ends, or after this many seconds.",
        ),
    ) -> dict[str, Any]:
        """A job: status, step, per-disk bytes done/total, percent, rate, ETA, error."""
        if wait > 0:
            st.engine.wait_ended(job_id, wait)
        with st.db.session() as s:
            job = JobStore(s).get(job_id)
            if job is None:
                raise NotFound(f"job {job_id} not found")
            return job_view(job)

    @app.post("/api/v1/jobs/{job_id}/cancel", status_code=202, tags=["jobs"])
    def cancel_job(job_id: str, st: HubDep, user: User) -> dict[str, Any]:
        st.engine.cancel(job_id)
        with st.db.session() as s:
            job = JobStore(s).get(job_id)
            assert job is not None
            return job_view(job)

    @app.get("/api/v1/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str, st: HubDep, user: User) -> StreamingResponse:
        """Server-sent events: one ``progress`` event per change, then ``end``."""

        def snapshot() -> dict[str, Any] | None:
            with st.db.session() as s:
                job = JobStore(s).get(job_id)
                return job_view(job) if job else None

        first = await asyncio.to_thread(snapshot)
        if first is None:
            raise NotFound(f"job {job_id} not found")

        async def stream() -> AsyncIterator[str]:
            last = None
            view: dict[str, Any] | None = first
            while view is not None:
                text = json.dumps(view)
                if text != last:
                    last = text
                    yield f"event: progress\ndata: {text}\n\n"
                if view["status"] in ("completed", "failed", "cancelled"):
                    yield f"event: end\ndata: {text}\n\n"
                    return
                # Wakes at once when the job ends, else every 0.25 s.
                await asyncio.to_thread(st.engine.wait_ended, job_id, 0.25)
                view = await asyncio.to_thread(snapshot)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/", include_in_schema=False)
    def root() -> JSONResponse:
        return JSONResponse({"name": "Sendense hub", "version": __version__, "docs": "/docs"})

    return app


def _chain_view(s: Any, vm: Any, disk_id: int | None, repository_id: str | None) -> dict[str, Any]:
    disks = [d for d in vm.disks if disk_id is None or d.disk_index == disk_id]
    if disk_id is not None and not disks:
        raise InvalidRequest(f"disk_id {disk_id} is out of range for VM {vm.name}")
    out = []
    for d in disks:
        backups = BackupStore(s).chain(vm.id, d.disk_index, repository_id)
        # The current chain: from the newest restore point back through parents.
        by_id = {b.id: b for b in backups}
        chain = []
        cur = backups[-1] if backups else None
        while cur is not None:
            chain.append(cur)
            cur = by_id.get(cur.parent_id) if cur.parent_id else None
        chain.reverse()
        out.append(
            {
                "disk_id": d.disk_index,
                "disk_key": d.disk_key,
                "chain": [
                    {
                        "backup_id": b.id,
                        "backup_type": b.backup_type,
                        "parent_backup_id": b.parent_id,
                        "file_path": b.file_path,
                        "size_on_disk": b.size_on_disk,
                        "bytes_transferred": b.bytes_transferred,
                        "change_id": b.change_id,
                        "created_at": b.created_at.isoformat(),
                    }
                    for b in chain
                ],
                "chain_length": len(chain),
                "total_size_bytes": sum(b.size_on_disk for b in chain),
                "restore_points": len(backups),
            }
        )
    return {"vm_name": vm.name, "vm_context_id": vm.id, "disks": out}


ERROR_BODY = {
    "type": "object",
    "required": ["error", "message", "details"],
    "properties": {
        "error": {"type": "string", "description": "machine-readable code"},
        "message": {"type": "string", "description": "for a person; names the field"},
        "details": {"type": "object"},
    },
}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """OpenAPI as the hub really answers: validation errors are 400 with the
    error body (never 422)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schema.setdefault("components", {}).setdefault("schemas", {})["ErrorBody"] = ERROR_BODY
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            responses = op.get("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = {
                    "description": "Invalid request",
                    "content": {"application/json": {"schema": ref}},
                }
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)
    app.openapi_schema = schema
    return schema
