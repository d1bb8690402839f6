"""Policies through the API and the CLI, end to end (real hub and node, qsd VMs).

CRUD with every refusal and its error body; VM tags and selectors that
follow them; next runs in the policy's time zone; run now, then the last run
per VM; the retention dry run and its application (what goes is gone, what
stays reads as it did at backup time); what a scoped token sees.

Schedules here never fire during a test (``0 3 1 1 *``: 1 January, 03:00),
so the in-hub scheduler leaves these policies alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from fixtures.cluster import Cluster, cli
from fixtures.lifecycle import (
    MiB,
    by_disk,
    cluster_env,
    error_body,
    lifecycle_cluster,
    raw_copy,
    reference_digest,
    wait_for,
    write_random,
)
from sendense.qemu import img

NEVER = "0 3 1 1 *"


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """The conftest's hub and node (SQLite, or indirect ``"postgresql"``),
    with the environment a test sets with `cluster_env`."""
    yield from lifecycle_cluster(request, tmp_path)


def policy_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "gold",
        "enabled": True,
        "selector": {"vms": ["web1"], "tags": {}},
        "repository_id": "default",
        "schedule": NEVER,
        "timezone": "UTC",
        "retention": {"keep_last": 2},
        "verify_after": False,
    }
    body.update(over)
    return body


def create(c: Cluster, **over: Any) -> dict[str, Any]:
    r = c.http("POST", "/api/v1/policies", json=policy_body(**over))
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def make_token(c: Cluster, name: str, role: str, scope: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"name": name, "role": role}
    if scope is not None:
        body["scope"] = scope
    return str(c.client.post("/api/v1/tokens", body)["token"])


def refused(r: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    body = error_body(r, status, code)
    if field is not None:
        assert field in body["details"].get("fields", []), body
        assert field in body["message"], body
    return body


def iso(t: str) -> datetime:
    return datetime.fromisoformat(t.replace("Z", "+00:00"))


# ------------------------------------------------------------------- CRUD


@pytest.mark.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)
def test_policy_crud_and_every_refusal(cluster: Cluster, make_vm) -> None:
    c = cluster
    c.register(make_vm("web1", [8 * MiB]), make_vm("db1", [8 * MiB]))

    made = create(
        c,
        selector={"vms": ["web1", "not-yet-there"], "tags": {}},
        schedule="30 2 * * *",
        timezone="Europe/Berlin",
        full_every=7,
        retention={"keep_last": 2, "keep_daily": 7},
        window={"start": "22:00", "end": "06:00"},
    )
    pid = made["policy_id"]
    assert made["name"] == "gold" and made["enabled"] is True
    assert made["selector"] == {"vms": ["web1", "not-yet-there"], "tags": {}}
    assert made["retention"] == {
        "keep_last": 2,
        "keep_hourly": 0,
        "keep_daily": 7,
        "keep_weekly": 0,
        "keep_monthly": 0,
        "keep_yearly": 0,
    }
    assert made["window"] == {"start": "22:00", "end": "06:00"}
    assert made["full_every"] == 7 and made["verify_after"] is False
    assert made["created_by"] == "admin" and made["last_runs"] == []
    assert made["matched_vms"] == ["web1"]
    # The next runs: 02:30 in Berlin, answered in UTC, ascending, one a day.
    runs = [iso(t) for t in made["next_runs"]]
    assert len(runs) == 3 and all(t.utcoffset().total_seconds() == 0 for t in runs)
    assert all(made["next_runs"][i].endswith("Z") for i in range(3))
    berlin = [t.astimezone(ZoneInfo("Europe/Berlin")) for t in runs]
    assert all((t.hour, t.minute) == (2, 30) for t in berlin), berlin
    assert runs == sorted(runs) and runs[0] > datetime.now(UTC)
    assert len({t.date() for t in berlin}) == 3

    assert c.client.get(f"/api/v1/policies/{pid}") == {**made, "updated_at": None}
    listed = c.client.get("/api/v1/policies")
    assert listed["total"] == 1 and [p["policy_id"] for p in listed["policies"]] == [pid]
    assert "last_runs" not in listed["policies"][0]

    # Name taken: 409 naming the holder.
    body = refused(c.http("POST", "/api/v1/policies", json=policy_body()), 409, "conflict")
    assert body["details"]["policy_id"] == pid

    # Each bad field: 400 invalid_request naming it.
    bad: list[tuple[dict[str, Any], str]] = [
        ({"schedule": "* * *"}, "schedule"),
        ({"schedule": "61 * * * *"}, "schedule"),
        ({"schedule": "0 0 31 2 *"}, "schedule"),  # never runs
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"repository_id": "nope"}, "repository_id"),
        ({"retention": {}}, "retention"),
        ({"retention": {"keep_last": 0, "keep_daily": 0}}, "retention"),
        ({"retention": {"keep_last": -2}}, "retention.keep_last"),
        ({"retention": {"keep_last": "2"}}, "retention.keep_last"),
        ({"retention": {"keep_forever": 1}}, "retention.keep_forever"),
        ({"full_every": 0}, "full_every"),
        ({"window": {"start": "25:00", "end": "06:00"}}, "window.start"),
        ({"window": {"start": "22:00"}}, "window.end"),
        ({"selector": {"vms": [], "tags": {}}}, "selector"),
        ({"selector": {"names": ["web1"]}}, "selector.names"),
        ({"enabled": "yes"}, "enabled"),
        ({"name": ""}, "name"),
        ({"colour": "red"}, "colour"),
    ]
    for over, field in bad:
        r = c.http("POST", "/api/v1/policies", json={**policy_body(name="other"), **over})
        refused(r, 400, "invalid_request", field)
    body = refused(
        c.http("POST", "/api/v1/policies", json=policy_body(name="o", schedule="* * *")),
        400,
        "invalid_request",
    )
    assert "5" in body["message"], body  # the parser's reason: a cron has 5 fields
    missing = {k: v for k, v in policy_body(name="other").items() if k != "schedule"}
    refused(c.http("POST", "/api/v1/policies", json=missing), 400, "invalid_request", "schedule")
    assert c.client.get("/api/v1/policies")["total"] == 1

    # PATCH: partial; the policy is checked whole again.
    r = c.http("PATCH", f"/api/v1/policies/{pid}", json={"enabled": False, "window": None})
    assert r.status_code == 200, r.text
    changed = r.json()
    assert changed["enabled"] is False and changed["window"] is None
    assert changed["next_runs"] == [] and changed["updated_at"]
    assert changed["schedule"] == "30 2 * * *" and changed["full_every"] == 7
    assert changed["last_scheduled_at"] is None
    r = c.http("PATCH", f"/api/v1/policies/{pid}", json={"timezone": "Asia/Tokyo", "enabled": True})
    # Switched back on: due runs count from now (the time off was not "missed").
    assert iso(r.json()["last_scheduled_at"]) >= iso(changed["updated_at"])
    tokyo = [iso(t).astimezone(ZoneInfo("Asia/Tokyo")) for t in r.json()["next_runs"]]
    assert all((t.hour, t.minute) == (2, 30) for t in tokyo), tokyo
    other = create(c, name="silver")
    # A new schedule counts from the edit, not from the policy's creation.
    assert other["last_scheduled_at"] is None
    r = c.http("PATCH", f"/api/v1/policies/{other['policy_id']}", json={"schedule": "0 4 * * *"})
    restarted = r.json()["last_scheduled_at"]
    assert iso(restarted) >= iso(other["created_at"])
    # Other edits leave it alone.
    r = c.http("PATCH", f"/api/v1/policies/{other['policy_id']}", json={"verify_after": True})
    assert r.json()["verify_after"] is True and r.json()["last_scheduled_at"] == restarted
    refused(
        c.http("PATCH", f"/api/v1/policies/{other['policy_id']}", json={"name": "gold"}),
        409,
        "conflict",
    )
    for over, field in [
        ({"schedule": "every day"}, "schedule"),
        ({"timezone": "Nowhere/Land"}, "timezone"),
        ({"retention": {"keep_last": 0}}, "retention"),
        ({"repository_id": "gone"}, "repository_id"),
        ({"name": None}, "name"),
        ({"full_every": -1}, "full_every"),
    ]:
        r = c.http("PATCH", f"/api/v1/policies/{pid}", json=over)
        refused(r, 400, "invalid_request", field)
    assert c.client.get(f"/api/v1/policies/{pid}")["timezone"] == "Asia/Tokyo"
    r = c.http("PATCH", f"/api/v1/policies/{pid}", json={"full_every": None})
    assert r.json()["full_every"] is None
    refused(c.http("PATCH", "/api/v1/policies/no-such", json={"enabled": False}), 404, "not_found")

    # Paging and lookup by name.
    page = c.client.get("/api/v1/policies", limit=1, offset=1)
    assert page["total"] == 2 and [p["name"] for p in page["policies"]] == ["silver"]
    assert [p["name"] for p in c.client.get("/api/v1/policies", name="silver")["policies"]] == [
        "silver"
    ]
    assert c.client.get("/api/v1/policies", name="bronze") == {"policies": [], "total": 0}

    # Roles: a viewer reads; writes need an admin.
    viewer = make_token(c, "v", "viewer")
    operator = make_token(c, "o", "operator")
    assert c.http("GET", f"/api/v1/policies/{pid}", token=viewer).status_code == 200
    for method, path, who in [
        ("POST", "/api/v1/policies", viewer),
        ("POST", "/api/v1/policies", operator),
        ("PATCH", f"/api/v1/policies/{pid}", operator),
        ("DELETE", f"/api/v1/policies/{pid}", operator),
        ("POST", f"/api/v1/policies/{pid}/retention/apply", operator),
        ("POST", f"/api/v1/policies/{pid}/run", viewer),
    ]:
        body = refused(
            c.http(method, path, token=who, json=policy_body(name="x")), 403, "forbidden"
        )
        assert body["details"]["role_needed"] in ("admin", "operator"), body

    # DELETE: 204, then gone.
    r = c.http("DELETE", f"/api/v1/policies/{pid}")
    assert r.status_code == 204 and r.content == b""
    refused(c.http("GET", f"/api/v1/policies/{pid}"), 404, "not_found")
    refused(c.http("DELETE", f"/api/v1/policies/{pid}"), 404, "not_found")
    refused(c.http("POST", f"/api/v1/policies/{pid}/run"), 404, "not_found")
    refused(c.http("POST", f"/api/v1/policies/{pid}/retention/plan"), 404, "not_found")
    assert [p["name"] for p in c.client.get("/api/v1/policies")["policies"]] == ["silver"]


# ------------------------------------------------------------------- tags


def test_vm_tags_drive_selectors_and_scopes(cluster: Cluster, make_vm) -> None:
    c = cluster
    c.register(make_vm("web1", [8 * MiB]), make_vm("db1", [8 * MiB]))
    assert [v["tags"] for v in c.client.get("/api/v1/vms")["vms"]] == [{}, {}]  # cached now
    pid = create(c, selector={"vms": [], "tags": {"tier": "gold"}})["policy_id"]
    assert c.client.get(f"/api/v1/policies/{pid}")["matched_vms"] == []

    r = c.http("PATCH", "/api/v1/vms/web1", json={"tags": {"tier": "gold", "site": "fra"}})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "web1" and r.json()["tags"] == {"tier": "gold", "site": "fra"}
    # The list cached before the change shows it at once.
    assert {v["name"]: v["tags"] for v in c.client.get("/api/v1/vms")["vms"]} == {
        "db1": {},
        "web1": {"tier": "gold", "site": "fra"},
    }
    assert c.client.get("/api/v1/vms/web1")["tags"] == {"tier": "gold", "site": "fra"}
    assert c.client.get(f"/api/v1/policies/{pid}")["matched_vms"] == ["web1"]

    c.http("PATCH", "/api/v1/vms/db1", json={"tags": {"tier": "gold"}})
    assert c.client.get(f"/api/v1/policies/{pid}")["matched_vms"] == ["db1", "web1"]
    # Every tag of the selector must match.
    c.http(
        "PATCH",
        f"/api/v1/policies/{pid}",
        json={"selector": {"tags": {"tier": "gold", "site": "fra"}}},
    )
    assert c.client.get(f"/api/v1/policies/{pid}")["matched_vms"] == ["web1"]
    # Tags are replaced whole.
    r = c.http("PATCH", "/api/v1/vms/web1", json={"tags": {}})
    assert r.json()["tags"] == {}
    assert c.client.get(f"/api/v1/policies/{pid}")["matched_vms"] == []

    for tags, field in [
        ({"a=b": "x"}, "tags.a=b"),
        ({"tier": "two words"}, "tags.tier"),
        ({"tier": 5}, "tags.tier"),
        ({"": "x"}, "tags"),
        ({f"k{i}": "v" for i in range(51)}, "tags"),
        ({"x" * 65: "v"}, "tags"),
    ]:
        r = c.http("PATCH", "/api/v1/vms/db1", json={"tags": tags})
        body = error_body(r, 400, "invalid_request")
        assert any(f.startswith(field) or field.startswith(f) for f in body["details"]["fields"]), (
            tags,
            body,
        )
    error_body(c.http("PATCH", "/api/v1/vms/db1", json={}), 400, "invalid_request")
    error_body(c.http("PATCH", "/api/v1/vms/nope", json={"tags": {}}), 404, "not_found")
    operator = make_token(c, "o", "operator")
    body = error_body(
        c.http("PATCH", "/api/v1/vms/db1", json={"tags": {"a": "b"}}, token=operator),
        403,
        "forbidden",
    )
    assert body["details"]["role_needed"] == "admin"
    assert c.client.get("/api/v1/vms/db1")["tags"] == {"tier": "gold"}

    # A tenant scoped by tag: the policy (its repository is in scope) shows
    # only the tenant's VMs, and hides the names of others in the selector.
    c.http(
        "PATCH",
        f"/api/v1/policies/{pid}",
        json={"selector": {"vms": ["web1"], "tags": {"tier": "gold"}}},
    )
    tenant = make_token(c, "t", "operator", {"vms": ["tag:tier=gold"], "repositories": ["default"]})
    seen = c.http("GET", f"/api/v1/policies/{pid}", token=tenant).json()
    assert seen["matched_vms"] == ["db1"] and seen["selector"]["vms"] == []
    assert c.client.get(f"/api/v1/policies/{pid}")["matched_vms"] == ["db1", "web1"]
    # Running it would back up web1 too, outside the scope: refused.
    body = error_body(c.http("POST", f"/api/v1/policies/{pid}/run", token=tenant), 403, "forbidden")
    assert "web1" not in body["message"]
    # A tenant of another repository does not see the policy at all.
    other = make_token(c, "t2", "operator", {"vms": ["tag:tier=gold"], "repositories": ["theirs"]})
    error_body(c.http("GET", f"/api/v1/policies/{pid}", token=other), 404, "not_found")
    assert c.http("GET", "/api/v1/policies", token=other).json() == {"policies": [], "total": 0}
    error_body(c.http("POST", f"/api/v1/policies/{pid}/retention/plan", token=other), 404)


# -------------------------------------------------------------------- run


@pytest.mark.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)
@cluster_env(hub={"SENDENSE_SCHEDULER_INTERVAL": "0.5"})
def test_run_now_then_last_runs(cluster: Cluster, make_vm) -> None:
    c = cluster
    c.register(make_vm("web1", [8 * MiB]), make_vm("db1", [8 * MiB]), make_vm("dev1", [8 * MiB]))
    for name in ("web1", "db1"):
        c.http("PATCH", f"/api/v1/vms/{name}", json={"tags": {"tier": "gold"}})
    pid = create(
        c,
        selector={"vms": [], "tags": {"tier": "gold"}},
        retention={"keep_last": 5},
        verify_after=True,
    )["policy_id"]
    operator = make_token(c, "ops", "operator")
    r = c.http("POST", f"/api/v1/policies/{pid}/run", token=operator)
    assert r.status_code == 202, r.text
    started = r.json()
    # Each VM is started here, or (being claimed by the in-hub scheduler at
    # that very moment) reported queued and started by it.
    assert started["skipped"] == [], started
    assert len(started["job_ids"]) + len(started["queued"]) == 2, started

    # The scheduler follows up: verify (verify_after), then retention, then done.
    def settled(run_id: str) -> Any:
        def check() -> dict[str, Any] | None:
            shown: dict[str, Any] = c.client.get(f"/api/v1/policies/{pid}")
            runs = shown["last_runs"]
            ok = [(r["run_id"], r["status"]) for r in runs] == [(run_id, "done")] * 2
            return shown if ok else None

        return check

    shown = wait_for("both VMs done", settled(started["run_id"]), timeout=60)
    job_ids = [r["job_id"] for r in shown["last_runs"]]
    assert set(started["job_ids"]) <= set(job_ids)
    jobs = {j["vm_name"]: j for j in (c.wait_job(job_id) for job_id in job_ids)}
    assert sorted(jobs) == ["db1", "web1"]  # dev1 has no tag: not protected
    for job in jobs.values():
        assert job["status"] == "completed", job
        assert job["created_by"] == "ops" and job["tags"]["policy_id"] == pid
        assert job["backup_type"] == "full"  # a VM's first run under a policy

    last = {r["vm_name"]: r for r in shown["last_runs"]}
    assert sorted(last) == ["db1", "web1"]
    for name, run in last.items():
        job = jobs[name]
        assert run["job_id"] == job["job_id"] and run["job_status"] == "completed"
        assert run["trigger"] == "manual" and run["backup_type"] == "full"
        assert run["error"] is None and run["finished_at"]
        assert run["backup_ids"] == job["backups"] and len(job["backups"]) == 1
        (verify_id,) = run["verify_job_ids"]
        verify = c.client.get(f"/api/v1/jobs/{verify_id}")
        assert verify["kind"] == "verify" and verify["status"] == "completed", verify
        point = c.client.get(f"/api/v1/backups/{job['backups'][0]}")
        assert point["verify_status"] == "ok", point
        # keep_last=5 of one point: nothing to remove, no retention job.
        assert run["retention_job_id"] is None and "nothing to remove" in run["reason"], run
    assert c.client.get("/api/v1/backups", vm_name="dev1")["backups"] == []

    # Keep one: the next run's retention merges the full into the new point.
    c.http("PATCH", f"/api/v1/policies/{pid}", json={"retention": {"keep_last": 1}})
    again = c.client.post(f"/api/v1/policies/{pid}/run")
    assert len(again["job_ids"]) + len(again["queued"]) == 2 and again["skipped"] == []
    shown = wait_for("the second run done", settled(again["run_id"]), timeout=90)
    for run in shown["last_runs"]:
        assert run["backup_type"] == "incremental" and run["job_status"] == "completed"
        retention = c.client.get(f"/api/v1/jobs/{run['retention_job_id']}")
        assert retention["kind"] == "retention" and retention["status"] == "completed"
        assert retention["created_by"] == "scheduler"
        points = c.client.get("/api/v1/backups", vm_name=run["vm_name"])["backups"]
        assert [p["backup_id"] for p in points] == run["backup_ids"], points

    # A policy that matches no VM: accepted, no job.
    empty = create(c, name="nobody", selector={"vms": ["not-yet"]})["policy_id"]
    r = c.http("POST", f"/api/v1/policies/{empty}/run")
    assert r.status_code == 202 and r.json()["job_ids"] == [], r.text
    assert c.client.get(f"/api/v1/policies/{empty}")["last_runs"] == []

    # Deleting the policy keeps its jobs and backups, drops its history.
    assert c.http("DELETE", f"/api/v1/policies/{pid}").status_code == 204
    for job_id in started["job_ids"]:
        assert c.client.get(f"/api/v1/jobs/{job_id}")["status"] == "completed"
    assert len(c.client.get("/api/v1/backups", vm_name="web1")["backups"]) == 1


# -------------------------------------------------------------- retention


def take(c: Cluster, vm: Any, name: str, kinds: list[str], tmp_path: Path) -> list[dict[str, Any]]:
    """One backup per kind (disk 0) after new writes, each copied to a raw
    file as it reads at backup time."""
    points = []
    for i, kind in enumerate(kinds):
        write_random(vm, 0, (i * 2 * MiB) % (6 * MiB), MiB)
        point = by_disk(c, c.backup(name, kind))[0]
        raw_copy(point["file_path"], tmp_path / f"{point['backup_id']}.raw")
        points.append(point)
    return points


def assert_reads_as_before(c: Cluster, point: dict[str, Any], tmp_path: Path) -> None:
    raw = tmp_path / f"{point['backup_id']}.raw"
    now = c.client.get(f"/api/v1/backups/{point['backup_id']}")
    assert now["status"] == "completed", now
    assert img.compare(now["file_path"], str(raw)), now
    assert now["digest"] == point["digest"] == reference_digest(raw)


def test_retention_plan_then_apply(cluster: Cluster, make_vm, tmp_path: Path) -> None:
    c = cluster
    vm = make_vm("ret1", [8 * MiB])
    c.register(vm)
    full, inc1, inc2 = take(c, vm, "ret1", ["full", "incremental", "incremental"], tmp_path)
    pid = create(c, selector={"vms": ["ret1"]}, retention={"keep_last": 2})["policy_id"]

    r = c.http("POST", f"/api/v1/policies/{pid}/retention/plan")
    assert r.status_code == 200, r.text
    plan = r.json()
    (vm_plan,) = plan["vms"]
    assert vm_plan["vm_name"] == "ret1" and vm_plan["repository_id"] == "default"
    (disk,) = vm_plan["disks"]
    assert disk["disk_id"] == 0 and disk["locked"] == []
    assert [k["backup_id"] for k in disk["keep"]] == [inc2["backup_id"], inc1["backup_id"]]
    assert all(k["reasons"] for k in disk["keep"])
    # The full is the base of the kept points: it goes by merging into inc1.
    assert disk["remove"] == [
        {
            "backup_id": full["backup_id"],
            "action": "consolidate",
            "reason": disk["remove"][0]["reason"],
            "into": inc1["backup_id"],
        }
    ]
    assert disk["remove"][0]["reason"]
    # A dry run changes nothing.
    assert c.client.get(f"/api/v1/backups/{full['backup_id']}")["status"] == "completed"
    assert c.client.get("/api/v1/jobs", kind="retention")["total"] == 0

    r = c.http("POST", f"/api/v1/policies/{pid}/retention/apply")
    assert r.status_code == 202, r.text
    applied = r.json()
    assert applied["job_ids"] == [applied["job_id"]]
    assert applied["vms"] == [{"vm_name": "ret1", "job_id": applied["job_id"], "removes": 1}]
    job = c.wait_job(applied["job_id"])
    assert job["status"] == "completed" and job["kind"] == "retention", job
    assert job["created_by"] == "admin"
    error_body(c.http("GET", f"/api/v1/backups/{full['backup_id']}"), 404, "not_found")
    for point in (inc1, inc2):
        assert_reads_as_before(c, point, tmp_path)

    # Nothing more to remove: the plan keeps both, apply starts no job.
    again = c.client.post(f"/api/v1/policies/{pid}/retention/plan")
    assert again["vms"][0]["disks"][0]["remove"] == []
    r = c.http("POST", f"/api/v1/policies/{pid}/retention/apply")
    assert r.status_code == 202 and r.json()["job_id"] is None and r.json()["job_ids"] == []


# -------------------------------------------------------------------- CLI


def test_cli_policy_commands_and_vm_tag(cluster: Cluster, make_vm) -> None:
    c = cluster
    vm = make_vm("web1", [8 * MiB])
    c.register(vm)

    out = cli(c, "vm", "tag", "web1", "tier=gold", "site=fra").stdout
    assert "web1: site=fra tier=gold" in out
    out = cli(c, "vm", "tag", "web1", "--remove", "site").stdout
    assert "web1: tier=gold" in out
    assert json.loads(cli(c, "--json", "vm", "tag", "web1").stdout) == {
        "name": "web1",
        "tags": {"tier": "gold"},
    }
    assert c.client.get("/api/v1/vms/web1")["tags"] == {"tier": "gold"}
    bad = cli(c, "vm", "tag", "web1", "a=two words", ok=False)
    assert "invalid_request" in bad.stderr

    out = cli(
        c, "policy", "create", "gold", "--tag", "tier=gold", "--schedule", NEVER,
        "--timezone", "Europe/Berlin", "--keep-last", "2", "--window", "22:00-06:00",
    ).stdout  # fmt: skip
    assert "policy gold created" in out and "web1" in out and "22:00-06:00" in out
    made = json.loads(cli(c, "--json", "policy", "show", "gold").stdout)
    assert made["selector"] == {"vms": [], "tags": {"tier": "gold"}}
    assert made["matched_vms"] == ["web1"] and made["timezone"] == "Europe/Berlin"
    assert len(made["next_runs"]) == 3
    # By id as well as by name.
    assert (
        json.loads(cli(c, "--json", "policy", "show", made["policy_id"]).stdout)["name"] == "gold"
    )
    listed = cli(c, "policy", "ls").stdout
    assert "gold" in listed and "tier=gold" in listed and "last=2" in listed
    assert json.loads(cli(c, "--json", "policy", "ls").stdout)["total"] == 1

    refused = cli(c, "policy", "create", "bad", "--vm", "web1", "--schedule", "* *",
                  "--keep-last", "1", ok=False)  # fmt: skip
    assert "invalid_request" in refused.stderr and "schedule" in refused.stderr
    refused = cli(c, "--json", "policy", "create", "gold", "--vm", "web1", "--schedule", NEVER,
                  "--keep-last", "1", ok=False)  # fmt: skip
    assert json.loads(refused.stdout)["error"] == "conflict"

    out = cli(c, "policy", "edit", "gold", "--keep-daily", "7", "--disable", "--window", "none")
    assert "policy gold changed" in out.stdout
    edited = json.loads(cli(c, "--json", "policy", "show", "gold").stdout)
    assert edited["retention"]["keep_last"] == 2 and edited["retention"]["keep_daily"] == 7
    assert edited["enabled"] is False and edited["window"] is None and edited["next_runs"] == []
    cli(c, "policy", "edit", "gold", "--enable", "--keep-daily", "0")

    for kind in ("full", "incremental", "incremental"):
        write_random(vm, 0, 0, MiB)
        c.backup("web1", kind)
    plan = cli(c, "policy", "plan", "gold").stdout
    assert plan.count(" keep ") == 2 and "consolidate into" in plan, plan
    assert "1 restore point(s) would be removed" in plan
    as_json = json.loads(cli(c, "--json", "policy", "plan", "gold").stdout)
    assert len(as_json["vms"][0]["disks"][0]["remove"]) == 1
    applied = json.loads(cli(c, "--json", "policy", "apply", "gold", "--wait").stdout)
    assert [j["status"] for j in applied["jobs"]] == ["completed"]
    assert "0 restore point(s) would be removed" in cli(c, "policy", "plan", "gold").stdout

    out = cli(c, "policy", "run", "gold", "--wait").stdout
    assert "started" in out and "web1: completed" in out, out
    ran = json.loads(cli(c, "--json", "policy", "run", "gold", "--wait").stdout)
    assert [j["status"] for j in ran["jobs"]] == ["completed"] and ran["run_id"], ran
    assert ran["jobs"][0]["tags"]["policy"] == "gold"

    assert "policy gold deleted" in cli(c, "policy", "rm", "gold").stdout
    gone = cli(c, "policy", "show", "gold", ok=False)
    assert "not_found" in gone.stderr
    assert json.loads(cli(c, "--json", "policy", "ls").stdout) == {"policies": [], "total": 0}
