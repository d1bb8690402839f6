"""Jobs: the list with filters, a job's page (per-disk progress, rate, ETA,
step, log) refreshed while it runs, cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from sendense.console.page import Form, Signed
from sendense.console.render import quote
from sendense.hub.jobs import service as jobs

router = APIRouter()

PAGE = 50
Status = Literal["", "pending", "running", "completed", "failed", "cancelled"]
Kind = Literal[
    "", "backup", "consolidate", "verify", "rescan", "restore", "export", "retention", "mount"
]
KINDS = [k for k in Kind.__args__ if k]  # type: ignore[attr-defined]
STATUSES = [s for s in Status.__args__ if s]  # type: ignore[attr-defined]


@router.get("/jobs", response_class=HTMLResponse)
def job_list(
    page: Signed,
    status: Status = "",
    kind: Kind = "",
    offset: int = Query(default=0, ge=0, le=10_000_000),
) -> HTMLResponse:
    found = jobs.list_jobs(
        page.st, page.who, status=status or None, kind=kind or None, limit=PAGE, offset=offset
    )
    return page.render(
        "jobs.html",
        jobs=found["jobs"],
        total=found["total"],
        offset=offset,
        limit=PAGE,
        status_filter=status,
        kind=kind,
        kinds=KINDS,
        statuses=STATUSES,
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, page: Signed) -> HTMLResponse:
    return page.render("job.html", job=jobs.get_job(page.st, page.who, job_id))


@router.get("/jobs/{job_id}/progress", response_class=HTMLResponse)
def job_progress(job_id: str, page: Signed) -> HTMLResponse:
    return page.render("_job_progress.html", job=jobs.get_job(page.st, page.who, job_id))


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, page: Signed) -> StreamingResponse:
    """Server-sent events for a job's page: ``progress`` with the page's live
    part (HTML) whenever it changes, then ``end``. The job's wake-ups drive
    it (no thread waits); the session is checked again every
    `RECHECK_SECONDS`, and the stream ends after `STREAM_SECONDS` (the
    browser reconnects, signing in again if the session has ended)."""
    first = await jobs.job_async(page.st, page.who, job_id)

    def fragment(view: dict[str, Any]) -> str:
        return bytes(page.render("_job_progress.html", job=view).body).decode()

    async def stream() -> AsyncIterator[str]:
        view, last = first, None
        started = checked = time.monotonic()
        yield f"retry: {RETRY_MS}\n\n"
        while True:
            html = await asyncio.to_thread(fragment, view)
            ended = view["status"] in END
            if html != last:
                last = html
                yield _event("end" if ended else "progress", html)
            elif ended:
                yield _event("end", html)
            if ended:
                return
            now = time.monotonic()
            if now - started > STREAM_SECONDS:
                return
            if now - checked > RECHECK_SECONDS:
                checked = now
                if not await asyncio.to_thread(page.still_valid):
                    yield _event("signed-out", "")
                    return
            await jobs.wait_ended(page.st, page.who, job_id, 0.5)
            view = await jobs.job_async(page.st, page.who, job_id)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


END = ("completed", "failed", "cancelled")
RECHECK_SECONDS = 5.0
# Short streams: a hub shutting down waits for open answers; the browser
# reconnects after `RETRY_MS` and gets the current state at once.
STREAM_SECONDS = 30.0
RETRY_MS = 1000


def _event(name: str, data: str) -> str:
    lines = data.splitlines() or [""]
    return f"event: {name}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, page: Signed, form: Form) -> Response:
    page.require("operator")
    jobs.cancel(page.st, page.who, job_id)
    return page.done(f"/ui/jobs/{quote(job_id)}", "Cancel requested: the job stops and cleans up")
