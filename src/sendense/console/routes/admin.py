"""Repositories, nodes and sources (health), tokens, audit log."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response

from sendense.console import queries
from sendense.console.page import Form, Signed, build
from sendense.console.render import quote
from sendense.hub.audit import service as audit
from sendense.hub.nodes import service as nodes
from sendense.hub.repositories import service as repositories
from sendense.hub.repositories.schemas import RescanCreate
from sendense.hub.sources import service as sources
from sendense.hub.tokens import service as tokens
from sendense.hub.tokens.schemas import TokenCreate

router = APIRouter()

PAGE = 100


@router.get("/repositories", response_class=HTMLResponse)
def repository_list(page: Signed) -> HTMLResponse:
    repos = queries.repository_details(page.st, page.who)
    return page.render(
        "repositories.html",
        repositories=repos,
        history={
            r["repository_id"]: queries.repository_history(page.st, r["repository_id"])
            for r in repos
        },
    )


@router.post("/repositories/{repository_id}/rescan")
def rescan(repository_id: str, page: Signed, form: Form) -> Response:
    page.require("admin")
    body = build(RescanCreate, dry_run=form.get("dry_run") == "on")
    started = repositories.start_rescan(page.st, page.who, repository_id, body)
    return page.done(f"/ui/jobs/{quote(started['job_id'])}", "Rescan started")


@router.get("/nodes", response_class=HTMLResponse)
def node_list(page: Signed) -> HTMLResponse:
    return page.render(
        "nodes.html",
        nodes=nodes.list_nodes(page.st, page.who),
        sources=sources.list_sources(page.st, page.who),
    )


@router.get("/tokens", response_class=HTMLResponse)
def token_list(page: Signed, include_revoked: bool = False) -> HTMLResponse:
    page.require("admin")
    return page.render(
        "tokens.html",
        tokens=tokens.list_tokens(page.st, include_revoked=include_revoked),
        include_revoked=include_revoked,
        created=None,
    )


@router.post("/tokens", response_class=HTMLResponse)
def create_token(page: Signed, form: Form) -> HTMLResponse:
    page.require("admin")
    scope = None
    vms = [v.strip() for v in form.get("scope_vms", "").split(",") if v.strip()]
    repos = [r.strip() for r in form.get("scope_repositories", "").split(",") if r.strip()]
    if vms or repos:
        scope = {"vms": vms, "repositories": repos}
    expires = form.get("expires_at", "").strip()
    body = build(
        TokenCreate,
        name=form.get("name", "").strip(),
        role=form.get("role", ""),
        expires_at=_expiry(expires) if expires else None,
        scope=scope,
    )
    created = tokens.create_token(page.st, page.who, body)
    # The secret is shown on this answer only (no redirect: it is not kept anywhere).
    return page.render(
        "tokens.html",
        status=201,
        tokens=tokens.list_tokens(page.st, include_revoked=False),
        include_revoked=False,
        created=created,
    )


def _expiry(text: str) -> str:
    """A date or ``datetime-local`` value from the form, read as UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return text  # the schema names the field
    return value.isoformat() if value.tzinfo else value.isoformat() + "+00:00"


@router.post("/tokens/{token_id}/revoke")
def revoke_token(token_id: str, page: Signed, form: Form) -> Response:
    page.require("admin")
    gone = tokens.revoke_token(page.st, token_id)
    return page.done("/ui/tokens", f"Token {gone['name']} revoked")


@router.get("/audit", response_class=HTMLResponse)
def audit_log(
    page: Signed,
    token: str = Query(default="", max_length=200),
    route: str = Query(default="", max_length=300),
    method: Literal["", "GET", "POST", "PUT", "PATCH", "DELETE"] = "",
    status: int | None = Query(default=None, ge=100, le=599),
    offset: int = Query(default=0, ge=0, le=10_000_000),
) -> HTMLResponse:
    page.require("admin")
    found = audit.list_entries(
        page.st,
        token=token or None,
        route=route or None,
        method=method or None,
        status=status,
        since=None,
        until=None,
        limit=PAGE,
        offset=offset,
    )
    return page.render(
        "audit.html",
        entries=found["entries"],
        total=found["total"],
        offset=offset,
        limit=PAGE,
        f={"token": token, "route": route, "method": method, "status": status or ""},
    )
