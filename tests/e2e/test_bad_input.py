"""Bad input found by fuzzing the hub: every answer is the one error body with
the right status (400 / 401 / 405 / 413), never a 500, and the hub keeps
serving. Plus: long-polls hold no thread, so 60 waiters do not starve
``/api/v1/health``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.cluster import Cluster
from fixtures.lifecycle import MiB, cluster_env, error_body, lifecycle_cluster, write_random

HUGE = 10**30


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


def raw(
    c: Cluster, method: str, path: str, body: bytes | Any, *, token: str | None = "admin"
) -> httpx.Response:
    """``body`` sent as is (bytes, or an iterator: chunked), typed as JSON."""
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {c.admin_token if token == 'admin' else token}"
    return httpx.request(method, f"{c.hub_url}{path}", content=body, headers=headers, timeout=60)


def assert_hub_fine(c: Cluster) -> None:
    assert c.http("GET", "/api/v1/health", token=None).status_code == 200
    assert c.http("GET", "/api/v1/nodes").status_code == 200
    log = c.log("hub")
    for bad in ("Traceback", "RecursionError", "internal error"):
        assert bad not in log, log[-3000:]


# ----------------------------------------------------------- huge integers


@pytest.mark.parametrize(
    "path,field",
    [
        (f"/api/v1/backups?offset={HUGE}", "offset"),
        (f"/api/v1/backups?disk_id={HUGE}", "disk_id"),
        (f"/api/v1/backups?limit={HUGE}", "limit"),
        (f"/api/v1/jobs?offset={HUGE}", "offset"),
        (f"/api/v1/jobs?offset=-{HUGE}", "offset"),
        (f"/api/v1/backups/vm1/chain?disk_id={HUGE}", "disk_id"),
        (f"/api/v1/jobs/x?wait={HUGE}", "wait"),
    ],
)
def test_huge_integers_in_queries_are_400(cluster: Cluster, path: str, field: str) -> None:
    body = error_body(cluster.http("GET", path), 400, "invalid_request")
    assert field in body["details"]["fields"], body
    assert_hub_fine(cluster)


@pytest.mark.parametrize(
    "path,body,field",
    [
        (
            "/api/v1/backups",
            {"vm_name": "vm1", "repository_id": "default", "disk_id": HUGE},
            "disk_id",
        ),
        (
            "/api/v1/backups",
            {"vm_name": "vm1", "repository_id": "default", "disk_id": -1},
            "disk_id",
        ),
        ("/api/v1/backups/consolidate", {"vm_name": "vm1", "keep": HUGE}, "keep"),
        ("/api/v1/backups/consolidate", {"vm_name": "vm1", "keep": 1, "disk_id": HUGE}, "disk_id"),
    ],
)
def test_huge_integers_in_bodies_are_400(
    cluster: Cluster, path: str, body: dict[str, Any], field: str
) -> None:
    # Python's json writes 10**30 as a bare integer, as a fuzzer would send it.
    r = raw(cluster, "POST", path, json.dumps(body).encode())
    got = error_body(r, 400, "invalid_request")
    assert field in got["details"]["fields"], got
    assert_hub_fine(cluster)


# ------------------------------------------------------- before the body


@pytest.mark.parametrize("token", [None, "wrong", "Bearer"])
def test_malformed_json_without_a_valid_token_is_401(cluster: Cluster, token: str | None) -> None:
    for path in ("/api/v1/nodes", "/api/v1/backups", "/api/v1/sources", "/api/v1/nope"):
        r = raw(cluster, "POST", path, b'{"name": ', token=token)
        body = error_body(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        assert "JSON" not in body["message"]
    # With a valid token the same body is a 400 naming the body.
    body = error_body(raw(cluster, "POST", "/api/v1/nodes", b'{"name": '), 400, "invalid_request")
    assert body["details"]["fields"] == ["body"]
    assert cluster.http("GET", "/api/v1/health", token=None).status_code == 200


def recv_response(sock: socket.socket) -> str:
    """One HTTP answer off a raw socket: headers and Content-Length bytes
    (they may come in separate packets)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode()
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_big_bodies_are_413_even_without_a_length(cluster: Cluster) -> None:
    big = b'{"name": "' + b"a" * (2 * MiB) + b'"}'
    r = raw(cluster, "POST", "/api/v1/nodes", big)
    body = error_body(r, 413, "too_large")
    assert body["details"]["max_bytes"] == MiB

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(64):
            yield b"a" * 65536  # 4 MiB in all, no Content-Length: chunked
        yield b'"}'

    r = raw(cluster, "POST", "/api/v1/sources", chunks())
    assert r.request.headers.get("transfer-encoding") == "chunked"
    error_body(r, 413, "too_large")
    # A Content-Length over the limit is refused before a byte is read.
    with socket.create_connection(("127.0.0.1", cluster.hub_port), timeout=10) as sock:
        sock.sendall(
            (
                "POST /api/v1/nodes HTTP/1.1\r\nHost: hub\r\n"
                f"Authorization: Bearer {cluster.admin_token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {100 * MiB}\r\n\r\n{{"
            ).encode()
        )
        answer = recv_response(sock)
    assert answer.startswith("HTTP/1.1 413 "), answer
    assert '"too_large"' in answer
    # Under the limit: parsed and validated as usual.
    error_body(raw(cluster, "POST", "/api/v1/nodes", b'{"name": "n"}'), 400, "invalid_request")
    assert_hub_fine(cluster)


@cluster_env(hub={"SENDENSE_MAX_BODY_BYTES": "4096"})
def test_body_limit_is_a_setting(cluster: Cluster) -> None:
    config = {"vms": [{"name": f"vm{i}", "qmp_socket": f"/run/vm{i}.qmp"} for i in range(200)]}
    r = cluster.http(
        "POST",
        "/api/v1/sources",
        json={"name": "s", "node_id": "x", "type": "qemu", "config": config},
    )
    assert error_body(r, 413, "too_large")["details"]["max_bytes"] == 4096


# --------------------------------------------------------- what the body holds


@pytest.mark.parametrize(
    "body",
    [
        b'{"name": "\xff\xfe", "url": "http://x:1", "token": "t"}',  # not UTF-8
        b'{"name": "\xc3\x28"}',  # a broken two-byte sequence
        b"[" * 1000 + b"]" * 1000,  # 1000-deep arrays (RecursionError in the parser)
        b'{"a":' * 1000 + b"1" + b"}" * 1000,  # 1000-deep objects
        b'{"name": "n", "config": ' + b"[" * 100 + b"]" * 100 + b"}",  # deep inside a field
        # over 64 KiB (checked off the event loop): strings, then deep
        b'{"name": "' + b"[" * 100_000 + b'", "config": ' + b"[" * 100 + b"]" * 100 + b"}",
    ],
    ids=["latin1", "broken-utf8", "deep-arrays", "deep-objects", "deep-field", "big-deep"],
)
def test_undecodable_or_deep_json_is_400(cluster: Cluster, body: bytes) -> None:
    for path in ("/api/v1/nodes", "/api/v1/sources", "/api/v1/backups"):
        got = error_body(raw(cluster, "POST", path, body), 400, "invalid_request")
        assert got["details"]["fields"] == ["body"], got
    assert_hub_fine(cluster)


def test_brackets_inside_strings_do_not_count_as_depth(cluster: Cluster) -> None:
    name = "[{" * 200
    r = cluster.http(
        "POST",
        "/api/v1/nodes",
        json={"name": name[:200], "url": "http://127.0.0.1:1", "token": "t" * 40, "verify": False},
    )
    assert r.status_code == 201, r.text


def test_405_names_the_allowed_methods(cluster: Cluster) -> None:
    for path, allowed in [
        ("/api/v1/nodes", "GET, POST"),
        ("/api/v1/nodes/some-id", "GET, PATCH, DELETE"),
        ("/api/v1/jobs/some-id/cancel", "POST"),
        ("/api/v1/health", "GET"),
    ]:
        r = cluster.http("PUT", path)
        error_body(r, 405, "method_not_allowed")
        assert r.headers["allow"] == allowed, (path, r.headers.get("allow"))


# ------------------------------------------------------------- long-polls

WAITERS = 60


@cluster_env(node={"SENDENSE_NODE_MAX_RATE": str(2 * MiB), "SENDENSE_NODE_REQUEST_SIZE": str(MiB)})
def test_long_polls_do_not_starve_the_hub(cluster: Cluster, make_vm) -> None:
    """60 clients wait on a running job (?wait=20): health still answers at
    once (it took 18 s when each wait held one of the 40 worker threads)."""
    vm = make_vm("poll1", [64 * MiB])
    write_random(vm, 0, 0, 64 * MiB)  # ~30 s at 2 MiB/s
    cluster.register(vm)
    job_id = cluster.start_backup("poll1", "full")["job_id"]
    results: list[tuple[int, str, float]] = []
    lock = threading.Lock()

    def wait_on_job() -> None:
        t0 = time.monotonic()
        r = httpx.get(
            f"{cluster.hub_url}/api/v1/jobs/{job_id}",
            params={"wait": 20},
            headers={"Authorization": f"Bearer {cluster.admin_token}"},
            timeout=60,
        )
        with lock:
            results.append((r.status_code, r.json().get("status", ""), time.monotonic() - t0))

    with ThreadPoolExecutor(WAITERS) as pool:
        futures = [pool.submit(wait_on_job) for _ in range(WAITERS)]
        time.sleep(3)  # every waiter is in (and would hold a thread if waits did)
        assert not results, "waiters returned early: the job is not running"
        worst = 0.0
        for _ in range(5):
            t0 = time.monotonic()
            assert cluster.http("GET", "/api/v1/health", token=None).status_code == 200
            assert cluster.http("GET", "/api/v1/nodes").status_code == 200
            assert cluster.http("GET", f"/api/v1/jobs/{job_id}").json()["status"] == "running"
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.2)
        assert worst < 1.0, f"three requests took {worst:.1f}s with {WAITERS} long-polls waiting"
        # The job ends: every waiter is answered at once, not at its timeout.
        t_cancel = time.monotonic()
        cluster.client.post(f"/api/v1/jobs/{job_id}/cancel")
        for f in futures:
            f.result(timeout=30)
        answered = time.monotonic() - t_cancel
    assert len(results) == WAITERS
    assert {(code, status) for code, status, _ in results} == {(200, "cancelled")}, results
    assert answered < 15, f"waiters answered {answered:.1f}s after the cancel"


@pytest.mark.parametrize("path", ["/api/v1/backups", "/api/v1/audit"])
@pytest.mark.parametrize("value", ["485", "-2.2250738585072014e-308", "1e9"])
def test_times_in_queries_are_iso_8601_not_numbers(cluster: Cluster, path: str, value: str) -> None:
    """Found by schemathesis: a bare number was read as Unix time (200)."""
    for field in ("since", "until"):
        body = error_body(cluster.http("GET", path, params={field: value}), 400, "invalid_request")
        assert field in body["message"] and "ISO 8601" in body["message"], body
    ok = cluster.http("GET", path, params={"since": "2026-01-01T00:00:00Z"})
    assert ok.status_code == 200, ok.text
