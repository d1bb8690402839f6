"""Starting backups does not hold the API's threads (issue 12), end to end.

``POST /api/v1/backups`` brings the job's targets up and calls its node
before it answers. Here the node answers its start call late (a proxy in
front of a real node holds ``POST /api/v1/backup/start`` for a few seconds,
as a loaded node does), and the hub serves its API from one process with one
API thread (``SENDENSE_API_THREADS=1``): reads must still answer at once
while several backups start, every backup must still complete and restore
exactly, and a backup cancelled while it starts must leave nothing behind.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from fixtures.cluster import Cluster
from fixtures.lifecycle import raw_copy, repo_files, wait_for, write_random
from fixtures.processes import busy_ports, processes_under
from sendense.qemu import img

MiB = 1 << 20
START_DELAY = 3.0


class SlowStartNode:
    """A plain-HTTP proxy in front of a node that holds every backup start
    request ``delay`` seconds before passing it on (everything else passes at
    once)."""

    def __init__(self, node_url: str, delay: float) -> None:
        target = urlsplit(node_url)
        self.starts = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else None
                if self.command == "POST" and self.path == "/api/v1/backup/start":
                    proxy.starts += 1
                    time.sleep(delay)
                conn = http.client.HTTPConnection(target.hostname or "", target.port, timeout=60)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
                }
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_DELETE = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def one_thread_hub(tmp_path: Path) -> Iterator[tuple[Cluster, SlowStartNode]]:
    """A hub serving its API from one process with one thread, and a node
    (plain HTTP on loopback) behind a proxy that starts backups late."""
    c = Cluster(
        tmp_path,
        node_tls=False,
        hub_env={"SENDENSE_API_WORKERS": "1", "SENDENSE_API_THREADS": "1"},
    )
    c.start_node()
    c.start_hub()
    proxy = SlowStartNode(c.node_url, START_DELAY)
    try:
        yield c, proxy
    finally:
        proxy.close()
        c.stop()
    assert not busy_ports(c.nbd_first, c.nbd_last), "NBD ports still in use"
    deadline = time.monotonic() + 15
    while processes_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)


def post_backup(c: Cluster, vm: str) -> httpx.Response:
    return c.http(
        "POST",
        "/api/v1/backups",
        json={"vm_name": vm, "repository_id": "default", "backup_type": "full"},
    )


def test_reads_answer_while_backups_start(one_thread_hub, make_vm, tmp_path: Path) -> None:
    c, proxy = one_thread_hub
    vms = [make_vm(f"start{i}", [8 * MiB]) for i in range(3)]
    for i, vm in enumerate(vms):
        write_random(vm, 0, i * MiB, 2 * MiB)
    c.register(*vms, node_url=proxy.url)

    with ThreadPoolExecutor(3) as pool:
        posts = [pool.submit(post_backup, c, vm.name) for vm in vms]
        wait_for("three backups starting on the node", lambda: proxy.starts == 3, timeout=20)
        # All three launches wait for the node; the one API thread is free.
        t0 = time.monotonic()
        jobs = c.client.get("/api/v1/jobs")
        vms_listed = c.client.get("/api/v1/vms")
        took = time.monotonic() - t0
        assert not any(p.done() for p in posts), "a start answered before the node did"
    assert took < 1.5, f"reads waited {took:.1f}s behind starting backups"
    assert jobs["total"] == 3
    assert {j["step"] for j in jobs["jobs"]} == {"starting on node"}, jobs
    assert len(vms_listed["vms"]) == 3

    started = []
    for p in posts:
        r = p.result()
        assert r.status_code == 202, r.text
        body = r.json()
        (b,) = body["backups"]
        assert b["file_path"].endswith("-full.qcow2") and b["nbd_export_name"], body
        started.append(body)
    for body, vm in zip(started, vms, strict=True):
        job = c.wait_job(body["job_id"])
        assert job["status"] == "completed", job
        point = c.client.get(f"/api/v1/backups/{body['backups'][0]['backup_id']}")
        source = raw_copy(vm.disks[0], tmp_path / f"{vm.name}.raw")
        assert img.compare(point["file_path"], str(source))


def test_backup_cancelled_while_starting_leaves_nothing(one_thread_hub, make_vm) -> None:
    c, proxy = one_thread_hub
    vm = make_vm("cancel1", [8 * MiB])
    c.register(vm, node_url=proxy.url)

    with ThreadPoolExecutor(1) as pool:
        post = pool.submit(post_backup, c, "cancel1")
        wait_for("the backup starting on the node", lambda: proxy.starts == 1, timeout=20)
        (job,) = c.client.get("/api/v1/jobs")["jobs"]
        assert job["step"] == "starting on node", job
        c.client.post(f"/api/v1/jobs/{job['job_id']}/cancel", {})
        r = post.result()
    # The node accepted the job after the cancel: the answer says what it is.
    assert r.status_code == 202, r.text
    job = c.wait_job(job["job_id"])
    assert job["status"] == "cancelled", job
    (point,) = c.client.get("/api/v1/backups", vm_name="cancel1")["backups"]
    assert point["status"] == "cancelled", point
    assert repo_files(c) == []
    assert not list((c.hub_dir / "run").glob("nbd-*.pid"))
    assert not list((c.hub_dir / "run").glob("tls-*"))

    # The node ran the job against targets already gone: it ends too.
    def node_status() -> str | None:
        r = httpx.get(
            f"{c.node_url}/api/v1/status/{job['job_id']}",
            headers={"Authorization": f"Bearer {c.node_token}"},
        )
        state: str = r.json()["status"]
        return state if state in ("failed", "cancelled", "completed") else None

    assert wait_for("the node to end the job", node_status) in ("failed", "cancelled")
    # The VM is free again: the next backup runs and completes.
    write_random(vm, 0, 0, MiB)
    assert c.backup("cancel1", "full")["status"] == "completed"
