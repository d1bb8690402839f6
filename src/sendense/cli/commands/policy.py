"""``sendense policy create | ls | show | edit | rm | run | plan | apply`` and ``sendense vm tag``.

A policy is named by its name or its id everywhere. ``plan`` prints the
retention dry run as a table (what would be kept, removed and why); ``apply``
starts it. ``vm tag NAME key=value ... --remove key`` changes a VM's tags
(the others stay). Shares the global options (``--json``, URL, token) and
output helpers of ``cli/main.py``, which hands itself over with `bind`.

Exit status: 0 when done; 1 on an API error (the hub's message is printed).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from sendense.cli.client import ApiError

if TYPE_CHECKING:
    from types import ModuleType

policy_app = typer.Typer(
    help="Policies: what to protect, when, where, what to keep.", no_args_is_help=True
)

_main: ModuleType | None = None

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def bind(main: ModuleType) -> None:
    global _main
    _main = main
    main.vm_app.command("tag")(vm_tag)


def _m() -> ModuleType:
    if _main is None:
        from sendense.cli import main

        return main
    return _main


def _policy_id(c: Any, ref: str) -> str:
    """The id of the policy named ``ref`` (``ref`` itself if none: an id, or a 404)."""
    m = _m()
    found = m.call(c.get, "/api/v1/policies", name=ref)["policies"]
    return str(found[0]["policy_id"]) if found else ref


def _delete(c: Any, path: str) -> None:
    r = c.http.request("DELETE", path)
    if r.status_code >= 400:
        try:
            body = r.json()
        except ValueError:
            body = {"error": "http_error", "message": r.text}
        raise ApiError(r.status_code, body)


def _tags(items: list[str], what: str = "--tag") -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _m().err.print(f"[red]{what} {item!r}: expected key=value")
            raise typer.Exit(2)
        out[key] = value
    return out


def _window(text: str) -> dict[str, str] | None:
    if text.lower() == "none":
        return None
    start, sep, end = text.partition("-")
    if not sep:
        _m().err.print(f"[red]--window {text!r}: expected HH:MM-HH:MM (or none)")
        raise typer.Exit(2)
    return {"start": start, "end": end}


def _full_every(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        _m().err.print(f"[red]--full-every {text!r}: expected a number (or none)")
        raise typer.Exit(2) from None


VmOpt = Annotated[list[str] | None, typer.Option("--vm", help="A VM name (repeat).")]
TagOpt = Annotated[
    list[str] | None, typer.Option("--tag", help="key=value: VMs with this tag (repeat).")
]
RepoOpt = Annotated[str | None, typer.Option("--repo", help="repository_id")]
ScheduleOpt = Annotated[
    str | None, typer.Option(help="cron, 5 fields: minute hour day month weekday ('0 2 * * *')")
]
TzOpt = Annotated[str | None, typer.Option("--timezone", help="IANA zone, e.g. Europe/Berlin")]
FullOpt = Annotated[
    str | None, typer.Option("--full-every", help="Every nth run is a full (none: only the first)")
]
WindowOpt = Annotated[
    str | None, typer.Option(help="Start jobs only between HH:MM-HH:MM (none: any time)")
]
VerifyOpt = Annotated[
    bool | None, typer.Option("--verify-after/--no-verify-after", help="Verify each new point")
]
Keep = Annotated[int | None, typer.Option(help="Restore points to keep (-1: all).")]


def _retention(**keep: int | None) -> dict[str, int]:
    return {f"keep_{k}": v for k, v in keep.items() if v is not None}


@policy_app.command("create")
def policy_create(
    name: str,
    schedule: ScheduleOpt = None,
    vm: VmOpt = None,
    tag: TagOpt = None,
    repo: RepoOpt = "default",
    timezone: TzOpt = "UTC",
    full_every: FullOpt = None,
    window: WindowOpt = None,
    verify_after: VerifyOpt = False,
    disabled: Annotated[bool, typer.Option("--disabled", help="Create it switched off.")] = False,
    keep_last: Keep = None,
    keep_hourly: Keep = None,
    keep_daily: Keep = None,
    keep_weekly: Keep = None,
    keep_monthly: Keep = None,
    keep_yearly: Keep = None,
) -> None:
    """Create a policy: --vm and/or --tag select VMs, --schedule says when,
    --keep-* what to keep."""
    m = _m()
    body: dict[str, Any] = {
        "name": name,
        "enabled": not disabled,
        "selector": {"vms": vm or [], "tags": _tags(tag or [])},
        "repository_id": repo,
        "schedule": schedule or "",
        "timezone": timezone,
        "retention": _retention(
            last=keep_last,
            hourly=keep_hourly,
            daily=keep_daily,
            weekly=keep_weekly,
            monthly=keep_monthly,
            yearly=keep_yearly,
        ),
        "verify_after": bool(verify_after),
    }
    if full_every is not None:
        body["full_every"] = _full_every(full_every)
    if window is not None:
        body["window"] = _window(window)
    data = m.call(m.client().post, "/api/v1/policies", body)
    if m.ctx.json:
        m.out(data)
        return
    m.console.print(f"policy {data['name']} created: {data['policy_id']}", markup=False)
    _print_policy(data)


def _selector_text(sel: dict[str, Any]) -> str:
    parts = [*sel.get("vms", []), *(f"{k}={v}" for k, v in (sel.get("tags") or {}).items())]
    return ", ".join(parts) or "-"


def _retention_text(rules: dict[str, int]) -> str:
    return ", ".join(f"{k.removeprefix('keep_')}={v}" for k, v in rules.items() if v) or "-"


@policy_app.command("ls")
def policy_ls() -> None:
    m = _m()
    c = m.client()
    data = m.call(c.get, "/api/v1/policies", limit=1000)
    table = Table("name", "enabled", "schedule", "next run (UTC)", "selector", "vms", "keep")
    for p in data["policies"]:
        table.add_row(
            p["name"],
            "yes" if p["enabled"] else "no",
            f"{p['schedule']} {p['timezone']}",
            (p["next_runs"][0][:16].replace("T", " ") if p["next_runs"] else "-"),
            _selector_text(p["selector"]),
            str(len(p["matched_vms"])),
            _retention_text(p["retention"]),
        )
    m.out(data, table)


def _print_policy(p: dict[str, Any]) -> None:
    m = _m()
    window = p.get("window")
    m.print_details(
        [
            ("policy", p["name"]),
            ("policy_id", p["policy_id"]),
            ("enabled", "yes" if p["enabled"] else "no"),
            ("schedule", f"{p['schedule']} ({p['schedule_description']}) in {p['timezone']}"),
            ("next runs", ", ".join(p["next_runs"]) or "- (disabled)"),
            ("window", window and f"{window['start']}-{window['end']}"),
            ("selector", _selector_text(p["selector"])),
            ("matched VMs", ", ".join(p["matched_vms"]) or "none"),
            ("repository", p["repository_id"]),
            ("full every", p["full_every"] or "first run only"),
            ("keep", _retention_text(p["retention"])),
            ("verify after", "yes" if p["verify_after"] else "no"),
        ]
    )


@policy_app.command("show")
def policy_show(policy: Annotated[str, typer.Argument(help="name or policy_id")]) -> None:
    m = _m()
    c = m.client()
    data = m.call(c.get, f"/api/v1/policies/{_policy_id(c, policy)}")
    if m.ctx.json:
        m.out(data)
        return
    _print_policy(data)
    table = Table("vm", "run", "scheduled (UTC)", "status", "job", "job status", "error")
    for r in data["last_runs"]:
        err = r["error"]
        table.add_row(
            r["vm_name"],
            r["trigger"],
            (r["scheduled_at"] or "-")[:19].replace("T", " "),
            r["status"] + (f" ({r['reason']})" if r["reason"] else ""),
            r["job_id"] or "-",
            r["job_status"] or "-",
            (err and f"{err['code']}: {err['message']}") or "-",
        )
    if data["last_runs"]:
        m.console.print(table)


@policy_app.command("edit")
def policy_edit(
    policy: Annotated[str, typer.Argument(help="name or policy_id")],
    name: Annotated[str | None, typer.Option("--name", help="A new name.")] = None,
    schedule: ScheduleOpt = None,
    vm: VmOpt = None,
    tag: TagOpt = None,
    repo: RepoOpt = None,
    timezone: TzOpt = None,
    full_every: FullOpt = None,
    window: WindowOpt = None,
    verify_after: VerifyOpt = None,
    enabled: Annotated[
        bool | None, typer.Option("--enable/--disable", help="Switch the policy on or off.")
    ] = None,
    keep_last: Keep = None,
    keep_hourly: Keep = None,
    keep_daily: Keep = None,
    keep_weekly: Keep = None,
    keep_monthly: Keep = None,
    keep_yearly: Keep = None,
) -> None:
    """Change some fields. --vm replaces the named VMs, --tag the tags, and
    --keep-* change only the rules given (the others stay)."""
    m = _m()
    c = m.client()
    pid = _policy_id(c, policy)
    current = m.call(c.get, f"/api/v1/policies/{pid}")
    body: dict[str, Any] = {}
    for key, value in (
        ("name", name),
        ("schedule", schedule),
        ("repository_id", repo),
        ("timezone", timezone),
        ("verify_after", verify_after),
        ("enabled", enabled),
    ):
        if value is not None:
            body[key] = value
    if vm is not None or tag is not None:
        sel = current["selector"]
        body["selector"] = {
            "vms": vm if vm is not None else sel["vms"],
            "tags": _tags(tag) if tag is not None else sel["tags"],
        }
    rules = _retention(
        last=keep_last,
        hourly=keep_hourly,
        daily=keep_daily,
        weekly=keep_weekly,
        monthly=keep_monthly,
        yearly=keep_yearly,
    )
    if rules:
        body["retention"] = {**current["retention"], **rules}
    if full_every is not None:
        body["full_every"] = _full_every(full_every)
    if window is not None:
        body["window"] = _window(window)
    data = m.call(c.request, "PATCH", f"/api/v1/policies/{pid}", json=body)
    if m.ctx.json:
        m.out(data)
        return
    m.console.print(f"policy {data['name']} changed", markup=False)
    _print_policy(data)


@policy_app.command("rm")
def policy_rm(policy: Annotated[str, typer.Argument(help="name or policy_id")]) -> None:
    """Delete a policy with its run history; queued backups never start,
    running ones finish."""
    m = _m()
    c = m.client()
    pid = _policy_id(c, policy)
    m.call(_delete, c, f"/api/v1/policies/{pid}")
    if m.ctx.json:
        m.out({"policy_id": pid, "deleted": True})
        return
    m.console.print(f"policy {policy} deleted", markup=False)


def _wait_jobs(c: Any, job_ids: list[str]) -> list[dict[str, Any]]:
    m = _m()
    ended = []
    for job_id in job_ids:
        while True:
            job = m.call(c.get, f"/api/v1/jobs/{job_id}", wait=30)
            if job["status"] in ("completed", "failed", "cancelled"):
                ended.append(job)
                break
            time.sleep(0.1)
    return ended


def _started_later(c: Any, pid: str, run: dict[str, Any]) -> list[str]:
    """The jobs the scheduler starts for the VMs the run left queued (busy, or
    the node at its limit), as they start; a VM whose entry ends without a job
    (failed, skipped) is given up on."""
    m = _m()
    waiting = set(run.get("queued") or [])
    found: list[str] = []
    while waiting:
        shown = m.call(c.get, f"/api/v1/policies/{pid}")
        waiting &= {r["vm_name"] for r in shown["last_runs"]}  # a VM gone meanwhile
        for r in shown["last_runs"]:
            if r["vm_name"] not in waiting:
                continue
            if r["run_id"] != run["run_id"] or r["job_id"]:
                waiting.discard(r["vm_name"])
                if r["run_id"] == run["run_id"] and r["job_id"]:
                    found.append(r["job_id"])
            elif r["status"] not in ("queued", "starting"):
                waiting.discard(r["vm_name"])
        if waiting:
            time.sleep(1)
    return found


@policy_app.command("run")
def policy_run(
    policy: Annotated[str, typer.Argument(help="name or policy_id")],
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until the jobs end (queued VMs' too).")
    ] = False,
) -> None:
    """Run the policy now: a backup job per matched VM (busy VMs are queued)."""
    m = _m()
    c = m.client()
    pid = _policy_id(c, policy)
    data = m.call(c.post, f"/api/v1/policies/{pid}/run")
    jobs = []
    if wait:
        job_ids = list(data["job_ids"]) + _started_later(c, pid, data)
        jobs = _wait_jobs(c, job_ids)
    if m.ctx.json:
        m.out({**data, "jobs": jobs} if wait else data)
    else:
        for job_id in data["job_ids"]:
            m.console.print(f"job {job_id} started", markup=False)
        for name in data.get("queued") or []:
            m.console.print(f"{name}: queued (busy or at the node's limit)", markup=False)
        for s in data.get("skipped") or []:
            m.console.print(f"{s['vm_name']}: not started: {s['reason']}", markup=False)
        for job in jobs:
            m.console.print(
                f"job {job['job_id']} {job['vm_name']}: {job['status']}"
                + (f" ({job['error']['message']})" if job.get("error") else ""),
                markup=False,
            )
    if any(j["status"] != "completed" for j in jobs):
        raise typer.Exit(1)


@policy_app.command("plan")
def policy_plan(policy: Annotated[str, typer.Argument(help="name or policy_id")]) -> None:
    """What retention would keep and remove now, and why (changes nothing)."""
    m = _m()
    c = m.client()
    data = m.call(c.post, f"/api/v1/policies/{_policy_id(c, policy)}/retention/plan")
    table = Table("vm", "disk", "backup_id", "decision", "why")
    for v in data["vms"]:
        for d in v["disks"]:
            for k in d["keep"]:
                table.add_row(v["vm_name"], str(d["disk_id"]), k["backup_id"], "keep",
                              ", ".join(k["reasons"]))  # fmt: skip
            for r in d["remove"]:
                action = r["action"] + (f" into {r['into']}" if r.get("into") else "")
                table.add_row(v["vm_name"], str(d["disk_id"]), r["backup_id"], action, r["reason"])
            for x in d["locked"]:
                table.add_row(v["vm_name"], str(d["disk_id"]), x["backup_id"], "locked",
                              x["reason"])  # fmt: skip
    m.out(data, table)
    if not m.ctx.json:
        removes = sum(len(d["remove"]) for v in data["vms"] for d in v["disks"])
        m.console.print(f"{removes} restore point(s) would be removed", markup=False)


@policy_app.command("apply")
def policy_apply(
    policy: Annotated[str, typer.Argument(help="name or policy_id")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the jobs end.")] = False,
) -> None:
    """Apply retention now: a retention job per VM with something to remove."""
    m = _m()
    c = m.client()
    data = m.call(c.post, f"/api/v1/policies/{_policy_id(c, policy)}/retention/apply")
    jobs = _wait_jobs(c, data["job_ids"]) if wait else []
    if m.ctx.json:
        m.out({**data, "jobs": jobs} if wait else data)
    else:
        for v in data["vms"]:
            what = (
                f"job {v['job_id']}, {v['removes']} to remove" if v["job_id"] else "nothing to do"
            )
            m.console.print(f"{v['vm_name']}: {what}", markup=False)
        for job in jobs:
            m.console.print(f"job {job['job_id']}: {job['status']}", markup=False)
    if any(j["status"] != "completed" for j in jobs):
        raise typer.Exit(1)


def vm_tag(
    name: Annotated[str, typer.Argument(help="VM name")],
    tags: Annotated[list[str] | None, typer.Argument(help="key=value to set (repeat)")] = None,
    remove: Annotated[
        list[str] | None, typer.Option("--remove", help="A tag key to remove (repeat).")
    ] = None,
) -> None:
    """Set or remove a VM's tags (the others stay); without any, print them."""
    m = _m()
    c = m.client()
    current = m.call(c.get, f"/api/v1/vms/{name}")
    new = {**current["tags"], **_tags(tags or [], "tag")}
    for key in remove or []:
        new.pop(key, None)
    data = current
    if tags or remove:
        data = m.call(c.request, "PATCH", f"/api/v1/vms/{name}", json={"tags": new})
    if m.ctx.json:
        m.out({"name": data["name"], "tags": data["tags"]})
        return
    text = " ".join(f"{k}={v}" for k, v in sorted(data["tags"].items())) or "(no tags)"
    m.console.print(f"{data['name']}: {text}", markup=False)
