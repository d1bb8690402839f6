"""Jobs: list, details, cancel, waiting for the end."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sendense.catalog.models import BackupJob
from sendense.catalog.stores import JobStore
from sendense.core.access import Principal
from sendense.core.errors import NotFound
from sendense.hub.backups.service import visible_vm_ids
from sendense.hub.state import HubState
from sendense.hub.views import job_view

END = ("completed", "failed", "cancelled")


def visible_job(s: Session, who: Principal, job_id: str) -> BackupJob:
    job = JobStore(s).get(job_id)
    if job is None or (
        who.scope is not None
        and not (
            (job.vm is None or who.can_see_vm(job.vm.name, job.vm.tags))
            and who.can_see_repository(job.repository_id)
        )
    ):
        raise NotFound(f"job {job_id} not found", job_id=job_id)
    return job


def get_job(st: HubState, who: Principal, job_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        return job_view(visible_job(s, who, job_id))


async def job_async(st: HubState, who: Principal, job_id: str) -> dict[str, Any]:
    return await asyncio.to_thread(get_job, st, who, job_id)


def _ended(st: HubState, job_id: str) -> bool:
    with st.db.session() as s:
        return s.scalar(select(BackupJob.status).where(BackupJob.id == job_id)) in END


async def wait_ended(st: HubState, who: Principal, job_id: str, timeout: float) -> None:
    async def is_ended() -> bool:
        return await asyncio.to_thread(_ended, st, job_id)

    await st.lifecycle.wait_ended_async(job_id, timeout, is_ended)


def list_jobs(
    st: HubState,
    who: Principal,
    *,
    status: str | None,
    kind: str | None,
    limit: int,
    offset: int,
) -> dict[str, Any]:
    with st.db.session() as s:
        vm_ids = visible_vm_ids(s, who)
        rows, total = JobStore(s).list(
            status=status,
            kind=kind,
            vm_ids=vm_ids,
            repository_ids=None if who.scope is None else sorted(who.scope.repositories),
            limit=limit,
            offset=offset,
        )
        return {"jobs": [job_view(j) for j in rows], "total": total}


def cancel(st: HubState, who: Principal, job_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        job = visible_job(s, who, job_id)
        kind = job.kind
    if kind == "backup":
        st.engine.cancel(job_id)
    else:
        st.lifecycle.request_cancel(job_id)
    return get_job(st, who, job_id)
