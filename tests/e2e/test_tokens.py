"""Tokens, tenants and the audit log, end to end (real hub and node).

Tokens: the secret is shown once and stored hashed; revocation and expiry
take effect at once. Tenants: a scoped token sees its VMs, their restore
points and jobs, and nothing else: other tenants' things answer 404 exactly
as a missing id does. Audit: every mutating or refused request is recorded
with who, what, target and result.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fixtures.cluster import Cluster

MiB = 1 << 20


def error_body(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body: dict[str, Any] = r.json()
    assert set(body) == {"error", "message", "details"} and body["error"] == code, body
    return body


def create(c: Cluster, **body: Any) -> dict[str, Any]:
    r = c.http("POST", "/api/v1/tokens", json=body)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


@pytest.mark.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)
def test_token_is_shown_once_stored_hashed_and_revoked_at_once(cluster: Cluster) -> None:
    made = create(cluster, name="ci-bot", role="operator")
    secret = made["token"]
    assert {"token_id", "name", "role", "token", "scope", "expires_at", "created_at"} <= set(made)
    assert made["created_by"] == "admin" and made["scope"] is None
    listed = cluster.client.get("/api/v1/tokens")["tokens"]
    assert [t["name"] for t in listed] == ["ci-bot"]
    assert secret not in str(listed) and "token" not in listed[0]
    assert cluster.http("GET", "/api/v1/vms", token=secret).status_code == 200
    if cluster.database_url == "":  # the catalog holds only the SHA-256
        db = sqlite3.connect(cluster.hub_dir / "catalog.db")
        (stored,) = db.execute("SELECT token_hash FROM api_tokens").fetchone()
        db.close()
        assert stored == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in cluster.log("hub")

    error_body(cluster.http("POST", "/api/v1/tokens", json={"name": "ci-bot", "role": "viewer"}),
               409, "conflict")  # fmt: skip
    r = cluster.http("DELETE", f"/api/v1/tokens/{made['token_id']}")
    assert r.status_code == 200 and r.json()["revoked_at"], r.text
    error_body(cluster.http("GET", "/api/v1/vms", token=secret), 401, "unauthorized")
    assert cluster.client.get("/api/v1/tokens")["tokens"] == []
    revoked = cluster.client.get("/api/v1/tokens", include_revoked=True)["tokens"]
    assert [t["token_id"] for t in revoked] == [made["token_id"]]
    error_body(cluster.http("DELETE", "/api/v1/tokens/no-such-token"), 404, "not_found")


def test_expired_token_is_refused(cluster: Cluster) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=2)
    made = create(cluster, name="short", role="viewer", expires_at=soon.isoformat())
    assert cluster.http("GET", "/api/v1/vms", token=made["token"]).status_code == 200
    time.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.2)
    body = error_body(cluster.http("GET", "/api/v1/vms", token=made["token"]), 401, "unauthorized")
    assert "expired" in body["message"]


def test_bad_token_requests_name_the_field(cluster: Cluster) -> None:
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    cases = [
        ({"name": "", "role": "viewer"}, "name"),
        ({"name": "x" * 201, "role": "viewer"}, "name"),
        ({"name": "a\nb", "role": "viewer"}, "name"),
        ({"name": "r", "role": "root"}, "role"),
        ({"name": "p", "role": "viewer", "expires_at": past}, "expires_at"),
        ({"name": "n", "role": "viewer", "expires_at": "2030-01-01T00:00:00"}, "expires_at"),
        ({"name": "t", "role": "viewer", "scope": {"vms": ["tag:novalue"]}}, "scope.vms"),
        ({"name": "a", "role": "admin", "scope": {"vms": ["web1"]}}, "role"),
    ]
    for body, field in cases:
        r = cluster.http("POST", "/api/v1/tokens", json=body)
        err = error_body(r, 400, "invalid_request")
        assert field in err["message"], (body, err)
    assert cluster.client.get("/api/v1/tokens")["tokens"] == []


@pytest.mark.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)
def test_a_tenant_sees_only_its_own(cluster: Cluster, make_vm) -> None:
    mine, theirs = make_vm("tenant-a-web", [8 * MiB]), make_vm("tenant-b-db", [8 * MiB])
    cluster.register(mine, theirs)
    job_a = cluster.backup("tenant-a-web", "full")
    job_b = cluster.backup("tenant-b-db", "full")
    (backup_b,) = job_b["backups"]
    a = create(
        cluster,
        name="tenant-a",
        role="operator",
        scope={"vms": ["tenant-a-web"], "repositories": ["default"]},
    )["token"]

    def get(path: str, **params: Any) -> Any:
        r = cluster.http("GET", path, token=a, params=params)
        assert r.status_code == 200, r.text
        return r.json()

    assert [v["name"] for v in get("/api/v1/vms")["vms"]] == ["tenant-a-web"]
    listed = get("/api/v1/backups")
    assert listed["total"] == 1 and listed["backups"][0]["vm_name"] == "tenant-a-web"
    assert get("/api/v1/backups", vm_name="tenant-b-db") == {"backups": [], "total": 0}
    assert [j["job_id"] for j in get("/api/v1/jobs")["jobs"]] == [job_a["job_id"]]
    assert "tenant-b" not in str(get("/api/v1/jobs")) + str(get("/api/v1/vms"))

    # Tenant B's things answer exactly like ids that do not exist.
    cases = [
        ("GET", "/api/v1/vms/{}", "tenant-b-db", "no-such-vm"),
        ("GET", "/api/v1/backups/{}", backup_b, "no-such-backup"),
        ("GET", "/api/v1/backups/{}/chain", "tenant-b-db", "no-such-vm"),
        ("GET", "/api/v1/jobs/{}", job_b["job_id"], "no-such-job"),
        ("GET", "/api/v1/jobs/{}/events", job_b["job_id"], "no-such-job"),
        ("POST", "/api/v1/jobs/{}/cancel", job_b["job_id"], "no-such-job"),
        ("POST", "/api/v1/backups/{}/verify", backup_b, "no-such-backup"),
    ]
    for method, template, hidden, missing in cases:
        r1 = cluster.http(method, template.format(hidden), token=a)
        r2 = cluster.http(method, template.format(missing), token=a)
        error_body(r1, 404, "not_found")
        error_body(r2, 404, "not_found")
        # Word for word the same answer, but for the id the caller sent.
        assert r1.text.replace(hidden, "ID") == r2.text.replace(missing, "ID"), (r1.text, r2.text)
    r = cluster.http(
        "POST",
        "/api/v1/backups",
        token=a,
        json={"vm_name": "tenant-b-db", "repository_id": "default", "backup_type": "auto"},
    )
    error_body(r, 404, "not_found")
    # ... while its own VM is an ordinary operator's.
    r = cluster.http(
        "POST",
        "/api/v1/backups",
        token=a,
        json={"vm_name": "tenant-a-web", "repository_id": "default", "backup_type": "auto"},
    )
    assert r.status_code == 202, r.text
    job = cluster.wait_job(r.json()["job_id"])
    assert job["status"] == "completed" and job["created_by"] == "tenant-a"


def test_tag_scope_follows_the_vms_tags(cluster: Cluster, make_vm) -> None:
    vm = make_vm("tagged1", [8 * MiB])
    cluster.register(vm)
    t = create(
        cluster,
        name="by-tag",
        role="viewer",
        scope={"vms": ["tag:customer=acme"], "repositories": ["default"]},
    )["token"]
    assert cluster.http("GET", "/api/v1/vms", token=t).json()["vms"] == []
    if cluster.database_url == "":
        db = sqlite3.connect(cluster.hub_dir / "catalog.db")
        db.execute("UPDATE vms SET tags = ? WHERE name = 'tagged1'", ('{"customer": "acme"}',))
        db.commit()
        db.close()
        names = [v["name"] for v in cluster.http("GET", "/api/v1/vms", token=t).json()["vms"]]
        assert names == ["tagged1"]


def test_audit_records_who_did_what_and_refusals(cluster: Cluster) -> None:
    viewer = create(cluster, name="auditee", role="viewer")
    r = cluster.http("POST", "/api/v1/tokens", token=viewer["token"], json={})
    error_body(r, 403, "forbidden")
    error_body(cluster.http("GET", "/api/v1/vms", token="sdt_wrong"), 401, "unauthorized")
    assert cluster.http("DELETE", f"/api/v1/tokens/{viewer['token_id']}").status_code == 200
    cluster.http("GET", "/api/v1/vms")  # a read: not audited

    entries = cluster.client.get("/api/v1/audit")["entries"]
    seen = [(e["token_name"], e["method"], e["route"], e["status"]) for e in entries]
    assert seen == [
        ("admin", "DELETE", "/api/v1/tokens/{token_id}", 200),
        (None, "GET", "/api/v1/vms", 401),
        ("auditee", "POST", "/api/v1/tokens", 403),
        ("admin", "POST", "/api/v1/tokens", 201),
    ], seen
    assert entries[0]["target"] == {"token_id": viewer["token_id"]}
    assert all(e["client"] and e["at"] for e in entries)
    assert viewer["token"] not in str(entries) and "sdt_wrong" not in str(entries)

    only = cluster.client.get("/api/v1/audit", token="auditee")
    assert only["total"] == 1 and only["entries"][0]["status"] == 403
    by_route = cluster.client.get("/api/v1/audit", route="/api/v1/tokens/{token_id}")
    assert by_route["total"] == 1
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert cluster.client.get("/api/v1/audit", since=later)["total"] == 0


def test_cli_token_and_audit_commands(cluster: Cluster) -> None:
    import json
    import os
    import subprocess
    import sys

    def cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "SENDENSE_URL": cluster.hub_url,
            "SENDENSE_TOKEN": token or cluster.admin_token,
        }
        return subprocess.run(
            [sys.executable, "-m", "sendense.cli.main", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    made = cli("--json", "token", "create", "night-ops", "--role", "operator", "--vm", "web1")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    assert token["scope"] == {"vms": ["web1"], "repositories": []}
    plain = cli("token", "create", "reader", "--role", "viewer")
    secret = plain.stdout.strip().splitlines()[-1]
    assert plain.returncode == 0 and secret.startswith("sdt_"), plain.stdout
    assert cli("vm", "ls", token=secret).returncode == 0
    listed = cli("token", "ls")
    assert "night-ops" in listed.stdout and "reader" in listed.stdout
    assert secret not in listed.stdout and token["token"] not in listed.stdout
    assert cli("token", "revoke", "reader").returncode == 0
    refused = cli("vm", "ls", token=secret)
    assert refused.returncode != 0 and "revoked" in refused.stdout + refused.stderr
    audit = json.loads(cli("--json", "audit", "ls", "--route", "/api/v1/tokens").stdout)
    assert audit["total"] == 2 and {e["status"] for e in audit["entries"]} == {201}


def test_audit_names_the_route_of_a_request_refused_before_routing(cluster: Cluster) -> None:
    """A 401 is answered before routing: its entry still has the route template."""
    error_body(cluster.http("DELETE", "/api/v1/tokens/abc", token=None), 401, "unauthorized")
    entries = cluster.client.get("/api/v1/audit", route="/api/v1/tokens/{token_id}")["entries"]
    assert [(e["method"], e["status"], e["target"]) for e in entries] == [
        ("DELETE", 401, {"token_id": "abc"})
    ]


def test_a_scoped_token_never_acts_as_admin(cluster: Cluster) -> None:
    """Even a row written with role admin and a scope (by an older hub, or by
    hand) is capped at operator when it is used."""
    made = create(cluster, name="capped", role="operator", scope={"vms": ["x"]})
    if cluster.database_url == "":
        db = sqlite3.connect(cluster.hub_dir / "catalog.db")
        db.execute("UPDATE api_tokens SET role = 'admin' WHERE name = 'capped'")
        db.commit()
        db.close()
        r = cluster.http("GET", "/api/v1/tokens", token=made["token"])
        assert error_body(r, 403, "forbidden")["details"]["role_needed"] == "admin"


@pytest.mark.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)
def test_concurrent_creations_of_one_name_make_one_token(cluster: Cluster) -> None:
    """Eight creations of the same name at once, spread over the hub's API
    worker processes (fresh connections): one 201, seven 409, one live token."""
    from concurrent.futures import ThreadPoolExecutor

    def create(_: int) -> int:
        r = cluster.http("POST", "/api/v1/tokens", json={"name": "ci-bot", "role": "viewer"})
        return r.status_code

    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            codes = sorted(pool.map(create, range(8)))
        live = [t for t in cluster.client.get("/api/v1/tokens")["tokens"] if t["name"] == "ci-bot"]
        assert len(live) == 1, live
        assert codes.count(201) == 1 and codes.count(409) == 7, codes
        cluster.http("DELETE", f"/api/v1/tokens/{live[0]['token_id']}")


def test_audit_entries_past_the_retention_are_removed(cluster: Cluster) -> None:
    """SENDENSE_AUDIT_RETENTION_DAYS: at start (then hourly) older entries go,
    newer ones stay."""
    assert cluster.http("DELETE", "/api/v1/tokens/nope").status_code == 404  # an entry now
    cluster.stop()
    now = datetime.now(UTC)
    db = sqlite3.connect(cluster.hub_dir / "catalog.db")
    with db:
        for days, route in ((45, "/old"), (20, "/recent")):
            at = (now - timedelta(days=days)).strftime("%Y-%m-%d %H:%M:%S.%f")
            db.execute(
                "INSERT INTO audit_log (id, at, token_name, method, route, path, status, target) "
                "VALUES (?, ?, 'admin', 'DELETE', ?, ?, 204, '{}')",
                (f"00000000-0000-0000-0000-0000000000{days}", at, route, route),
            )
    db.close()
    cluster.hub_env["SENDENSE_AUDIT_RETENTION_DAYS"] = "30"
    cluster.start_hub()
    deadline = time.monotonic() + 20
    while True:
        routes = [e["route"] for e in cluster.client.get("/api/v1/audit", limit=100)["entries"]]
        if "/old" not in routes or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "/old" not in routes
    assert "/recent" in routes
    assert "/api/v1/tokens/{token_id}" in routes
    assert "audit entries older than 30 days removed: 1" in cluster.log("hub")
