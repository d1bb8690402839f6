"""The dashboard: running jobs (refreshed), task summary, repository usage,
failed jobs, RPO misses."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

from sendense.console import queries
from sendense.console.page import Signed
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


@router.get("/index.html", include_in_schema=False)
def index() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308)
