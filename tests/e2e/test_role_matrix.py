"""Every route of the live OpenAPI x every kind of caller.

The roles each route needs are written down here (`ROLE`); a route the hub
serves that this table does not know fails the test, so a new route cannot
ship without its place in the matrix. Real data stands behind the ids: a VM
with a full and an incremental restore point, its jobs, its node and source.

Callers: no token, a wrong token, viewer, operator, admin, and an operator
token scoped to another tenant (who must get 404 for everything of ours, as
if it did not exist, and 403 where the role is not enough).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from fixtures.cluster import Cluster

MiB = 1 << 20

ROLE: dict[tuple[str, str], str] = {
    ("GET", "/api/v1/nodes"): "viewer",
    ("POST", "/api/v1/nodes"): "admin",
    ("GET", "/api/v1/nodes/{node_id}"): "viewer",
    ("PATCH", "/api/v1/nodes/{node_id}"): "admin",
    ("DELETE", "/api/v1/nodes/{node_id}"): "admin",
    ("GET", "/api/v1/sources"): "viewer",
    ("POST", "/api/v1/sources"): "admin",
    ("DELETE", "/api/v1/sources/{source_id}"): "admin",
    ("POST", "/api/v1/vms/discover"): "admin",
    ("GET", "/api/v1/vms"): "viewer",
    ("GET", "/api/v1/vms/{vm_name}"): "viewer",
    ("PATCH", "/api/v1/vms/{vm_name}"): "admin",
    ("GET", "/api/v1/repositories"): "viewer",
    ("POST", "/api/v1/repositories"): "admin",
    ("GET", "/api/v1/repositories/{repository_id}"): "viewer",
    ("PATCH", "/api/v1/repositories/{repository_id}"): "admin",
    ("DELETE", "/api/v1/repositories/{repository_id}"): "admin",
    ("POST", "/api/v1/repositories/{repository_id}/rescan"): "admin",
    ("POST", "/api/v1/repositories/{repository_id}/key/export"): "admin",
    ("POST", "/api/v1/backups"): "operator",
    ("GET", "/api/v1/backups"): "viewer",
    ("GET", "/api/v1/backups/chain"): "viewer",
    ("GET", "/api/v1/backups/{vm_name}/chain"): "viewer",
    ("GET", "/api/v1/backups/{backup_id}"): "viewer",
    ("DELETE", "/api/v1/backups/{backup_id}"): "admin",
    ("POST", "/api/v1/backups/consolidate"): "admin",
    ("POST", "/api/v1/backups/{backup_id}/verify"): "operator",
    ("GET", "/api/v1/jobs"): "viewer",
    ("GET", "/api/v1/jobs/{job_id}"): "viewer",
    ("POST", "/api/v1/jobs/{job_id}/cancel"): "operator",
    ("GET", "/api/v1/jobs/{job_id}/events"): "viewer",
    ("POST", "/api/v1/tokens"): "admin",
    ("GET", "/api/v1/tokens"): "admin",
    ("DELETE", "/api/v1/tokens/{token_id}"): "admin",
    ("GET", "/api/v1/audit"): "admin",
    ("POST", "/api/v1/restores"): "operator",
    ("POST", "/api/v1/backups/{backup_id}/export"): "operator",
    ("GET", "/api/v1/backups/{backup_id}/export"): "viewer",
    ("DELETE", "/api/v1/backups/{backup_id}/export"): "operator",
    ("GET", "/api/v1/exports"): "viewer",
    ("POST", "/api/v1/restore/mounts"): "operator",
    ("GET", "/api/v1/restore/mounts"): "viewer",
    ("GET", "/api/v1/restore/mounts/{mount_id}"): "viewer",
    ("DELETE", "/api/v1/restore/mounts/{mount_id}"): "operator",
    ("GET", "/api/v1/restore/mounts/{mount_id}/files"): "operator",
    ("GET", "/api/v1/restore/mounts/{mount_id}/files/info"): "operator",
    ("GET", "/api/v1/restore/mounts/{mount_id}/download"): "operator",
    ("GET", "/api/v1/restore/mounts/{mount_id}/download-directory"): "operator",
    ("POST", "/api/v1/policies"): "admin",
    ("GET", "/api/v1/policies"): "viewer",
    ("GET", "/api/v1/policies/{policy_id}"): "viewer",
    ("PATCH", "/api/v1/policies/{policy_id}"): "admin",
    ("DELETE", "/api/v1/policies/{policy_id}"): "admin",
    ("POST", "/api/v1/policies/{policy_id}/run"): "operator",
    ("POST", "/api/v1/policies/{policy_id}/retention/plan"): "viewer",
    ("POST", "/api/v1/policies/{policy_id}/retention/apply"): "admin",
    ("POST", "/api/v1/webhooks"): "admin",
    ("GET", "/api/v1/webhooks"): "admin",
    ("GET", "/api/v1/webhooks/{webhook_id}"): "admin",
    ("PATCH", "/api/v1/webhooks/{webhook_id}"): "admin",
    ("POST", "/api/v1/webhooks/{webhook_id}/test"): "admin",
    ("DELETE", "/api/v1/webhooks/{webhook_id}"): "admin",
    ("GET", "/api/v1/webhooks/{webhook_id}/deliveries"): "admin",
    ("GET", "/metrics"): "viewer",
}
OPEN = {("GET", "/api/v1/health")}
RANK = {"viewer": 0, "operator": 1, "admin": 2}
# Routes whose answer to an allowed caller names things by id in its path: a
# tenant outside the scope gets 404 there.
SCOPED_PARAMS = ("vm_name", "backup_id", "job_id", "repository_id", "mount_id", "policy_id")


def routes(c: Cluster) -> list[tuple[str, str]]:
    spec = c.client.get("/openapi.json")
    return [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops]


def make_token(c: Cluster, name: str, role: str, scope: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"name": name, "role": role}
    if scope is not None:
        body["scope"] = scope
    created = c.client.post("/api/v1/tokens", body)
    assert created["role"] == role and created["token"]
    return str(created["token"])


def call(c: Cluster, method: str, path: str, token: str | None) -> httpx.Response:
    body = {} if method in ("POST", "PATCH", "PUT") else None
    return c.http(method, path, token=token, json=body)


def assert_refused(r: httpx.Response, status: int, code: str, what: str) -> dict[str, Any]:
    assert r.status_code == status, (what, r.status_code, r.text)
    body: dict[str, Any] = r.json()
    assert set(body) == {"error", "message", "details"}, (what, body)
    assert body["error"] == code, (what, body)
    return body


def test_every_route_for_every_kind_of_caller(cluster: Cluster, make_vm) -> None:
    vm = make_vm("matrix1", [8 * MiB])
    reg = cluster.register(vm)
    full = cluster.backup("matrix1", "full")
    inc = cluster.backup("matrix1", "incremental")
    ids = {
        "node_id": reg["node"]["node_id"],
        "source_id": reg["source"]["source_id"],
        "vm_name": "matrix1",
        "repository_id": "default",
        "backup_id": full["backups"][0],  # the base: a DELETE is refused (children)
        "job_id": inc["job_id"],
    }
    ids["mount_id"] = cluster.client.post(
        "/api/v1/restore/mounts", {"backup_id": ids["backup_id"]}
    )["mount_id"]
    ids["policy_id"] = cluster.client.post(
        "/api/v1/policies",
        {
            "name": "matrix",
            "selector": {"vms": ["matrix1"]},
            "repository_id": "default",
            "schedule": "0 3 1 1 *",
            "retention": {"keep_last": 5},
        },
    )["policy_id"]
    ids["webhook_id"] = cluster.client.post(
        "/api/v1/webhooks", {"url": "http://127.0.0.1:9/matrix", "events": ["job.failed"]}
    )["webhook_id"]
    tokens = {
        "viewer": make_token(cluster, "m-viewer", "viewer"),
        "operator": make_token(cluster, "m-operator", "operator"),
        "admin": make_token(cluster, "m-admin", "admin"),
        "tenant": make_token(
            cluster, "m-tenant", "operator", {"vms": ["someone-else"], "repositories": ["theirs"]}
        ),
    }
    ids["token_id"] = cluster.client.post(
        "/api/v1/tokens", {"name": "m-throwaway", "role": "viewer"}
    )["token_id"]

    served = set(routes(cluster)) - OPEN
    unknown = served - set(ROLE)
    assert not unknown, f"routes missing from the role matrix (add them to ROLE): {unknown}"
    assert not set(ROLE) - served, f"ROLE lists routes the hub does not serve: {set(ROLE) - served}"

    # Destructive routes last, so the others still find their data.
    order = sorted(served, key=lambda r: (r[0] == "DELETE", r[1]))
    for method, template in order:
        path = template.format(**ids)
        what = f"{method} {template}"
        needed = ROLE[(method, template)]
        assert_refused(call(cluster, method, path, None), 401, "unauthorized", f"{what} no token")
        assert_refused(
            call(cluster, method, path, "sdt_not-a-token"), 401, "unauthorized", f"{what} wrong"
        )
        for role in ("viewer", "operator"):
            r = call(cluster, method, path, tokens[role])
            if RANK[role] < RANK[needed]:
                body = assert_refused(r, 403, "forbidden", f"{what} as {role}")
                assert body["details"]["role_needed"] == needed, body
                assert needed in body["message"], body
            else:
                assert r.status_code not in (401, 403, 500), (what, role, r.status_code, r.text)
        # Another tenant: 403 where the role is short, 404 for our things,
        # and lists that show none of ours.
        r = call(cluster, method, path, tokens["tenant"])
        if RANK["operator"] < RANK[needed]:
            assert_refused(r, 403, "forbidden", f"{what} as tenant")
        elif any("{" + p + "}" in template for p in SCOPED_PARAMS):
            assert_refused(r, 404, "not_found", f"{what} as tenant")
        else:
            assert r.status_code not in (401, 403, 500), (what, r.status_code, r.text)
            assert "matrix1" not in r.text and full["backups"][0] not in r.text, (what, r.text)
        r = call(cluster, method, path, tokens["admin"])
        assert r.status_code not in (401, 403, 500), (what, "admin", r.status_code, r.text)


@pytest.mark.parametrize("token_kind", ["bootstrap", "api"])
def test_near_misses_of_a_token_are_401(cluster: Cluster, token_kind: str) -> None:
    """A prefix, a truncation or an extension of a valid token is no token."""
    token = cluster.admin_token if token_kind == "bootstrap" else make_token(cluster, "nm", "admin")
    assert cluster.http("GET", "/api/v1/vms", token=token).status_code == 200
    for bad in (token[:8], token[:-1], token + "x", token + token, " " + token[1:], token.upper()):
        if bad == token:
            continue
        r = cluster.http("GET", "/api/v1/vms", token=bad)
        assert_refused(r, 401, "unauthorized", repr(bad[:4]))
        assert token not in r.text
