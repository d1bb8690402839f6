"""Jobs: list, details, cancel, waiting for the end."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sendense.catalog.models import BackupJob
from sendense.catalog.stores import JobStore
from sendense.catalog.stores.jobs import JobFilter
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
    with st.db.read() as s:
        job, backups = JobStore(s).row_with_backups(job_id)
        if job is None or (
            who.scope is not None
            and not (
                (job.vm_id is None or who.can_see_vm(job.vm_name, job.vm_tags))
                and who.can_see_repository(job.repository_id)
            )
        ):
            raise NotFound(f"job {job_id} not found", job_id=job_id)
    return job_view(job, backups)


async def job_async(st: HubState, who: Principal, job_id: str) -> dict[str, Any]:
    return await asyncio.to_thread(get_job, st, who, job_id)


def _ended(st: HubState, job_id: str) -> bool:
    with st.db.read() as s:
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
    with st.db.read() as s:
        vm_ids = visible_vm_ids(s, who, st.cache)
        where = JobFilter(
            status=status,
            kind=kind,
            vm_ids=None if vm_ids is None else frozenset(vm_ids),
            repository_ids=None if who.scope is None else tuple(sorted(who.scope.repositories)),
        )
        store = JobStore(s)
        # One more than asked: whether this is the last page.
        rows, backup_rows = store.page(where, limit=limit + 1, offset=offset)
        more = len(rows) > limit
        rows = rows[:limit]
        if (rows and not more) or (not rows and offset == 0):
            total = offset + len(rows)  # the last page tells it (the running jobs...)
        else:
            # Read before the count (catalog/cache.py); each statement of
            # this session sees at least what it stands for.
            generation = st.db.generation(s)
            total = st.cache.get(("jobs.total", where), lambda: store.count(where), generation)
    backups: dict[str, list[Any]] = {}
    for b in backup_rows:
        backups.setdefault(b.job_id, []).append(b)
    return {"jobs": [job_view(j, backups.get(j.id, [])) for j in rows], "total": total}


def cancel(st: HubState, who: Principal, job_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        job = visible_job(s, who, job_id)
        kind = job.kind
    if kind == "backup":
        st.engine.cancel(job_id)
    else:
        st.lifecycle.request_cancel(job_id)
    return get_job(st, who, job_id)
