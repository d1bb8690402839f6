"""Tokens, error bodies and the node's own API, on real processes."""

from __future__ import annotations

import stat

import httpx
import pytest

from fixtures.cluster import Cluster


def test_tokens_are_created_private(cluster: Cluster) -> None:
    for path in (cluster.hub_dir / "admin.token", cluster.node_dir / "node.token"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(path.read_text().strip()) >= 32


def test_hub_needs_a_token_except_health_and_docs(cluster: Cluster) -> None:
    assert cluster.http("GET", "/api/v1/health", token=None).status_code == 200
    assert cluster.http("GET", "/docs", token=None).status_code == 200
    assert cluster.http("GET", "/openapi.json", token=None).status_code == 200
    for token in (None, "wrong"):
        r = cluster.http("GET", "/api/v1/repositories", token=token)
        assert r.status_code == 401
        assert r.json()["error"] == "unauthorized"
    r = cluster.http("GET", "/api/v1/repositories")
    assert r.status_code == 200
    [repo] = r.json()["repositories"]
    assert repo["repository_id"] == "default"
    assert repo["available_bytes"] > 0


def test_node_registration_checks_url_and_token(cluster: Cluster) -> None:
    r = cluster.http(
        "POST",
        "/api/v1/nodes",
        json=cluster.node_body("n", token="not-the-token"),
    )
    assert r.status_code == 400
    assert "rejected the token" in r.json()["message"]
    assert "not-the-token" not in r.text
    r = cluster.http("POST", "/api/v1/nodes", json={"name": "n", "url": cluster.node_url})
    assert r.status_code == 400
    assert r.json()["message"] == "token is required"
    r = cluster.http(
        "POST",
        "/api/v1/nodes",
        json=cluster.node_body("n"),
    )
    assert r.status_code == 201
    body = r.json()
    assert body["node_id"] and "token" not in body
    nodes = cluster.http("GET", "/api/v1/nodes").json()["nodes"]
    assert nodes[0]["health"]["status"] == "online"
    assert cluster.node_token not in cluster.http("GET", "/api/v1/nodes").text
    r = cluster.http(
        "POST",
        "/api/v1/nodes",
        json=cluster.node_body("n"),
    )
    assert r.status_code == 409


def test_source_credentials_are_never_returned(cluster: Cluster, make_vm) -> None:
    vm = make_vm("s1", [1 << 20])
    reg = cluster.register(vm)
    r = cluster.http(
        "POST",
        "/api/v1/sources",
        json={
            "name": "with-secret",
            "node_id": reg["node"]["node_id"],
            "type": "qemu",
            "config": {"vms": [{"name": "x", "qmp_socket": "/nonexistent"}], "password": "hunter2"},
        },
    )
    assert r.status_code == 201
    assert "hunter2" not in r.text
    assert "hunter2" not in cluster.http("GET", "/api/v1/sources").text
    assert "hunter2" not in cluster.log("hub")
    r = cluster.http(
        "POST",
        "/api/v1/sources",
        json={"name": "v", "node_id": reg["node"]["node_id"], "type": "vmware", "config": {}},
    )
    assert r.status_code == 400
    assert r.json()["message"] == "config.host is required"  # the field named


def node_post(
    cluster: Cluster, path: str, body: object, token: str | None = None
) -> httpx.Response:
    return httpx.post(
        f"{cluster.node_url}{path}",
        json=body,
        timeout=10,
        verify=cluster.node_verify,
        headers={"Authorization": f"Bearer {token or cluster.node_token}"},
    )


GOOD = {
    "job_id": "j1",
    "vm_name": "vm",
    "source": {"type": "qemu", "config": {"vms": [{"name": "vm", "qmp_socket": "/x"}]}},
    "vm_path": "/x",
    "nbd_targets": "2000:nbd://127.0.0.1:1/e",
    "backup_type": "full",
}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"vm_name": None}, "vm_name is required"),
        ({"job_id": None}, "job_id is required"),
        ({"nbd_targets": "2000:http://x"}, "nbd_targets"),
        ({"backup_type": "differential"}, "backup_type"),
        ({"source": None}, "source is required"),
    ],
)
def test_node_start_validation_names_the_field(
    cluster: Cluster, change: dict, message: str
) -> None:
    body = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    r = node_post(cluster, "/api/v1/backup/start", body)
    assert r.status_code == 400, r.text
    assert message in r.json()["message"]
    assert r.json()["error"] == "invalid_request"


def test_node_needs_its_token(cluster: Cluster) -> None:
    r = node_post(cluster, "/api/v1/backup/start", GOOD, token="wrong")
    assert r.status_code == 401
    r = httpx.get(f"{cluster.node_url}/api/v1/status/j1", timeout=5, verify=cluster.node_verify)
    assert r.status_code == 401
    health = httpx.get(f"{cluster.node_url}/api/v1/health", timeout=5, verify=cluster.node_verify)
    assert health.status_code == 200


def test_node_job_with_unreachable_vm_fails_with_reason(cluster: Cluster) -> None:
    r = node_post(cluster, "/api/v1/backup/start", {**GOOD, "job_id": "j-unreach"})
    assert r.status_code == 200
    assert r.json()["status"] == "started" and r.json()["pid"] > 0
    import time

    deadline = time.monotonic() + 20
    while True:
        st = httpx.get(
            f"{cluster.node_url}/api/v1/status/j-unreach",
            timeout=5,
            verify=cluster.node_verify,
            headers={"Authorization": f"Bearer {cluster.node_token}"},
        ).json()
        if st["status"] != "running":
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert st["status"] == "failed"
    assert "cannot connect to QMP socket /x" in st["error"]["message"]
    log = (cluster.node_dir / "jobs" / "j-unreach" / "job.log").read_text()
    assert "j-unreach" in log


def test_ports_come_back_when_a_job_cannot_get_enough(tmp_path, make_vm) -> None:
    """One NBD port for a two-disk VM: the job fails cleanly and returns the port."""
    c = Cluster(tmp_path / "c")
    c.nbd_last = c.nbd_first  # a range of one port
    c.start_node()
    c.start_hub()
    try:
        vm = make_vm("two", [4 << 20, 4 << 20])
        c.register(vm)
        r = c.http(
            "POST",
            "/api/v1/backups",
            json={"vm_name": "two", "repository_id": "default", "backup_type": "full"},
        )
        assert r.status_code == 503
        body = r.json()
        assert body["error"] == "ports_exhausted"
        job = c.client.get(f"/api/v1/jobs/{body['details']['job_id']}")
        assert job["status"] == "failed" and job["error"]["code"] == "ports_exhausted"
        assert not list((c.hub_dir / "repositories" / "default").rglob("*.qcow2"))
        # The one port is free again: a one-disk backup uses it.
        c.backup("two", "full", disk_id=0)
    finally:
        c.stop()


def test_credentials_never_reach_logs_or_files(cluster: Cluster, make_vm) -> None:
    """A source's password travels hub -> node for every job; no log, status
    file or catalog row may hold it in clear."""
    secret = "s3cr3t-Pa55word-xyz"
    vm = make_vm("sec1", [4 << 20])
    node = cluster.client.post("/api/v1/nodes", cluster.node_body("n"))
    src = cluster.client.post(
        "/api/v1/sources",
        {
            "name": "with-password",
            "node_id": node["node_id"],
            "type": "qemu",
            "config": {"vms": [{"name": "sec1", "qmp_socket": vm.qmp_socket}], "password": secret},
        },
    )
    cluster.client.post("/api/v1/vms/discover", {"source_id": src["source_id"]})
    cluster.backup("sec1", "full")
    r = cluster.http("POST", "/api/v1/backups", json={"vm_name": "sec1", "repository_id": "nope"})
    assert r.status_code == 400
    leaks = []
    for path in cluster.root.rglob("*"):
        if path.is_file() and secret.encode() in path.read_bytes():
            leaks.append(str(path))
    assert not leaks, leaks
    assert secret not in cluster.http("GET", "/api/v1/sources").text


def test_discovery_of_an_unreachable_vm_says_so(cluster: Cluster, tmp_path) -> None:
    node = cluster.client.post("/api/v1/nodes", cluster.node_body("n"))
    sock = str(tmp_path / "gone.qmp")
    src = cluster.client.post(
        "/api/v1/sources",
        {
            "name": "gone",
            "node_id": node["node_id"],
            "type": "qemu",
            "config": {"vms": [{"name": "gone", "qmp_socket": sock}]},
        },
    )
    r = cluster.http("POST", "/api/v1/vms/discover", json={"source_id": src["source_id"]})
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "qmp_error"
    assert f"cannot connect to QMP socket {sock}" in r.json()["message"]
    r = cluster.http("POST", "/api/v1/vms/discover", json={"source_id": "nope"})
    assert r.status_code == 404
