"""Jobs on a real node process: one job per VM (also under concurrent
starts), and the pruning of old job folders.

The node runs as ``sendense node serve`` with its data dir under tmp_path;
its jobs copy a qsd VM's disk into qcow2 targets served by qemu-nbd over TCP,
as the hub's would be. SENDENSE_NODE_MAX_RATE makes a job last a few seconds.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.cluster import port_range
from sendense.cli.services import free_port, start_service, stop_service, wait_healthy
from sendense.qemu import img
from sendense.qemu.nbd_server import QemuNbdServer
from sendense.qemu.qsd import QsdVm

DATA = 3 << 20  # bytes the guest wrote: what a job copies
RATE = 1 << 20  # bytes/s of the node's mover: a job copies for about 3 s


class Node:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.data_dir = root / "node"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.url = f"https://127.0.0.1:{free_port()}"  # the node's default: HTTPS
        self.log = root / "node.log"
        port = self.url.rsplit(":", 1)[1]
        args = ["node", "serve", "--port", port, "--data-dir", str(self.data_dir)]
        self.proc = start_service(args, self.log, env)
        try:
            wait_healthy(f"{self.url}/api/v1/health", self.proc, self.log)
        except BaseException:
            stop_service(self.proc)
            raise
        token = (self.data_dir / "node.token").read_text().strip()
        # The node's own certificate as the CA (it made it on first start).
        self.verify = ssl.create_default_context(cafile=str(self.data_dir / "tls" / "node.crt"))
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            verify=self.verify,
        )

    def start(self, body: dict[str, Any]) -> httpx.Response:
        return self.http.post("/api/v1/backup/start", json=body)

    def wait(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            report: dict[str, Any] = self.http.get(f"/api/v1/status/{job_id}").json()
            if report["status"] not in ("running", "pending"):
                return report
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {report['status']}: {report}")
            time.sleep(0.1)

    def job_dirs(self) -> list[str]:
        return sorted(p.name for p in (self.data_dir / "jobs").iterdir())

    def stop(self) -> None:
        self.http.close()
        stop_service(self.proc)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def start(**env: str) -> Node:
        node = Node(tmp_path, {"SENDENSE_NODE_MAX_RATE": str(RATE), **env})
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def backup_source(make_vm: Callable[..., QsdVm], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A VM with DATA bytes written and a qemu-nbd target for its disk: the
    parts of a start request that every job here shares."""
    size = 8 << 20
    vm = make_vm("web1", [size])
    guest = vm.guest(0)
    guest.pwrite(os.urandom(DATA), 0)
    guest.flush()
    guest.shutdown()
    image = tmp_path / "target.qcow2"
    img.create(str(image), size)
    server = QemuNbdServer(str(image), export_name="t0", port=port_range(1)[0])
    with ExitStack() as stack:
        stack.enter_context(server)
        yield {
            "vm_name": vm.name,
            "source": {
                "type": "qemu",
                "config": {"vms": [{"name": vm.name, "qmp_socket": vm.qmp_socket}]},
            },
            "nbd_targets": f"2000:{server.url}",
            "backup_type": "full",
            # Small requests, so that the rate limit spreads the copy out.
            "request_size": 65536,
        }


def test_second_start_for_a_busy_vm_is_409(
    start_node: Callable[..., Node], backup_source: dict[str, Any]
) -> None:
    node = start_node()
    first = node.start({**backup_source, "job_id": "job-1"})
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "started"

    second = node.start({**backup_source, "job_id": "job-2"})
    assert second.status_code == 409, second.text
    assert second.json()["error"] == "conflict"
    assert second.json()["details"] == {"job_id": "job-1"}
    assert "still running" in second.json()["message"]
    again = node.start({**backup_source, "job_id": "job-1"})
    assert again.status_code == 409

    done = node.wait("job-1")
    assert done["status"] == "completed", done
    assert done["disks"]["2000"]["data_bytes"] >= DATA
    assert node.job_dirs() == ["job-1"]  # the refused starts left nothing behind
    # The VM is free again as soon as its job reports an end (the worker
    # writes it after releasing the VM, while it may still be exiting); a job
    # id is never reused.
    assert node.start({**backup_source, "job_id": "job-1"}).status_code == 409
    third = node.start({**backup_source, "job_id": "job-3"})
    assert third.status_code == 200, third.text
    assert node.wait("job-3")["status"] == "completed"


def worker_gone(pid: int, timeout: float = 30) -> None:
    """Wait until the worker process ``pid`` has exited (a zombie counts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        time.sleep(0.02)
    raise TimeoutError(f"worker {pid} still running")


def post_start(
    node: Node,
    body: dict[str, Any],
    barrier: threading.Barrier,
    answers: dict[str, httpx.Response],
) -> None:
    """One start request on a connection of its own, once all are ready."""
    with httpx.Client(headers=node.http.headers, timeout=30, verify=node.verify) as http:
        barrier.wait()
        answers[body["job_id"]] = http.post(f"{node.url}/api/v1/backup/start", json=body)


def test_concurrent_starts_for_one_vm_start_one_job(
    start_node: Callable[..., Node], backup_source: dict[str, Any]
) -> None:
    """Bursts of starts for one VM: each starts exactly one job, the others
    are 409 and leave nothing behind. Without the lock around check and
    registration about half the bursts started two jobs or more."""
    node = start_node()
    count, bursts = 8, 4

    def body(job_id: str) -> dict[str, Any]:
        return {**backup_source, "job_id": job_id}

    accepted = []
    for burst in range(bursts):
        barrier = threading.Barrier(count)
        answers: dict[str, httpx.Response] = {}
        ids = [f"burst{burst}-{i}" for i in range(count)]
        threads = [
            threading.Thread(target=post_start, args=(node, body(job_id), barrier, answers))
            for job_id in ids
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)

        codes = sorted(r.status_code for r in answers.values())
        assert codes == [200] + [409] * (count - 1), {k: r.text for k, r in answers.items()}
        [started] = [job_id for job_id, r in answers.items() if r.status_code == 200]
        accepted.append(started)
        for r in answers.values():
            if r.status_code == 409:
                assert r.json()["error"] == "conflict"
                assert r.json()["details"] == {"job_id": started}
        assert node.job_dirs() == sorted(accepted)
        if burst < bursts - 1:  # the next burst needs the VM free again
            node.http.post(f"/api/v1/jobs/{started}/cancel")
            assert node.wait(started)["status"] == "cancelled"
            worker_gone(answers[started].json()["pid"])
    done = node.wait(accepted[-1])
    assert done["status"] == "completed", done
    assert node.job_dirs() == sorted(accepted)  # no failed job anywhere


def fake_job(node_dir: Path, job_id: str, status: str, *, age: float, pid: int = 0) -> Path:
    """A job folder as a worker leaves it, last changed ``age`` seconds ago."""
    job_dir = node_dir / "jobs" / job_id
    job_dir.mkdir(parents=True)
    report = {"job_id": job_id, "status": status, "step": status, "pid": pid, "disks": {}}
    (job_dir / "status.json").write_text(json.dumps(report))
    (job_dir / "job.log").write_text("...\n")
    (job_dir / "pid").write_text(str(pid))
    then = time.time() - age
    for path in (*job_dir.iterdir(), job_dir):
        os.utime(path, (then, then))
    return job_dir


def test_old_job_folders_are_pruned_never_a_running_one(
    start_node: Callable[..., Node], backup_source: dict[str, Any], tmp_path: Path
) -> None:
    node_dir = tmp_path / "node"
    day = 86400.0
    # A worker started by an earlier node process that is still at it (the
    # node knows it by its command line), silent for longer than the retention.
    sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
    worker = subprocess.Popen([*sleeper, "sendense.node.worker", "--serve", str(node_dir)])
    try:
        fake_job(node_dir, "old-done", "completed", age=2 * day)
        fake_job(node_dir, "old-failed", "failed", age=2 * day)
        # Its worker died: it ended, even though its status still says running.
        fake_job(node_dir, "old-died", "running", age=2 * day, pid=999_999_999)
        fake_job(node_dir, "old-running", "running", age=2 * day, pid=worker.pid)
        fake_job(node_dir, "recent-done", "completed", age=0.5 * day)

        node = start_node(SENDENSE_NODE_JOB_RETENTION=str(day))
        # At start-up:
        assert node.job_dirs() == ["old-running", "recent-done"]

        # And at each start request:
        fake_job(node_dir, "old-done-2", "cancelled", age=2 * day)
        r = node.start({**backup_source, "job_id": "job-1"})
        assert r.status_code == 200, r.text
        assert node.job_dirs() == ["job-1", "old-running", "recent-done"]
        assert node.wait("job-1")["status"] == "completed"
        assert "job=old-done-2 pruned" in node.log.read_text()
    finally:
        worker.kill()
        worker.wait()
