"""Faults and refusals, end to end: real hub, node, qemu-nbd and qsd processes.

Each test checks what a user or an administrator would: the HTTP status and
error body, the job's status and reason, the files in the repository, the
catalog, the processes and ports left, the block nodes, exports and bitmaps
left in the VM (over QMP), and that the next backup works and restores
exactly (``qemu-img compare``).

"Mid-copy" faults use a node whose data mover is rate limited
(``SENDENSE_NODE_MAX_RATE``) with 1 MiB requests, and wait on the node's own
progress report (updated every 0.2 s) before acting.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.cluster import Cluster
from fixtures.processes import busy_ports, processes_under
from sendense.qemu import img
from sendense.qemu.qmp import QmpClient
from sendense.qemu.qsd import QsdVm

MiB = 1 << 20
# Mover rate limits (1 MiB requests): 6 MiB take 1.5 s on SLOW_NODE, 24 MiB 8 s on SLOWER_NODE.
SLOW_NODE = {"SENDENSE_NODE_MAX_RATE": str(4 * MiB), "SENDENSE_NODE_REQUEST_SIZE": str(MiB)}
SLOWER_NODE = {"SENDENSE_NODE_MAX_RATE": str(3 * MiB), "SENDENSE_NODE_REQUEST_SIZE": str(MiB)}


# ----------------------------------------------------------------- fixtures


def cluster_env(
    *, hub: dict[str, str] | None = None, node: dict[str, str] | None = None
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Environment of the test's hub and node processes (read by `cluster`)."""

    def mark(fn: Callable[..., None]) -> Callable[..., None]:
        fn.cluster_env = {"hub": hub or {}, "node": node or {}}  # type: ignore[attr-defined]
        return fn

    return mark


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """conftest's hub + node pair, with the environment given by `cluster_env`.

    The autouse ``no_leaks`` check (qemu-nbd, qsd, worker processes, NBD
    ports) still runs on it after teardown.
    """
    env = getattr(request.function, "cluster_env", {})
    c = Cluster(tmp_path, hub_env=env.get("hub"), node_env=env.get("node"))
    # Both start at once: most of a start is Python importing, on two cores.
    with ThreadPoolExecutor(1) as pool:
        node_started = pool.submit(c.start_node)
        try:
            c.start_hub()
        finally:
            node_started.result()
    yield c
    c.stop()


# ------------------------------------------------------------------ helpers


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def write_random(vm: QsdVm, disk: int, offset: int, length: int) -> None:
    """Random data written and flushed as the guest would."""
    h = vm.guest(disk)
    for at in range(offset, offset + length, 4 * MiB):
        h.pwrite(os.urandom(min(4 * MiB, offset + length - at)), at)
    h.flush()
    h.shutdown()


def error_body(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The one error shape: ``{"error", "message", "details"}`` with ``status``."""
    assert r.status_code == status, (r.status_code, r.text)
    body: dict[str, Any] = r.json()
    assert set(body) == {"error", "message", "details"}, body
    assert isinstance(body["message"], str) and body["message"], body
    assert isinstance(body["details"], dict), body
    if code is not None:
        assert body["error"] == code, body
    return body


def post_backup(c: Cluster, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return c.http("POST", "/api/v1/backups", json=body, **kw)


def repo_files(c: Cluster) -> list[Path]:
    repo = c.hub_dir / "repositories" / "default"
    return sorted(p for p in repo.rglob("*") if p.is_file())


def procs(c: Cluster, name: str) -> list[tuple[int, str]]:
    return [p for p in processes_under(c.root) if name in p[1]]


def job_worker_gone(c: Cluster, job_id: str) -> bool:
    """The job's own worker process has exited (the node keeps a spare one)."""
    pid = int((c.node_dir / "jobs" / job_id / "pid").read_text())
    return not any(p == pid for p, _ in procs(c, "sendense.node.worker"))


def assert_hub_side_clean(c: Cluster) -> None:
    """No target left: no qemu-nbd process of the test, its NBD ports free, no pidfile."""
    assert not procs(c, "qemu-nbd"), procs(c, "qemu-nbd")
    assert not busy_ports(c.nbd_first, c.nbd_last)
    assert not list((c.hub_dir / "run").glob("nbd-*.pid"))


def node_status(c: Cluster, job_id: str) -> dict[str, Any]:
    r = httpx.get(
        f"{c.node_url}/api/v1/status/{job_id}",
        headers={"Authorization": f"Bearer {c.node_token}"},
        timeout=5,
        verify=c.node_verify,
    )
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def wait_mid_copy(c: Cluster, job_id: str, min_bytes: int = MiB) -> None:
    """Until the node reports data moved for the job but the copy is not done."""

    def moving() -> bool:
        st = node_status(c, job_id)
        assert st["status"] == "running", f"job ended before the fault was injected: {st}"
        return any(d.get("bytes_done", 0) >= min_bytes for d in st["disks"].values())

    wait_for(f"job {job_id} to be copying", moving, timeout=30)


def get_job(c: Cluster, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = c.client.get(f"/api/v1/jobs/{job_id}")
    return job


def get_backup(c: Cluster, backup_id: str) -> dict[str, Any]:
    b: dict[str, Any] = c.client.get(f"/api/v1/backups/{backup_id}")
    return b


def completed_backups(c: Cluster, vm: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = c.client.get("/api/v1/backups", vm_name=vm, status="completed")[
        "backups"
    ]
    return rows


def vm_block_state(vm: QsdVm) -> dict[str, Any]:
    """What Sendense may leave in the VM, read over QMP: sendense-* nodes,
    exports, block jobs, and the dirty bitmaps of the VM's disks."""
    with QmpClient(vm.qmp_socket) as qmp:
        nodes = qmp.execute("query-named-block-nodes", flat=True)
        exports = qmp.execute("query-block-exports")
        jobs = qmp.execute("query-block-jobs")
    return {
        "nodes": [n["node-name"] for n in nodes if n["node-name"].startswith("sendense-")],
        "exports": [e["id"] for e in exports if e["id"].startswith("sendense-")],
        "jobs": [j["device"] for j in jobs],
        "bitmaps": {
            n["node-name"]: {b["name"]: b for b in n.get("dirty-bitmaps") or []}
            for n in nodes
            if n["node-name"].startswith("disk")
        },
    }


def assert_vm_released(vm: QsdVm) -> dict[str, Any]:
    state = vm_block_state(vm)
    assert state["nodes"] == [], state
    assert state["exports"] == [], state
    assert state["jobs"] == [], state
    return state


def assert_job_cleaned_up(c: Cluster, job: dict[str, Any], status: str) -> None:
    """A failed/cancelled job: its restore points gone from disk, marked in the catalog."""
    assert job["status"] == status, job
    for bid in job["backups"]:
        b = get_backup(c, bid)
        assert b["status"] == status, b
        assert b["change_id"] is None and b["digest"] is None, b
        assert not Path(b["file_path"]).exists(), b["file_path"]
        assert not Path(b["file_path"]).with_suffix(".json").exists()
    assert_hub_side_clean(c)


def assert_restores_exactly(c: Cluster, vm: QsdVm, job: dict[str, Any]) -> list[dict[str, Any]]:
    assert job["status"] == "completed", job
    backups = [get_backup(c, bid) for bid in job["backups"]]
    for b in backups:
        assert b["status"] == "completed", b
        assert img.compare(b["file_path"], str(vm.disks[b["disk_id"]])), b
    return backups


# -------------------------------------------------------------------- tests


def test_invalid_requests_are_refused_with_the_field_named(cluster: Cluster, make_vm) -> None:
    vm = make_vm("val1", [4 * MiB, 4 * MiB])
    cluster.register(vm)

    body = error_body(post_backup(cluster, {"vm_name": "ghost", "repository_id": "default"}), 404)
    assert body["error"] == "not_found" and body["details"] == {"vm_name": "ghost"}
    assert "VM ghost not found" in body["message"]

    body = error_body(
        post_backup(cluster, {"vm_name": "val1", "repository_id": "nope"}), 400, "invalid_request"
    )
    assert "repository_id" in body["message"] and "nope" in body["message"]
    assert body["details"] == {"repository_id": "nope"}

    body = error_body(
        post_backup(cluster, {"vm_name": "val1", "repository_id": "default", "disk_id": 2}), 400
    )
    assert "disk_id" in body["message"] and "out of range" in body["message"]

    # Schema errors: 400, never 422, the field named in message and details.
    for payload, field in [
        ({"repository_id": "default"}, "vm_name"),
        ({"vm_name": "val1"}, "repository_id"),
        ({"vm_name": "", "repository_id": "default"}, "vm_name"),
        ({"vm_name": "val1", "repository_id": "default", "backup_type": "weekly"}, "backup_type"),
        ({"vm_name": "val1", "repository_id": "default", "disk_id": -1}, "disk_id"),
        ({"vm_name": "val1", "repository_id": "default", "disk_id": "two"}, "disk_id"),
    ]:
        body = error_body(post_backup(cluster, payload), 400, "invalid_request")
        assert field in body["message"], (payload, body)
        assert field in body["details"]["fields"], (payload, body)
    body = error_body(post_backup(cluster, {"vm_name": "val1"}), 400)
    assert body["message"] == "repository_id is required"
    r = httpx.post(
        f"{cluster.hub_url}/api/v1/backups",
        content=b"{not json",
        headers={
            "Authorization": f"Bearer {cluster.admin_token}",
            "Content-Type": "application/json",
        },
    )
    assert error_body(r, 400, "invalid_request")["message"] == "request body is not valid JSON"

    good = {"vm_name": "val1", "repository_id": "default"}
    for token in (None, "not-the-token"):
        r = post_backup(cluster, good, token=token)
        body = error_body(r, 401, "unauthorized")
        assert r.headers.get("www-authenticate") == "Bearer"
    r = httpx.get(f"{cluster.hub_url}/api/v1/jobs", headers={"Authorization": "Basic YWRtaW4="})
    error_body(r, 401, "unauthorized")

    # Nothing was started by any of these.
    assert cluster.client.get("/api/v1/jobs")["total"] == 0
    assert cluster.client.get("/api/v1/backups")["total"] == 0
    assert repo_files(cluster) == []


def test_incremental_without_parent_is_a_conflict_and_creates_nothing(
    cluster: Cluster, make_vm
) -> None:
    vm = make_vm("inc1", [8 * MiB, 8 * MiB])
    write_random(vm, 0, 0, MiB)
    cluster.register(vm)

    body = error_body(
        post_backup(
            cluster, {"vm_name": "inc1", "repository_id": "default", "backup_type": "incremental"}
        ),
        409,
        "no_parent",
    )
    assert "incremental backup of VM inc1 impossible" in body["message"]
    assert "no completed backup of disk 0" in body["message"]
    assert "run a full backup first" in body["message"]
    assert cluster.client.get("/api/v1/jobs")["total"] == 0
    assert cluster.client.get("/api/v1/backups")["total"] == 0
    assert repo_files(cluster) == []

    # One disk has a parent, the other not: still refused as a whole, and the
    # other disk's chain is untouched.
    full = cluster.backup("inc1", "full", disk_id=1)
    files = repo_files(cluster)
    body = error_body(
        post_backup(
            cluster, {"vm_name": "inc1", "repository_id": "default", "backup_type": "incremental"}
        ),
        409,
        "no_parent",
    )
    assert "disk 0" in body["message"] and body["details"] == {"disk_id": 0}
    jobs = cluster.client.get("/api/v1/jobs")
    assert jobs["total"] == 1 and jobs["jobs"][0]["job_id"] == full["job_id"]
    assert cluster.client.get("/api/v1/backups")["total"] == 1
    assert repo_files(cluster) == files
    # For the disk that has one, an incremental is fine.
    inc = cluster.backup("inc1", "incremental", disk_id=1)
    (b,) = assert_restores_exactly(cluster, vm, inc)
    assert b["backup_type"] == "incremental" and b["parent_backup_id"] == full["backups"][0]
    assert_hub_side_clean(cluster)


@cluster_env(node=SLOW_NODE)
def test_second_backup_of_a_busy_vm_is_refused(cluster: Cluster, make_vm) -> None:
    vm = make_vm("busy1", [64 * MiB, 8 * MiB])
    other = make_vm("calm1", [8 * MiB])
    write_random(vm, 0, 0, 8 * MiB)
    cluster.register(vm, other)

    first = cluster.start_backup("busy1", "full")
    for extra in ({}, {"disk_id": 0}, {"disk_id": 1}):
        r = post_backup(
            cluster,
            {"vm_name": "busy1", "repository_id": "default", "backup_type": "auto", **extra},
        )
        body = error_body(r, 409, "disk_busy")
        assert first["job_id"] in body["message"], body
        assert body["details"] == {"job_id": first["job_id"]}
    job = get_job(cluster, first["job_id"])
    assert job["status"] in ("pending", "running"), job  # the refusals were mid-job
    # Another VM is not busy.
    other_job = cluster.backup("calm1", "full")
    assert_restores_exactly(cluster, other, other_job)

    job = cluster.wait_job(first["job_id"])
    assert_restores_exactly(cluster, vm, job)
    assert cluster.client.get("/api/v1/jobs")["total"] == 2  # the refused ones left no job
    # The disk is free again once the job ended.
    write_random(vm, 0, 32 * MiB, 64 * 1024)
    inc = cluster.backup("busy1", "auto")
    for b in assert_restores_exactly(cluster, vm, inc):
        assert b["backup_type"] == "incremental"

    # A one-disk job holds the whole VM: the other disk waits too (the VM is
    # frozen as a whole), refused by the hub before any job is written.
    write_random(vm, 0, 0, 8 * MiB)
    single = cluster.start_backup("busy1", "full", disk_id=0)
    r = post_backup(
        cluster,
        {"vm_name": "busy1", "repository_id": "default", "backup_type": "full", "disk_id": 1},
    )
    body = error_body(r, 409, "disk_busy")
    assert single["job_id"] in body["message"], body
    assert cluster.client.get("/api/v1/jobs")["total"] == 4
    assert cluster.wait_job(single["job_id"])["status"] == "completed"


def test_unreachable_node_fails_fast_and_leaves_nothing(cluster: Cluster, make_vm) -> None:
    vm = make_vm("lost1", [16 * MiB, 8 * MiB])
    cluster.register(vm)
    cluster.kill("node")

    t0 = time.monotonic()
    r = post_backup(cluster, {"vm_name": "lost1", "repository_id": "default"})
    elapsed = time.monotonic() - t0
    body = error_body(r, 503, "node_unreachable")
    assert "unreachable" in body["message"] and cluster.node_url in body["message"], body
    assert elapsed < 10, elapsed

    jobs = cluster.client.get("/api/v1/jobs")["jobs"]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["error"]["code"] == "node_unreachable"
    assert "unreachable" in job["error"]["message"]
    assert_job_cleaned_up(cluster, job, "failed")
    assert repo_files(cluster) == []
    assert completed_backups(cluster, "lost1") == []
    (node,) = cluster.client.get("/api/v1/nodes")["nodes"]
    assert node["health"]["status"] == "unreachable"


@cluster_env(node=SLOW_NODE)
def test_vm_killed_mid_copy(cluster: Cluster, make_vm) -> None:
    vm = make_vm("crash1", [64 * MiB])
    write_random(vm, 0, 0, MiB)
    cluster.register(vm)
    full = cluster.backup("crash1", "full")
    change_id = get_backup(cluster, full["backups"][0])["change_id"]
    # A clean restart stores the persistent bitmap in the image and loads it back.
    vm.stop()
    vm.start()
    assert list(vm_block_state(vm)["bitmaps"]["disk0"]) == [change_id]
    before = completed_backups(cluster, "crash1")
    files_before = repo_files(cluster)

    write_random(vm, 0, 8 * MiB, 6 * MiB)
    started = cluster.start_backup("crash1", "auto")
    assert started["backups"][0]["backup_type"] == "incremental"
    wait_mid_copy(cluster, started["job_id"])
    vm.kill()

    job = cluster.wait_job(started["job_id"], timeout=30)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "source_lost", job
    assert "lost the connection to disk 2000 of the VM" in job["error"]["message"], job
    assert_job_cleaned_up(cluster, job, "failed")
    # The catalog and the repository are as they were before the job.
    assert completed_backups(cluster, "crash1") == before
    assert repo_files(cluster) == files_before
    wait_for("the worker to exit", lambda: job_worker_gone(cluster, started["job_id"]))

    # Back after an unclean stop, the bitmap that was loaded from the image is
    # inconsistent (qemu marks it in use on disk while it runs).
    vm.start()
    bitmaps = vm_block_state(vm)["bitmaps"]["disk0"]
    assert list(bitmaps) == [change_id] and bitmaps[change_id]["inconsistent"] is True

    nxt = cluster.backup("crash1", "auto")
    (b,) = assert_restores_exactly(cluster, vm, nxt)
    # The change id was unusable: a full read, recorded as a full.
    assert b["backup_type"] == "full" and b["parent_backup_id"] is None, b
    assert "backing-filename" not in img.info(b["file_path"])
    assert any(
        f"change id {change_id} on disk 2000 is inconsistent" in m for m in nxt["messages"]
    ), nxt["messages"]
    assert b["file_path"].endswith("-full.qcow2"), b
    # The unusable bitmap is gone; only the new restore point's change id remains.
    state = assert_vm_released(vm)
    assert list(state["bitmaps"]["disk0"]) == [b["change_id"]], state


# The worker notices the hub's silence after 3 s (SENDENSE_NODE_HUB_SILENCE;
# 60 s by default) and stops reconnecting to the targets the hub stopped.
@cluster_env(
    node={**SLOWER_NODE, "SENDENSE_NODE_HUB_SILENCE": "3"}, hub={"SENDENSE_NODE_TIMEOUT": "2"}
)
def test_node_killed_mid_copy(cluster: Cluster, make_vm) -> None:
    vm = make_vm("orphan1", [64 * MiB])
    write_random(vm, 0, 0, MiB)
    cluster.register(vm)
    full = cluster.backup("orphan1", "full")
    full_b = get_backup(cluster, full["backups"][0])
    before = completed_backups(cluster, "orphan1")
    files_before = repo_files(cluster)

    write_random(vm, 0, 8 * MiB, 24 * MiB)  # 8 s of copy: outlasts the node timeout
    started = cluster.start_backup("orphan1", "auto")
    wait_mid_copy(cluster, started["job_id"])
    t0 = time.monotonic()
    cluster.kill("node", signal.SIGKILL)

    job = cluster.wait_job(started["job_id"], timeout=30)
    assert time.monotonic() - t0 < 15
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "node_unreachable", job
    assert "node unreachable for more than 2s" in job["error"]["message"], job
    assert_job_cleaned_up(cluster, job, "failed")
    assert completed_backups(cluster, "orphan1") == before
    assert repo_files(cluster) == files_before
    # The job's worker outlives the agent (its own session) but not its
    # targets: once the hub stopped them and nobody asked about the job for
    # a while, it stops reconnecting, fails, releases the VM and exits by
    # itself (not at the 300 s reconnect deadline), and the last
    # restore point's change id is again the VM's only bitmap.
    wait_for("the worker to exit", lambda: job_worker_gone(cluster, started["job_id"]))
    state = assert_vm_released(vm)
    assert list(state["bitmaps"]["disk0"]) == [full_b["change_id"]], state

    cluster.node_env = {}  # the node comes back, at full speed to keep the test short
    cluster.start_node()
    st = node_status(cluster, started["job_id"])
    assert st["status"] == "failed" and st["error"]["code"] == "target_lost", st
    nxt = cluster.backup("orphan1", "auto")
    (b,) = assert_restores_exactly(cluster, vm, nxt)
    assert b["backup_type"] == "incremental" and b["parent_backup_id"] == full_b["backup_id"]
    assert_vm_released(vm)


@cluster_env(node=SLOWER_NODE)
def test_hub_killed_mid_copy_and_restarted_takes_the_job_back(cluster: Cluster, make_vm) -> None:
    """The node keeps copying into the targets, which outlive the hub; the
    restarted hub adopts the job and finishes it as if nothing happened."""
    vm = make_vm("phoenix1", [64 * MiB])
    write_random(vm, 0, 0, MiB)
    cluster.register(vm)
    full = cluster.backup("phoenix1", "full")
    full_b = get_backup(cluster, full["backups"][0])

    write_random(vm, 0, 8 * MiB, 12 * MiB)  # 4 s of copy: outlasts a hub restart
    started = cluster.start_backup("phoenix1", "auto")
    wait_mid_copy(cluster, started["job_id"])
    cluster.kill("hub", signal.SIGKILL)
    assert procs(cluster, "qemu-nbd")  # its targets outlive it
    cluster.start_hub()

    job = cluster.wait_job(started["job_id"], timeout=60)
    (b,) = assert_restores_exactly(cluster, vm, job)
    assert b["backup_type"] == "incremental" and b["parent_backup_id"] == full_b["backup_id"]
    assert b["bytes_transferred"] >= 12 * MiB
    assert_hub_side_clean(cluster)  # no orphan qemu-nbd, ports free
    assert_vm_released(vm)
    # The adopted job's port came back: the next backup gets targets again.
    nxt = cluster.backup("phoenix1", "auto")
    assert_restores_exactly(cluster, vm, nxt)


@cluster_env(node=SLOWER_NODE)
def test_hub_restarted_after_its_targets_and_keys_died_fails_the_job(
    cluster: Cluster, make_vm
) -> None:
    """Targets that died with the hub are served again (tests/e2e/
    test_resume_target.py), but not without their TLS keys (a run/ folder on
    tmpfs after a reboot): then the job fails, cleanly."""
    vm = make_vm("phoenix2", [64 * MiB])
    write_random(vm, 0, 0, MiB)
    cluster.register(vm)
    full = cluster.backup("phoenix2", "full")
    full_b = get_backup(cluster, full["backups"][0])
    before = completed_backups(cluster, "phoenix2")
    files_before = repo_files(cluster)

    write_random(vm, 0, 8 * MiB, 24 * MiB)  # 8 s of copy
    started = cluster.start_backup("phoenix2", "auto")
    wait_mid_copy(cluster, started["job_id"])
    cluster.kill("hub", signal.SIGKILL)
    for pid, _ in procs(cluster, "qemu-nbd"):  # the machine lost them too
        os.kill(pid, signal.SIGKILL)
    for tls_dir in (cluster.hub_dir / "run").glob("tls-*"):  # and their keys
        shutil.rmtree(tls_dir)
    cluster.start_hub()
    assert_hub_side_clean(cluster)

    job = get_job(cluster, started["job_id"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "hub_restarted", job
    assert "hub restarted" in job["error"]["message"], job
    assert "TLS key is gone" in job["error"]["message"], job
    assert_job_cleaned_up(cluster, job, "failed")
    assert completed_backups(cluster, "phoenix2") == before
    assert repo_files(cluster) == files_before
    # The node's worker lost its targets (or was cancelled): it releases the
    # VM with the last restore point's change id intact.
    wait_for("the worker to exit", lambda: job_worker_gone(cluster, started["job_id"]))
    st = node_status(cluster, started["job_id"])
    assert st["status"] in ("cancelled", "failed"), st
    state = assert_vm_released(vm)
    assert list(state["bitmaps"]["disk0"]) == [full_b["change_id"]], state

    cluster.kill("node", signal.SIGTERM)
    cluster.node_env = {}
    cluster.start_node()
    nxt = cluster.backup("phoenix2", "auto")
    (b,) = assert_restores_exactly(cluster, vm, nxt)
    assert b["backup_type"] == "incremental" and b["parent_backup_id"] == full_b["backup_id"]
    assert_vm_released(vm)


@cluster_env(node=SLOW_NODE)
def test_cancel_mid_copy(cluster: Cluster, make_vm) -> None:
    vm = make_vm("stop1", [64 * MiB])
    write_random(vm, 0, 0, MiB)
    cluster.register(vm)
    full = cluster.backup("stop1", "full")
    full_b = get_backup(cluster, full["backups"][0])
    files_before = repo_files(cluster)

    write_random(vm, 0, 8 * MiB, 6 * MiB)
    started = cluster.start_backup("stop1", "auto")
    wait_mid_copy(cluster, started["job_id"])
    r = cluster.http("POST", f"/api/v1/jobs/{started['job_id']}/cancel")
    assert r.status_code == 202, r.text

    job = cluster.wait_job(started["job_id"], timeout=30)
    # Once the job shows cancelled, the VM is released: no sendense-* node or
    # export left, and the change id of the last restore point is the only
    # Sendense bitmap, recording again.
    state = assert_vm_released(vm)
    bitmaps = state["bitmaps"]["disk0"]
    assert list(bitmaps) == [full_b["change_id"]], bitmaps
    assert bitmaps[full_b["change_id"]]["recording"] is True
    assert job["status"] == "cancelled", job
    assert job["error"]["code"] == "cancelled", job
    assert_job_cleaned_up(cluster, job, "cancelled")
    assert repo_files(cluster) == files_before

    # Cancelling a finished job is a no-op.
    r = cluster.http("POST", f"/api/v1/jobs/{started['job_id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"

    nxt = cluster.backup("stop1", "auto")
    (b,) = assert_restores_exactly(cluster, vm, nxt)
    assert b["backup_type"] == "incremental" and b["parent_backup_id"] == full_b["backup_id"]
    assert nxt["disks"][0]["mode"] == "incremental" and nxt["messages"] == [], nxt
    assert b["bytes_transferred"] >= 6 * MiB  # the writes before the cancel are in it
    assert_vm_released(vm)


def test_lost_change_id_falls_back_to_a_full_read(cluster: Cluster, make_vm) -> None:
    """The catalog's change id is gone from the VM: the node reads the whole
    disk into the incremental's target and says why; the engine (`_record`)
    then records it as a full: backing file dropped, no parent, named -full.
    (`auto` after an unclean VM stop is covered by test_vm_killed_mid_copy.)"""
    vm = make_vm("amnesia1", [16 * MiB, 8 * MiB])
    write_random(vm, 0, 0, 2 * MiB)
    write_random(vm, 1, 4 * MiB, MiB)
    cluster.register(vm)
    full = cluster.backup("amnesia1", "full")
    prev = {b["disk_id"]: b for b in (get_backup(cluster, i) for i in full["backups"])}
    # Disk 0 loses its change id (bitmap removed behind our back); disk 1 keeps it.
    with QmpClient(vm.qmp_socket) as qmp:
        qmp.execute("block-dirty-bitmap-remove", node="disk0", name=prev[0]["change_id"])
    write_random(vm, 0, 6 * MiB, 128 * 1024)
    write_random(vm, 1, 0, 64 * 1024)

    job = cluster.backup("amnesia1", "incremental")
    now = {b["disk_id"]: b for b in assert_restores_exactly(cluster, vm, job)}
    reason = f"change id {prev[0]['change_id']} not found on disk 2000"
    assert job["messages"] == [
        f"disk 2000: full read instead of incremental: {reason} (VM recreated or bitmap lost)"
    ], job["messages"]
    assert job["disks"][0]["fallback_reason"].startswith(reason)
    assert job["disks"][0]["mode"] == "full"

    # Recorded as what it is: a full, with no parent and no backing file.
    b0 = now[0]
    assert b0["backup_type"] == "full" and b0["parent_backup_id"] is None, b0
    assert b0["previous_change_id"] is None
    assert "backing-filename" not in img.info(b0["file_path"])
    assert b0["file_path"].endswith("-full.qcow2"), b0["file_path"]
    assert not list(Path(b0["file_path"]).parent.glob("*-incr.*"))
    sidecar = Path(b0["file_path"]).with_suffix(".json").read_text()
    assert '"backup_type": "full"' in sidecar and '"parent_backup_id": null' in sidecar
    chain0 = cluster.client.get("/api/v1/backups/amnesia1/chain", disk_id=0)["disks"][0]
    assert [x["backup_id"] for x in chain0["chain"]] == [b0["backup_id"]]
    # Disk 1 still made a real incremental in the same job.
    b1 = now[1]
    assert b1["backup_type"] == "incremental", b1
    assert b1["parent_backup_id"] == prev[1]["backup_id"]
    assert job["disks"][1]["mode"] == "incremental"
    # The superseded full is kept as it was.
    assert Path(prev[0]["file_path"]).exists()
    assert get_backup(cluster, prev[0]["backup_id"]) == prev[0]

    # The new change id works: the next backup is an incremental on the fallback full.
    write_random(vm, 0, 0, 64 * 1024)
    inc = cluster.backup("amnesia1", "auto")
    for b in assert_restores_exactly(cluster, vm, inc):
        assert b["backup_type"] == "incremental"
        assert b["parent_backup_id"] in job["backups"]
    assert inc["messages"] == []
    assert_vm_released(vm)


@cluster_env(hub={"SENDENSE_JOB_TIMEOUT": "2"}, node=SLOWER_NODE)
def test_job_past_its_timeout_fails_and_is_cleaned_up(cluster: Cluster, make_vm) -> None:
    vm = make_vm("slow1", [64 * MiB])
    write_random(vm, 0, 0, 24 * MiB)  # 8 s at the node's rate: past the 2 s timeout
    cluster.register(vm)
    started = cluster.start_backup("slow1", "full")
    job = cluster.wait_job(started["job_id"], timeout=60)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "timeout", job
    assert "timeout of 2s" in job["error"]["message"]
    assert_job_cleaned_up(cluster, job, "failed")
    assert not repo_files(cluster)
    assert_vm_released(vm)
    wait_for("the worker to exit", lambda: job_worker_gone(cluster, started["job_id"]))


@cluster_env(node=SLOW_NODE)
def test_two_disks_in_parallel_one_failure_fails_the_job(cluster: Cluster, make_vm) -> None:
    """Disks are copied in parallel; when the VM dies, the job's error is the
    lost source (not a 'cancelled' from the sibling disk), and nothing stays."""
    vm = make_vm("pair1", [32 * MiB, 32 * MiB])
    write_random(vm, 0, 0, 12 * MiB)
    write_random(vm, 1, 0, 12 * MiB)
    cluster.register(vm)
    started = cluster.start_backup("pair1", "full")

    def both_moving() -> bool:
        st = node_status(cluster, started["job_id"])
        assert st["status"] == "running", st
        disks = st["disks"].values()
        return len(disks) == 2 and all(d.get("bytes_done", 0) > 0 for d in disks)

    wait_for("both disks to be copying", both_moving)
    vm.kill()
    job = cluster.wait_job(started["job_id"], timeout=30)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "source_lost", job
    assert_job_cleaned_up(cluster, job, "failed")
    assert not repo_files(cluster)


@cluster_env(node=SLOW_NODE)
def test_cancel_right_after_start_is_a_cancel(cluster: Cluster, make_vm) -> None:
    """A cancel that lands while the node freezes the VM or plans the copy
    (inside libnbd or QMP calls) ends the job as cancelled, never failed."""
    vm = make_vm("early1", [32 * MiB, 32 * MiB])
    write_random(vm, 0, 0, 4 * MiB)
    cluster.register(vm)
    for _ in range(3):
        started = cluster.start_backup("early1", "full")
        r = cluster.http("POST", f"/api/v1/jobs/{started['job_id']}/cancel")
        assert r.status_code == 202, r.text
        job = cluster.wait_job(started["job_id"], timeout=30)
        assert job["status"] == "cancelled", job
        assert job["error"]["code"] == "cancelled", job
        assert_job_cleaned_up(cluster, job, "cancelled")
        assert_vm_released(vm)
    assert not repo_files(cluster)
