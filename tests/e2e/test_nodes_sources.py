"""Nodes and sources: validation, edits, removal, credentials, cached health.

Real hub and node processes; where a node must misbehave (hang, echo what it
was sent) a small HTTP server in the test plays the node.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.cluster import Cluster, cli
from fixtures.lifecycle import (
    SLOW_NODE,
    MiB,
    catalog_exec,
    cluster_env,
    error_body,
    lifecycle_cluster,
    wait_for,
    write_random,
)
from sendense.cli.services import free_port
from sendense.qemu import img
from sendense.secretbox import SecretBox


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


def nodes(c: Cluster) -> dict[str, dict[str, Any]]:
    r = c.http("GET", "/api/v1/nodes")
    assert r.status_code == 200, r.text
    return {n["name"]: n for n in r.json()["nodes"]}


def add_node(c: Cluster, name: str, url: str, token: str, **extra: Any) -> httpx.Response:
    if url == c.node_url and c.node_fingerprint:  # the test node serves HTTPS: pin it
        extra.setdefault("fingerprint", c.node_fingerprint)
    return c.http("POST", "/api/v1/nodes", json={"name": name, "url": url, "token": token, **extra})


def add_source(c: Cluster, node_id: str, name: str, config: dict[str, Any]) -> httpx.Response:
    return c.http(
        "POST",
        "/api/v1/sources",
        json={"name": name, "node_id": node_id, "type": "qemu", "config": config},
    )


class FakeNode:
    """Plays a node: records what it is sent, answers ``status`` with ``body``
    (``{}`` placeholders filled with what the request carried)."""

    def __init__(self, status: int, answer: Any) -> None:
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                fake.requests.append(
                    {
                        "path": self.path,
                        "authorization": self.headers.get("authorization"),
                        "json": json.loads(body) if body else None,
                    }
                )
                text = answer(fake.requests[-1]) if callable(answer) else answer
                data = json.dumps(text).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------ registration

BAD_URLS = [
    "http://[::1",  # did not parse: GET /nodes answered 500 ever after
    "http://",
    "ftp://127.0.0.1:1",
    "127.0.0.1:8081",
    "http://127.0.0.1:99999",
    "http://127.0.0.1:0",
    "http://user:pw@127.0.0.1:1",
    "http://127.0.0.1:1/ x",
    "http://127.0.0.1:1/\nx",
]
BAD_TOKENS = ["abc\ndef-secret", "abc def-secret", "t\x00k-secret", "tök-secret", "\t"]


def test_bad_url_or_token_is_400_naming_the_field_and_nodes_stay_listable(
    cluster: Cluster,
) -> None:
    for url in BAD_URLS:
        r = add_node(cluster, "bad", url, cluster.node_token, verify=False)
        body = error_body(r, 400, "invalid_request")
        assert body["details"]["fields"] == ["url"], (url, body)
        assert cluster.node_token not in r.text
        assert nodes(cluster) == {}
    for token in BAD_TOKENS:
        r = add_node(cluster, "bad", cluster.node_url, token, verify=False)
        body = error_body(r, 400, "invalid_request")
        assert body["details"]["fields"] == ["token"], (token, body)
        assert "secret" not in r.text, "the message repeats the token"
        assert nodes(cluster) == {}
    # Accepted without a check: a URL that parses but where nobody listens.
    r = add_node(cluster, "nobody", f"http://127.0.0.1:{free_port()}", "x" * 40, verify=False)
    assert r.status_code == 201, r.text
    assert r.json()["health"]["status"] in ("unknown", "unreachable")

    def probed() -> dict[str, Any] | None:
        # One answer per poll: each API worker process keeps its own health
        # cache, so two calls may be answered by two processes.
        node: dict[str, Any] = nodes(cluster)["nobody"]
        return node if node["health"]["status"] == "unreachable" else None

    found = wait_for("the unreachable node to be probed", probed)
    assert "x" * 40 not in json.dumps(found)
    assert found["health"]["checked_at"] and found["health"]["age_seconds"] >= 0


def test_registration_failures_never_show_the_token(cluster: Cluster) -> None:
    # A node that says back what it got, Authorization header included.
    fake = FakeNode(400, lambda req: {"error": "bad", "message": f"got {req['authorization']}"})
    try:
        token = "tok-" + "s" * 36
        r = add_node(cluster, "echo", fake.url, token)
        body = error_body(r, 400)
        assert fake.requests, "the hub did not talk to the node"
        assert token not in r.text and "***" in body["message"], body
    finally:
        fake.close()
    # Nobody listening: the transport's error, no token either.
    r = add_node(cluster, "closed", f"http://127.0.0.1:{free_port()}", token)
    body = error_body(r, 400, "node_unreachable")
    assert token not in r.text
    assert token not in cluster.log("hub")
    assert nodes(cluster) == {}


def test_get_nodes_answers_at_once_while_a_node_hangs(cluster: Cluster) -> None:
    """A node that accepts connections and never answers: GET /nodes reads the
    cached health and stays fast; the hanging node shows unreachable."""
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(64)  # the kernel completes handshakes; nobody ever answers
    try:
        r = add_node(cluster, "good", cluster.node_url, cluster.node_token)
        assert r.status_code == 201, r.text
        r = add_node(
            cluster, "hangs", f"http://127.0.0.1:{hang.getsockname()[1]}", "t" * 40, verify=False
        )
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 8
        seen = set()
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            listed = nodes(cluster)
            took = time.monotonic() - t0
            assert took < 1.0, f"GET /nodes took {took:.1f}s"
            assert listed["good"]["health"]["status"] == "online"
            seen.add(listed["hangs"]["health"]["status"])
            time.sleep(0.2)
        assert seen <= {"unknown", "unreachable"}, seen
        h = nodes(cluster)["hangs"]["health"]
        assert h["status"] == "unreachable" and h["error"], h
        assert h["age_seconds"] is not None and h["age_seconds"] < 15
    finally:
        hang.close()


@cluster_env(hub={"SENDENSE_NODE_HEALTH_INTERVAL": "1"})
def test_a_stored_token_httpx_refuses_never_shows(cluster: Cluster, make_vm) -> None:
    """A node token with a newline, stored before registration checked it:
    the transport refuses the header and quotes it; neither GET /nodes nor a
    discovery's 503 may show it (it came back in the message once)."""
    vm = make_vm("nl1", [4 * MiB])
    reg = cluster.register(vm)
    bad = "abc\ndef-" + "s" * 30
    box = SecretBox(cluster.hub_dir / "secret.key")
    catalog_exec(
        cluster,
        "UPDATE nodes SET token_encrypted = :t WHERE id = :i",
        t=box.encrypt(bad),
        i=reg["node"]["node_id"],
    )
    r = cluster.http("POST", "/api/v1/vms/discover", json={"source_id": reg["source"]["source_id"]})
    body = error_body(r, 503, "node_unreachable")
    assert "sss" not in r.text and "***" in body["message"], body
    r = cluster.http("POST", "/api/v1/backups", json={"vm_name": "nl1", "repository_id": "default"})
    assert "sss" not in r.text
    if r.status_code == 202:
        job = cluster.wait_job(r.json()["job_id"])
        assert job["status"] == "failed" and "sss" not in json.dumps(job)
    health = wait_for(
        "the probe with the bad token",
        lambda: (
            nodes(cluster)["node1"]["health"]["status"] == "unreachable"
            and nodes(cluster)["node1"]["health"]
        ),
    )
    assert "sss" not in json.dumps(health)
    assert "s" * 30 not in cluster.log("hub")


# ------------------------------------------------------------------- edits


def test_patch_fixes_url_and_token_and_jobs_use_them(cluster: Cluster, make_vm) -> None:
    vm = make_vm("moved1", [8 * MiB])
    write_random(vm, 0, 0, MiB)
    reg = cluster.register(vm)
    node_id = reg["node"]["node_id"]
    cluster.backup("moved1", "full")

    # The node moves to another port with a new token.
    cluster.kill("node")
    (cluster.node_dir / "node.token").unlink()
    cluster.node_port = free_port()
    cluster.start_node()
    r = cluster.http(
        "POST", "/api/v1/backups", json={"vm_name": "moved1", "repository_id": "default"}
    )
    if r.status_code == 202:  # refused by the node later, as the job's error
        assert cluster.wait_job(r.json()["job_id"])["status"] == "failed"
    else:
        assert r.status_code in (400, 503), r.text

    path = f"/api/v1/nodes/{node_id}"
    # Checked against the node: the old token at the new URL is refused.
    old_token = cluster.http("GET", "/api/v1/nodes").json()["nodes"][0]
    r = cluster.http("PATCH", path, json={"url": cluster.node_url})
    error_body(r, 400, "node_auth")
    assert nodes(cluster)["node1"]["url"] != cluster.node_url, old_token
    r = cluster.http("PATCH", path, json={"token": "new\ntoken-secret"})
    body = error_body(r, 400, "invalid_request")
    assert body["details"]["fields"] == ["token"] and "secret" not in r.text
    r = cluster.http("PATCH", path, json={"url": "http://[::1"})
    assert error_body(r, 400)["details"]["fields"] == ["url"]
    error_body(cluster.http("PATCH", "/api/v1/nodes/nope", json={"verify": False}), 404)

    r = cluster.http("PATCH", path, json={"url": cluster.node_url, "token": cluster.node_token})
    assert r.status_code == 200, r.text
    assert r.json()["url"] == cluster.node_url and r.json()["health"]["status"] == "online"
    assert cluster.node_token not in r.text
    # The engine's cached client follows: the next backup goes to the new node.
    write_random(vm, 0, 2 * MiB, MiB)
    job = cluster.backup("moved1", "auto")
    b = cluster.client.get(f"/api/v1/backups/{job['backups'][0]}")
    assert img.compare(b["file_path"], str(vm.disks[0]))


# ----------------------------------------------------------------- removal


@cluster_env(node=SLOW_NODE)
def test_delete_refuses_while_in_use_then_removes(cluster: Cluster, make_vm) -> None:
    kept = make_vm("keep1", [8 * MiB])
    write_random(kept, 0, 0, 8 * MiB)
    broken = make_vm("broken1", [4 * MiB])
    reg = cluster.register(kept, broken)
    node_id, source_id = reg["node"]["node_id"], reg["source"]["source_id"]
    broken.stop()  # a backup of it fails: a record with no file, no restore point
    failed = cluster.wait_job(cluster.start_backup("broken1", "full")["job_id"])
    assert failed["status"] == "failed", failed

    # A job runs on keep1: in_use, naming it; nothing removed.
    started = cluster.start_backup("keep1", "full")
    r = cluster.http("DELETE", f"/api/v1/sources/{source_id}")
    body = error_body(r, 409, "in_use")
    assert body["details"]["jobs"] == [started["job_id"]], body
    r = cluster.http("DELETE", f"/api/v1/nodes/{node_id}?cascade=true")
    assert error_body(r, 409, "in_use")["details"]["jobs"] == [started["job_id"]]
    assert cluster.wait_job(started["job_id"], timeout=60)["status"] == "completed"

    # Restore points: has_backups, naming the VM and how many.
    r = cluster.http("DELETE", f"/api/v1/sources/{source_id}")
    body = error_body(r, 409, "has_backups")
    assert body["details"]["vms"] == [{"vm_name": "keep1", "backups": 1}], body
    assert "keep1" in body["message"]
    # The node: its sources first (or cascade, which meets the same refusal).
    r = cluster.http("DELETE", f"/api/v1/nodes/{node_id}")
    body = error_body(r, 409, "has_sources")
    assert body["details"]["sources"] == [{"source_id": source_id, "name": "qemu1"}]
    error_body(cluster.http("DELETE", f"/api/v1/nodes/{node_id}?cascade=true"), 409, "has_backups")
    assert len(cluster.client.get("/api/v1/vms")["vms"]) == 2
    assert len(cluster.client.get("/api/v1/sources")["sources"]) == 1

    # Without restore points the source goes, its VMs and the failed record with it.
    [point] = started_backups(cluster, started["job_id"])
    r = cluster.http("DELETE", f"/api/v1/backups/{point}")
    assert r.status_code == 200, r.text
    r = cluster.http("DELETE", f"/api/v1/sources/{source_id}")
    assert r.status_code == 200, r.text
    gone = r.json()
    assert sorted(gone["vms"]) == ["broken1", "keep1"] and gone["backup_records"] == 1, gone
    assert cluster.client.get("/api/v1/vms")["vms"] == []
    assert cluster.client.get("/api/v1/sources")["sources"] == []
    # Job history stays, without its VM.
    jobs = {j["job_id"]: j for j in cluster.client.get("/api/v1/jobs")["jobs"]}
    assert jobs[failed["job_id"]]["status"] == "failed"
    assert jobs[started["job_id"]]["vm_name"] is None
    error_body(cluster.http("DELETE", f"/api/v1/sources/{source_id}"), 404)

    r = cluster.http("DELETE", f"/api/v1/nodes/{node_id}")
    assert r.status_code == 200, r.text
    assert r.json()["sources"] == [] and nodes(cluster) == {}
    error_body(cluster.http("DELETE", f"/api/v1/nodes/{node_id}"), 404)
    # The same node can be registered again.
    assert add_node(cluster, "node1", cluster.node_url, cluster.node_token).status_code == 201


def started_backups(c: Cluster, job_id: str) -> list[str]:
    return list(c.client.get(f"/api/v1/jobs/{job_id}")["backups"])


def test_delete_node_cascade_removes_its_sources(cluster: Cluster, make_vm) -> None:
    vm = make_vm("casc1", [4 * MiB])
    reg = cluster.register(vm)
    node_id = reg["node"]["node_id"]
    r = cluster.http("DELETE", f"/api/v1/nodes/{node_id}?cascade=true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sources"] == [reg["source"]["source_id"]] and body["vms"] == ["casc1"]
    assert cluster.client.get("/api/v1/sources")["sources"] == []
    assert cluster.client.get("/api/v1/vms")["vms"] == []


# ------------------------------------------------------------- credentials

NESTED_SECRET = "nested-Pa55-" + "q" * 12
TOP_SECRET = "top-api-key-" + "z" * 12
DEEP_SECRET = "deep-token-" + "w" * 12


def secret_config(vm_name: str, sock: str) -> dict[str, Any]:
    return {
        "vms": [{"name": vm_name, "qmp_socket": sock, "password": NESTED_SECRET}],
        "api_key": TOP_SECRET,
        "auth": {"method": "token", "options": [{"Admin-Token": DEEP_SECRET, "port": 443}]},
        "site": "lab",
    }


def test_nested_credentials_are_encrypted_and_never_returned(cluster: Cluster, make_vm) -> None:
    vm = make_vm("cred1", [4 * MiB])
    node = add_node(cluster, "node1", cluster.node_url, cluster.node_token).json()
    r = add_source(cluster, node["node_id"], "creds", secret_config("cred1", vm.qmp_socket))
    assert r.status_code == 201, r.text
    listed = cluster.http("GET", "/api/v1/sources")
    for text in (r.text, listed.text):
        for secret in (NESTED_SECRET, TOP_SECRET, DEEP_SECRET):
            assert secret not in text
    [src] = listed.json()["sources"]
    assert src["has_credentials"] is True
    # The structure stays, the credentials' keys go.
    assert src["config"] == {
        "vms": [{"name": "cred1", "qmp_socket": vm.qmp_socket}],
        "auth": {"method": "token", "options": [{"port": 443}]},
        "site": "lab",
    }
    # The node still gets the config whole: discovery works and a backup runs.
    found = cluster.client.post("/api/v1/vms/discover", {"source_id": src["source_id"]})
    assert [v["name"] for v in found["vms"]] == ["cred1"]
    cluster.backup("cred1", "full")
    # At rest: nowhere under the hub's or node's folders in clear (catalog included).
    leaks = [
        str(p)
        for p in cluster.root.rglob("*")
        if p.is_file()
        and any(s.encode() in p.read_bytes() for s in (NESTED_SECRET, TOP_SECRET, DEEP_SECRET))
    ]
    assert not leaks, leaks


def test_node_errors_passed_through_never_show_source_credentials(cluster: Cluster) -> None:
    """A node whose error quotes the request it got: the hub passes the message
    on with the credentials starred out; the node did get them, whole."""
    fake = FakeNode(503, lambda req: {"error": "qmp_error", "message": f"refused {req['json']}"})
    try:
        r = add_node(cluster, "echo", fake.url, "t" * 40, verify=False)
        assert r.status_code == 201, r.text
        config = secret_config("echo1", "/nonexistent.qmp")
        src = add_source(cluster, r.json()["node_id"], "echo-src", config).json()
        r = cluster.http("POST", "/api/v1/vms/discover", json={"source_id": src["source_id"]})
        body = error_body(r, 503, "qmp_error")
        for secret in (NESTED_SECRET, TOP_SECRET, DEEP_SECRET, "t" * 40):
            assert secret not in r.text
        assert "***" in body["message"]
        [sent] = [q for q in fake.requests if q["path"] == "/api/v1/discover"]
        assert sent["json"]["source"] == {"type": "qemu", "config": config}
    finally:
        fake.close()
    assert not any(s in cluster.log("hub") for s in (NESTED_SECRET, TOP_SECRET, DEEP_SECRET))


def test_sources_stored_with_clear_nested_credentials_are_sealed_at_start(
    cluster: Cluster, make_vm
) -> None:
    """A source registered before nested credentials were recognised keeps
    them in clear in its config: the next hub start moves them out."""
    vm = make_vm("old1", [4 * MiB])
    reg = cluster.register(vm)
    sid = reg["source"]["source_id"]
    clear = json.dumps(secret_config("old1", vm.qmp_socket))
    catalog_exec(cluster, "UPDATE sources SET config = :conf WHERE id = :i", conf=clear, i=sid)
    assert NESTED_SECRET in cluster.http("GET", "/api/v1/sources").text  # as it was
    cluster.kill("hub")
    cluster.start_hub()
    listed = cluster.http("GET", "/api/v1/sources")
    assert NESTED_SECRET not in listed.text and TOP_SECRET not in listed.text
    assert listed.json()["sources"][0]["has_credentials"] is True
    [(stored,)] = catalog_exec(cluster, "SELECT config FROM sources WHERE id = :i", i=sid)
    assert NESTED_SECRET not in str(stored)
    write_random(vm, 0, 0, MiB)
    cluster.backup("old1", "full")  # the node still gets everything it needs
    assert os.path.exists(cluster.hub_dir / "catalog.db")


# --------------------------------------------------------------------- CLI


def test_cli_node_edit_and_rm_source_rm(cluster: Cluster, make_vm) -> None:
    vm = make_vm("clin1", [4 * MiB])
    cluster.register(vm)
    token_file = cluster.node_dir / "node.token"
    # edit: by name, checked against the node; JSON for scripts.
    out = cli(cluster, "--json", "node", "edit", "node1", "--url", cluster.node_url + "/")
    assert json.loads(out.stdout)["url"] == cluster.node_url
    out = cli(cluster, "node", "edit", "node1", "--token-file", str(token_file))
    assert "node node1 updated" in out.stdout and "online" in out.stdout
    out = cli(cluster, "--json", "node", "edit", "node1", "--token", "wrong-token", ok=False)
    assert json.loads(out.stdout)["error"] == "node_auth"
    assert "wrong-token" not in out.stdout + out.stderr
    # rm: refusals say why, exit 1.
    out = cli(cluster, "node", "rm", "node1", ok=False)
    assert "has_sources" in out.stderr and "qemu1" in out.stderr
    out = cli(cluster, "--json", "source", "rm", "qemu1")
    assert json.loads(out.stdout)["vms"] == ["clin1"]
    out = cli(cluster, "node", "rm", "node1")
    assert "node node1 removed" in out.stdout
    assert cluster.client.get("/api/v1/nodes")["nodes"] == []
    out = cli(cluster, "--json", "source", "rm", "qemu1", ok=False)
    assert json.loads(out.stdout)["status"] == 404
