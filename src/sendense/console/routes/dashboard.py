"""The dashboard: running jobs (live, by server-sent events), task summary,
repository usage, failed jobs, RPO misses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse

from sendense.console import queries
from sendense.console.page import Signed
from sendense.console.routes.jobs import RECHECK_SECONDS, RETRY_MS, STREAM_SECONDS, _event
from sendense.hub.jobs import service as jobs

router = APIRouter()

RUNNING_SHOWN = 20


def running(page: Signed) -> dict[str, Any]:
    active = jobs.list_jobs(
        page.st, page.who, status="running", kind=None, limit=RUNNING_SHOWN, offset=0
    )
    pending = jobs.list_jobs(
        page.st, page.who, status="pending", kind=None, limit=RUNNING_SHOWN, offset=0
    )
    return {
        "running": active["jobs"] + pending["jobs"],
        "running_total": active["total"] + pending["total"],
    }


@router.get("/", response_class=HTMLResponse)
def dashboard(page: Signed) -> HTMLResponse:
    failed = jobs.list_jobs(page.st, page.who, status="failed", kind=None, limit=10, offset=0)
    return page.render(
        "dashboard.html",
        summary=queries.task_summary(page.st, page.who),
        repositories=queries.repository_usage(page.st, page.who),
        failed=failed["jobs"],
        failed_total=failed["total"],
        rpo=queries.rpo_misses(page.st, page.who),
        **running(page),
    )


@router.get("/fragments/running", response_class=HTMLResponse)
def running_fragment(page: Signed) -> HTMLResponse:
    return page.render("_running.html", **running(page))


@router.get("/fragments/running/events")
async def running_events(page: Signed) -> StreamingResponse:
    """Server-sent events for the dashboard's running jobs: ``progress`` with
    the list (HTML) whenever it changes, looked at every `TICK_SECONDS`; the
    session is checked again every `RECHECK_SECONDS`, and the stream ends
    after `STREAM_SECONDS` (the browser reconnects)."""

    def body() -> str:
        return bytes(page.render("_running_body.html", **running(page)).body).decode()

    async def stream() -> AsyncIterator[str]:
        last = None
        started = checked = time.monotonic()
        yield f"retry: {RETRY_MS}\n\n"
        while True:
            html = await asyncio.to_thread(body)
            if html != last:
                last = html
                yield _event("progress", html)
            now = time.monotonic()
            if now - started > STREAM_SECONDS:
                return
            if now - checked > RECHECK_SECONDS:
                checked = now
                if not await asyncio.to_thread(page.still_valid):
                    yield _event("signed-out", "")
                    return
            await asyncio.sleep(TICK_SECONDS)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


TICK_SECONDS = 1.0


@router.get("/index.html", include_in_schema=False)
def index() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308)
