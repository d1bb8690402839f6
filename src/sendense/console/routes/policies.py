"""Policies: list, a policy's page (next runs, matched VMs, last run per VM),
the editor (next run times shown as the cron expression is typed), run now,
the retention plan (dry run) and applying it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response

from sendense.console import queries
from sendense.console.page import Form, Signed, build, field_int
from sendense.console.render import quote
from sendense.core.errors import InvalidRequest
from sendense.hub.policies import service as policies
from sendense.hub.policies.schemas import PolicyCreate, PolicyUpdate
from sendense.policy.schedule import Schedule, Window

router = APIRouter()

PAGE = 50
RULES = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
PREVIEW_RUNS = 5


@router.get("/policies", response_class=HTMLResponse)
def policy_list(
    page: Signed,
    offset: int = Query(default=0, ge=0, le=10_000_000),
) -> HTMLResponse:
    found = policies.list_policies(page.st, page.who, name=None, limit=PAGE, offset=offset)
    return page.render(
        "policies.html",
        policies=found["policies"],
        total=found["total"],
        offset=offset,
        limit=PAGE,
        repositories={
            r["repository_id"]: r["name"] for r in queries.repository_choices(page.st, page.who)
        },
    )


def _editor(
    page: Signed, policy: dict[str, Any] | None, status: int = 200, **extra: Any
) -> HTMLResponse:
    form = extra.pop("form", None) or _form_of(policy)
    extra.setdefault("error", None)
    return page.render(
        "policy_edit.html",
        status=status,
        policy=policy,
        form=form,
        rules=RULES,
        repositories=queries.repository_choices(page.st, page.who),
        preview=_preview(
            form["schedule"], form["timezone"], form["window_start"], form["window_end"]
        ),
        **extra,
    )


def _form_of(policy: dict[str, Any] | None) -> dict[str, Any]:
    if policy is None:
        return {
            "name": "",
            "enabled": True,
            "vms": "",
            "tags": "",
            "repository_id": "default",
            "schedule": "0 2 * * *",
            "timezone": "UTC",
            "full_every": "",
            "verify_after": False,
            "window_start": "",
            "window_end": "",
            **{k: 7 if k == "keep_daily" else "" for k in RULES},
        }
    window = policy.get("window") or {}
    return {
        "name": policy["name"],
        "enabled": policy["enabled"],
        "vms": ", ".join(policy["selector"]["vms"]),
        "tags": ", ".join(f"{k}={v}" for k, v in policy["selector"]["tags"].items()),
        "repository_id": policy["repository_id"],
        "schedule": policy["schedule"],
        "timezone": policy["timezone"],
        "full_every": policy["full_every"] or "",
        "verify_after": policy["verify_after"],
        "window_start": window.get("start", ""),
        "window_end": window.get("end", ""),
        **{k: policy["retention"].get(k) or "" for k in RULES},
    }


def _preview(schedule: str, timezone: str, start: str = "", end: str = "") -> dict[str, Any]:
    """The next runs of a cron expression in a time zone, or what is wrong with it."""
    try:
        parsed = Schedule.parse(schedule, timezone or "UTC")
    except InvalidRequest as e:
        return {"error": e.message, "runs": [], "description": ""}
    runs = parsed.next_runs(datetime.now(UTC), PREVIEW_RUNS)
    window = None
    if start and end:
        try:
            window = Window.parse({"start": start, "end": end})
        except InvalidRequest as e:
            return {"error": e.message, "runs": [], "description": ""}
    return {
        "error": None,
        "description": parsed.describe(),
        "runs": [
            {
                "utc": t,
                "local": t.astimezone(parsed.tz).strftime("%a %Y-%m-%d %H:%M %Z"),
                "in_window": window is None or window.contains(t, parsed.tz),
            }
            for t in runs
        ],
    }


@router.get("/policies/preview", response_class=HTMLResponse)
def preview(
    page: Signed,
    schedule: str = Query(default="", max_length=200),
    timezone: str = Query(default="UTC", max_length=100),
    window_start: str = Query(default="", max_length=5),
    window_end: str = Query(default="", max_length=5),
) -> HTMLResponse:
    return page.render(
        "_schedule_preview.html", preview=_preview(schedule, timezone, window_start, window_end)
    )


@router.get("/policies/new", response_class=HTMLResponse)
def new_policy(page: Signed) -> HTMLResponse:
    page.require("admin")
    return _editor(page, None)


def _body(form: dict[str, str]) -> dict[str, Any]:
    """A policy's fields from the editor's form, as the API takes them."""
    tags: dict[str, str] = {}
    for item in form.get("tags", "").split(","):
        if item.strip():
            key, sep, value = item.strip().partition("=")
            if not sep:
                raise InvalidRequest(f"tag {item.strip()!r} is not key=value", field="tags")
            tags[key.strip()] = value.strip()
    start, end = form.get("window_start", "").strip(), form.get("window_end", "").strip()
    return {
        "name": form.get("name", "").strip(),
        "enabled": form.get("enabled") == "on",
        "selector": {
            "vms": [v.strip() for v in form.get("vms", "").split(",") if v.strip()],
            "tags": tags,
        },
        "repository_id": form.get("repository_id", ""),
        "schedule": form.get("schedule", "").strip(),
        "timezone": form.get("timezone", "").strip() or "UTC",
        "full_every": field_int(form, "full_every"),
        "retention": {k: field_int(form, k, 0) for k in RULES},
        "verify_after": form.get("verify_after") == "on",
        "window": {"start": start, "end": end} if start or end else None,
    }


def _form_back(form: dict[str, str]) -> dict[str, Any]:
    """The editor's fields as sent (shown again with the error)."""
    out: dict[str, Any] = dict(form)
    out["enabled"] = form.get("enabled") == "on"
    out["verify_after"] = form.get("verify_after") == "on"
    for k in (*RULES, "full_every", "window_start", "window_end", "vms", "tags", "name"):
        out.setdefault(k, "")
    out.setdefault("schedule", "")
    out.setdefault("timezone", "UTC")
    out.setdefault("repository_id", "")
    return out


@router.post("/policies", response_model=None)
def create_policy(page: Signed, form: Form) -> Response:
    page.require("admin")
    try:
        body = build(PolicyCreate, **_body(form))
        created = policies.create_policy(page.st, page.who, body)
    except InvalidRequest as e:
        return _editor(page, None, status=400, form=_form_back(form), error=e.message)
    return page.done(
        f"/ui/policies/{quote(created['policy_id'])}", f"Policy {created['name']} created"
    )


@router.get("/policies/{policy_id}", response_class=HTMLResponse)
def policy_page(policy_id: str, page: Signed) -> HTMLResponse:
    policy = policies.get_policy(page.st, page.who, policy_id)
    repos = {r["repository_id"]: r["name"] for r in queries.repository_choices(page.st, page.who)}
    return page.render("policy.html", policy=policy, repositories=repos, plan=None)


@router.get("/policies/{policy_id}/edit", response_class=HTMLResponse)
def edit_policy(policy_id: str, page: Signed) -> HTMLResponse:
    page.require("admin")
    return _editor(page, policies.get_policy(page.st, page.who, policy_id))


@router.post("/policies/{policy_id}", response_model=None)
def update_policy(policy_id: str, page: Signed, form: Form) -> Response:
    page.require("admin")
    policy = policies.get_policy(page.st, page.who, policy_id)
    try:
        body = build(PolicyUpdate, **_body(form))
        updated = policies.update_policy(page.st, page.who, policy_id, body)
    except InvalidRequest as e:
        return _editor(page, policy, status=400, form=_form_back(form), error=e.message)
    return page.done(f"/ui/policies/{quote(policy_id)}", f"Policy {updated['name']} saved")


@router.post("/policies/{policy_id}/delete")
def delete_policy(policy_id: str, page: Signed, form: Form) -> Response:
    page.require("admin")
    policies.delete_policy(page.st, page.who, policy_id)
    return page.done("/ui/policies", "Policy deleted (jobs it started run on)")


@router.post("/policies/{policy_id}/run")
def run_policy(policy_id: str, page: Signed, form: Form) -> Response:
    page.require("operator")
    result = policies.run_policy(page.st, page.who, policy_id)
    n = len(result.get("job_ids") or [])
    return page.done(f"/ui/policies/{quote(policy_id)}", f"Policy run started: {n} job(s)")


@router.get("/policies/{policy_id}/retention", response_class=HTMLResponse)
def retention_plan(policy_id: str, page: Signed) -> HTMLResponse:
    """The dry run (the API's POST .../retention/plan changes nothing either)."""
    policy = policies.get_policy(page.st, page.who, policy_id)
    plan = policies.plan_retention(page.st, page.who, policy_id)
    repos = {r["repository_id"]: r["name"] for r in queries.repository_choices(page.st, page.who)}
    return page.render("policy.html", policy=policy, repositories=repos, plan=plan)


@router.post("/policies/{policy_id}/retention/apply")
def apply_retention(policy_id: str, page: Signed, form: Form) -> Response:
    page.require("admin")
    result = policies.apply_retention(page.st, page.who, policy_id)
    n = len(result.get("job_ids") or [])
    return page.done(f"/ui/policies/{quote(policy_id)}", f"Retention started: {n} job(s)")
