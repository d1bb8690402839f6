"""Jobs: the list with filters, a job's page (per-disk progress, rate, ETA,
step, log) refreshed while it runs, cancel."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response

from sendense.console.page import Form, Signed, done
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


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, page: Signed, form: Form) -> Response:
    page.require("operator")
    jobs.cancel(page.st, page.who, job_id)
    return done(f"/ui/jobs/{quote(job_id)}", "Cancel requested: the job stops and cleans up")
