"""The node's HTTP API in process: auth of its documentation, validation at
start, its answers' wire format, a flooding QMP peer."""

from __future__ import annotations

import json
import socket
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sendense.node.app import create_app
from sendense.settings import NodeSettings

with warnings.catch_warnings():
    # Starlette's TestClient warns that it will want httpx2 one day.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient


class Api:
    def __init__(self, client: TestClient, data_dir: Path) -> None:
        self.client = client
        self.data_dir = data_dir
        token = (data_dir / "node.token").read_text().strip()
        self.auth = {"Authorization": f"Bearer {token}"}

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.client.post(path, json=body, headers=self.auth)

    def get(self, path: str) -> Any:
        return self.client.get(path, headers=self.auth)

    def job_dirs(self) -> list[str]:
        return sorted(p.name for p in (self.data_dir / "jobs").iterdir())


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    data_dir = tmp_path / "node"
    # The context runs the lifespan: a spare worker is started, and stopped.
    with TestClient(create_app(NodeSettings(data_dir=data_dir))) as client:
        yield Api(client, data_dir)


def start_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "job_id": "job-1",
        "vm_name": "web1",
        "source": {"type": "qemu", "config": {"vms": [{"name": "web1", "qmp_socket": "/x"}]}},
        "nbd_targets": "2000:nbd://127.0.0.1:1/a",
        "backup_type": "incremental",
        "previous_change_ids": {"2000": "sendense-aaaa"},
    }
    body.update(changes)
    return body


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_api_documentation_needs_the_token(api: Api, path: str) -> None:
    assert api.client.get(path).status_code == 401
    assert api.client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = api.get(path)
    assert r.status_code == 200
    if path == "/openapi.json":
        assert "/api/v1/backup/start" in r.json()["paths"]
    # Health stays open: the hub checks a node before it has its token.
    assert api.client.get("/api/v1/health").status_code == 200


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"source": {"type": "hyperv", "config": {"password": "x"}}},
            "source.type 'hyperv' is not supported by this node (supported: qemu, vmware, file)",
        ),
        (
            {"source": {"type": "vmware", "config": {"password": "x"}}},
            "source.config.host is required",
        ),
        ({"source": {"type": "qemu", "config": {}}}, "source.config.vms must be a non-empty list"),
        (
            {"previous_change_ids": {"first": "sendense-aaaa"}},
            "previous_change_ids: key first is not a disk key",
        ),
        ({"previous_change_ids": {"2000": ""}}, "previous_change_ids: the change id of disk 2000"),
        (
            {"previous_change_ids": {"2000": "c", "2001": "c"}},
            "previous_change_ids: disk(s) 2001 have no target in nbd_targets",
        ),
        ({"previous_change_ids": ["2000"]}, "previous_change_ids: Input should be a valid dict"),
        ({"nbd_targets": "2000:file:///x"}, "nbd_targets: bad NBD target"),
    ],
)
def test_start_refuses_what_the_job_could_not_run(
    api: Api, changes: dict[str, Any], message: str
) -> None:
    r = api.post("/api/v1/backup/start", start_body(**changes))
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "invalid_request"
    assert body["message"].startswith(message), body
    assert api.job_dirs() == []  # no job, so no failed job either


def test_status_is_the_workers_report_as_written(api: Api) -> None:
    """The node adds no key to what its worker wrote (the hub reads it as is)."""
    report = {
        "job_id": "done-1",
        "status": "completed",
        "step": "completed",
        "pid": 999999,
        "started_at": "2025-01-02T03:04:05.123456+00:00",
        "finished_at": "2025-01-02T03:04:06.000001+00:00",
        "disks": {
            "2000": {
                "disk_key": 2000,
                "mode": "full",
                "bytes_done": 1,
                "bytes_total": 1,
                "status": "completed",
                "fallback_reason": None,
                "change_id": "sendense-c",
                "digest": "x3-64k:ab",
                "something_new": {"a": 1},
            }
        },
        "error": None,
        "messages": ["m"],
    }
    job_dir = api.data_dir / "jobs" / "done-1"
    job_dir.mkdir(parents=True)
    (job_dir / "status.json").write_text(json.dumps(report))
    assert api.get("/api/v1/status/done-1").json() == report
    assert api.post("/api/v1/jobs/done-1/cancel", {}).json() == report
    r = api.get("/api/v1/status/nope")
    assert (r.status_code, r.json()["error"]) == (404, "not_found")


def test_a_job_whose_worker_is_gone_is_failed(api: Api) -> None:
    job_dir = api.data_dir / "jobs" / "lost-1"
    job_dir.mkdir(parents=True)
    (job_dir / "pid").write_text("999999999")  # above pid_max: no such process
    (job_dir / "worker.stderr").write_text("Traceback: boom\n")
    body = api.get("/api/v1/status/lost-1").json()
    assert body["status"] == "failed"
    assert body["error"]["code"] == "worker_died"
    assert "boom" in body["error"]["message"]


def flooding_socket(path: Path, limit: int) -> tuple[threading.Thread, list[int]]:
    """A unix socket whose peer streams bytes without a newline, up to ``limit``
    bytes or until the client goes; ``sent[0]`` counts what went out."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    sent = [0]
    chunk = b"x" * 65536

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                try:
                    while sent[0] < limit:
                        conn.sendall(chunk)
                        sent[0] += len(chunk)
                except OSError:
                    pass  # the client hung up: what we want

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, sent


def test_discover_of_a_flooding_qmp_peer_is_503(api: Api, tmp_path: Path) -> None:
    qmp_socket = tmp_path / "flood.qmp"
    thread, sent = flooding_socket(qmp_socket, 64 << 20)
    config = {"vms": [{"name": "web1", "qmp_socket": str(qmp_socket)}]}
    r = api.post("/api/v1/discover", {"source": {"type": "qemu", "config": config}})
    thread.join(timeout=30)
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "qmp_error"
    assert "exceeded" in r.json()["message"]
    assert sent[0] < 32 << 20
