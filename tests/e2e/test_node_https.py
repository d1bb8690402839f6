"""Hub <-> node over HTTPS with the node's certificate pinned (issue 10).

Real processes: the node makes its certificate on first start, the hub pins
its SHA-256 at registration and trusts nothing else afterwards; plain HTTP
to a node is refused beyond loopback; the hub itself can serve HTTPS to the
CLI.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.cluster import Cluster, cli
from fixtures.lifecycle import error_body, wait_for
from sendense.qemu import img
from sendense.qemu.qsd import QsdVm
from sendense.tls import colon_form, fingerprint

MiB = 1 << 20
MISMATCH = "certificate does not match the pinned fingerprint"


def catalog_node(c: Cluster) -> tuple[str | None, str | None]:
    with sqlite3.connect(c.hub_dir / "catalog.db") as db:
        row = db.execute("SELECT fingerprint, certificate FROM nodes").fetchone()
    return row[0], row[1]


def nodes(c: Cluster) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in c.client.get("/api/v1/nodes")["nodes"]}


def add_source(c: Cluster, node_id: str, vm: QsdVm) -> None:
    src = c.client.post(
        "/api/v1/sources",
        {
            "name": "qemu1",
            "node_id": node_id,
            "type": "qemu",
            "config": {"vms": [{"name": vm.name, "qmp_socket": vm.qmp_socket}]},
        },
    )
    c.client.post("/api/v1/vms/discover", {"source_id": src["source_id"]})


def non_loopback_ipv4() -> str | None:
    """An address of this machine that is not loopback (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))
            addr = str(s.getsockname()[0])
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


@pytest.fixture
def fast_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster whose hub probes node health every half second."""
    c = Cluster(tmp_path, hub_env={"SENDENSE_NODE_HEALTH_INTERVAL": "0.5"})
    c.start_node()
    c.start_hub()
    yield c
    c.stop()


def test_registration_pins_the_fingerprint_and_backups_run_over_https(
    cluster: Cluster, make_vm: Callable[..., QsdVm]
) -> None:
    key = cluster.node_dir / "tls" / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert cluster.node_url.startswith("https://")
    fp = cluster.node_fingerprint
    assert fp is not None and fp in cluster.log("node")  # printed at start
    body = {"name": "node1", "url": cluster.node_url, "token": cluster.node_token}

    # No fingerprint: trust on first use, made explicit.
    r = cluster.http("POST", "/api/v1/nodes", json=body)
    answer = error_body(r, 400, "fingerprint_required")
    assert answer["details"]["fingerprint"] == fp and fp in answer["message"]
    # A wrong one: refused, both named.
    wrong = "ab" * 32
    r = cluster.http("POST", "/api/v1/nodes", json={**body, "fingerprint": wrong})
    answer = error_body(r, 400, "fingerprint_mismatch")
    assert wrong in answer["message"] and fp in answer["message"]
    assert answer["details"]["expected"] == wrong and answer["details"]["presented"] == fp
    assert cluster.node_token not in r.text
    r = cluster.http("POST", "/api/v1/nodes", json={**body, "fingerprint": "not-hex"})
    assert error_body(r, 400, "invalid_request")["details"]["fields"] == ["fingerprint"]
    assert nodes(cluster) == {}

    # The colon form, upper case, as openssl prints it.
    r = cluster.http("POST", "/api/v1/nodes", json={**body, "fingerprint": colon_form(fp)})
    assert r.status_code == 201, r.text
    node = r.json()
    assert node["tls"] is True and node["fingerprint"] == fp
    stored_fp, pem = catalog_node(cluster)
    assert stored_fp == fp and pem is not None and fingerprint(pem) == fp
    assert pem == cluster.node_cert_file.read_text()

    vm = make_vm("tls1", [8 * MiB])
    guest = vm.guest(0)
    guest.pwrite(b"\x5a" * (2 * MiB), MiB)
    guest.flush()
    add_source(cluster, node["node_id"], vm)
    job = cluster.backup("tls1", "full")
    b = cluster.client.get(f"/api/v1/backups/{job['backups'][0]}")
    assert img.compare(b["file_path"], str(vm.disks[0]))
    assert nodes(cluster)["node1"]["health"]["status"] == "online"
    # The node speaks TLS only: a plain HTTP request gets no answer.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{cluster.node_port}/api/v1/health", timeout=5)


def test_a_node_with_a_new_certificate_is_refused_until_re_pinned(
    fast_cluster: Cluster, make_vm: Callable[..., QsdVm]
) -> None:
    c = fast_cluster
    vm = make_vm("rot1", [8 * MiB])
    reg = c.register(vm)
    node_id = reg["node"]["node_id"]
    old_fp = c.node_fingerprint
    c.backup("rot1", "full")

    # The node comes back with a new certificate (same port, same token).
    c.kill("node")
    shutil.rmtree(c.node_dir / "tls")
    c.start_node()
    new_fp = c.node_fingerprint
    assert new_fp != old_fp

    def refused() -> dict[str, Any] | None:
        # (A probe may first find the node down while it restarts.)
        n = nodes(c)["node1"]
        error = n["health"]["error"] or ""
        return n if n["health"]["status"] == "unreachable" and MISMATCH in error else None

    n = wait_for("health to show the certificate mismatch", refused)
    assert MISMATCH in n["health"]["error"] and "node1" in n["health"]["error"], n
    assert n["fingerprint"] == old_fp

    r = c.http("POST", "/api/v1/backups", json={"vm_name": "rot1", "repository_id": "default"})
    if r.status_code == 202:
        job = c.wait_job(r.json()["job_id"])
        assert job["status"] == "failed", job
        error = job["error"]
    else:
        error = {"code": r.json()["error"], "message": r.json()["message"]}
        assert r.status_code == 503, r.text
    assert error["code"] == "node_certificate_mismatch", error
    assert MISMATCH in error["message"] and "node1" in error["message"], error
    assert old_fp in error["message"] and new_fp in error["message"], error
    assert c.node_token not in json.dumps(error)

    # Re-pin: the old fingerprint is not what the node presents; the new one is.
    path = f"/api/v1/nodes/{node_id}"
    r = c.http("PATCH", path, json={"fingerprint": old_fp})
    error_body(r, 400, "fingerprint_mismatch")
    viewer = c.client.post("/api/v1/tokens", {"name": "v", "role": "viewer"})["token"]
    r = c.http("PATCH", path, json={"fingerprint": new_fp}, token=viewer)
    error_body(r, 403, "forbidden")
    out = cli(c, "--json", "node", "edit", "node1", "--fingerprint", colon_form(new_fp))
    edited = json.loads(out.stdout)
    assert edited["fingerprint"] == new_fp and edited["health"]["status"] == "online"
    assert catalog_node(c)[0] == new_fp
    job = c.backup("rot1", "auto")
    b = c.client.get(f"/api/v1/backups/{job['backups'][0]}")
    assert img.compare(b["file_path"], str(vm.disks[0]))


def test_plain_http_to_a_node_beyond_loopback_is_refused_before_any_connection(
    cluster: Cluster,
) -> None:
    token = cluster.node_token
    # A documentation address: nothing answers there, a connection attempt
    # would hang until its timeout; the refusal comes from the URL alone.
    started = time.monotonic()
    r = cluster.http(
        "POST",
        "/api/v1/nodes",
        json={"name": "far", "url": "http://192.0.2.10:8081", "token": token},
    )
    answer = error_body(r, 400, "plain_http_refused")
    assert time.monotonic() - started < 2.0
    assert "192.0.2.10" in answer["message"] and "https://" in answer["message"]
    assert token not in r.text
    # Loopback plain HTTP stays possible (the demo, a hub and node on one host).
    r = cluster.http(
        "POST",
        "/api/v1/nodes",
        json={"name": "local", "url": "http://127.0.0.1:9", "token": token, "verify": False},
    )
    assert r.status_code == 201, r.text
    assert r.json()["tls"] is False and r.json()["fingerprint"] is None
    # An edit to a far plain URL is refused the same way.
    r = cluster.http(
        "PATCH", f"/api/v1/nodes/{r.json()['node_id']}", json={"url": "http://192.0.2.10:8081"}
    )
    error_body(r, 400, "plain_http_refused")
    # A fingerprint means nothing for plain HTTP.
    r = cluster.http(
        "POST",
        "/api/v1/nodes",
        json={"name": "x", "url": "http://127.0.0.1:9", "token": token, "fingerprint": "ab" * 32},
    )
    error_body(r, 400, "invalid_request")


def test_plain_http_beyond_loopback_is_allowed_by_the_hub_setting(tmp_path: Path) -> None:
    addr = non_loopback_ipv4()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    c = Cluster(tmp_path, node_tls=False, node_host=addr)
    try:
        c.start_node()
        c.start_hub()
        url = f"http://{addr}:{c.node_port}"
        body = {"name": "n", "url": url, "token": c.node_token}
        error_body(c.http("POST", "/api/v1/nodes", json=body), 400, "plain_http_refused")
        c.kill("hub", signal.SIGTERM)
        c.hub_env["SENDENSE_ALLOW_PLAIN_HTTP_NODES"] = "true"
        c.start_hub()
        r = c.http("POST", "/api/v1/nodes", json=body)
        assert r.status_code == 201, r.text
        assert r.json()["tls"] is False and r.json()["health"]["status"] == "online"
    finally:
        c.stop()


def test_the_cli_registers_a_node_by_fingerprint_or_trust_on_first_use_with_an_https_hub(
    tmp_path: Path,
) -> None:
    c = Cluster(tmp_path, hub_tls=True)
    try:
        c.start_node()
        c.start_hub()
        assert c.hub_url.startswith("https://")
        token_file = str(c.node_dir / "node.token")
        # The node's fingerprint from its own CLI, as an administrator reads it.
        out = cli(c, "node", "fingerprint", "--data-dir", str(c.node_dir))
        fp = out.stdout.strip()
        assert fp == c.node_fingerprint
        out = cli(c, "node", "fingerprint", "--data-dir", str(c.node_dir), "--colons")
        assert out.stdout.strip() == colon_form(fp)

        # Not a terminal, no fingerprint: refused, the presented one shown.
        out = cli(c, "node", "add", "n1", c.node_url, "--token-file", token_file, ok=False)
        assert "fingerprint_required" in out.stderr and fp in out.stderr
        out = cli(c, "node", "add", "n1", c.node_url, "--token-file", token_file,
                  "--fingerprint", "cd" * 32, ok=False)  # fmt: skip
        assert "fingerprint_mismatch" in out.stderr
        out = cli(
            c, "--json", "node", "add", "n1", c.node_url, "--token-file", token_file,
            "--fingerprint", fp,
        )  # fmt: skip
        assert json.loads(out.stdout)["fingerprint"] == fp
        out = cli(c, "node", "add", "n2", c.node_url, "--token-file", token_file, "--yes")
        assert "registered" in out.stdout and fp in out.stdout
        listed = json.loads(cli(c, "--json", "node", "ls").stdout)["nodes"]
        assert [(n["tls"], n["fingerprint"]) for n in listed] == [(True, fp), (True, fp)]

        # Without the CA file the CLI does not trust the hub's self-signed certificate.
        env_less = cli_without_ca(c, "node", "ls")
        assert env_less.returncode != 0
        assert "certificate" in (env_less.stderr + env_less.stdout).lower()
    finally:
        c.stop()


def cli_without_ca(c: Cluster, *args: str) -> Any:
    import os
    import subprocess
    import sys

    env = {**os.environ, "SENDENSE_URL": c.hub_url, "SENDENSE_TOKEN": c.admin_token}
    env.pop("SENDENSE_CA_FILE", None)
    return subprocess.run(
        [sys.executable, "-m", "sendense.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
