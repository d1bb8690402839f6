"""/api/v1/jobs: HTTP only; rules in service.py.

Waiting (long-poll ``?wait=`` and server-sent events) holds no thread: the
handlers are coroutines that sleep on the job lifecycle's wake-ups, and only
the short catalog reads run in worker threads.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from sendense.hub.backups.schemas import MAX_INT
from sendense.hub.deps import HubDep, Operator, Viewer
from sendense.hub.jobs import service
from sendense.hub.jobs.schemas import JobList, JobRead
from sendense.hub.openapi import errors
from sendense.web.responses import FastJSON

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

END = ("completed", "failed", "cancelled")


@router.get("", response_model=JobList, responses=errors())
def list_jobs(
    st: HubDep,
    who: Viewer,
    status: Literal["pending", "running", "completed", "failed", "cancelled"] | None = None,
    kind: Literal[
        "backup", "consolidate", "verify", "rescan", "restore", "export", "retention", "mount"
    ]
    | None = None,
    limit: int = Query(default=50, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=MAX_INT),
) -> Any:
    """Jobs, newest first."""
    return FastJSON(
        service.list_jobs(st, who, status=status, kind=kind, limit=limit, offset=offset)
    )


@router.get("/{job_id}", response_model=JobRead, responses=errors(404))
async def get_job(
    job_id: str,
    st: HubDep,
    who: Viewer,
    wait: float = Query(
        default=0,
        ge=0,
        le=60,
        description="Long-poll: answer as soon as the job ends, or after this many seconds.",
    ),
) -> Any:
    """A job: status, step, per-disk bytes done/total, percent, rate, ETA, error."""
    view = await service.job_async(st, who, job_id)
    if wait > 0 and view["status"] not in END:
        await service.wait_ended(st, who, job_id, wait)
        view = await service.job_async(st, who, job_id)
    return FastJSON(view)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobRead, responses=errors(404))
def cancel_job(job_id: str, st: HubDep, who: Operator) -> dict:
    """Stop the job; it cleans up and ends as ``cancelled``."""
    return service.cancel(st, who, job_id)


@router.get(
    "/{job_id}/events",
    responses={
        **errors(404),
        200: {"content": {"text/event-stream": {}}, "description": "progress, then end"},
    },
    response_class=StreamingResponse,
)
async def job_events(job_id: str, st: HubDep, who: Viewer) -> StreamingResponse:
    """Server-sent events: one ``progress`` event per change, then ``end``."""
    first = await service.job_async(st, who, job_id)

    async def stream() -> AsyncIterator[str]:
        last = None
        view = first
        while True:
            text = json.dumps(view, default=str)
            if text != last:
                last = text
                yield f"event: progress\ndata: {text}\n\n"
            if view["status"] in END:
                yield f"event: end\ndata: {text}\n\n"
                return
            # Wakes at once when the job ends here, else every 0.25 s.
            await service.wait_ended(st, who, job_id, 0.25)
            view = await service.job_async(st, who, job_id)

    return StreamingResponse(stream(), media_type="text/event-stream")
