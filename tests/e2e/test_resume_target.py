"""Long copies that survive a lost target (issue 11), end to end.

Real hub, node, qemu-nbd and qsd processes. A rate-limited node (1 MiB
requests at 3 MiB/s) makes the copy last several seconds; the fault comes
when the node reports data moved. What a user checks: the job completes,
it showed ``retrying`` meanwhile (API and ``sendense job watch``), the
restore point reads exactly as the VM's disk (``qemu-img compare``; the VM
is not written during the job, so its disk is the snapshot-time content),
the target came back on the same port, and nothing is left behind (no
qemu-nbd, ports free, no pidfile, no TLS key folder).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
from sendense.qemu.qsd import QsdVm

MiB = 1 << 20
SLOW_NODE = {
    "SENDENSE_NODE_MAX_RATE": str(3 * MiB),
    "SENDENSE_NODE_REQUEST_SIZE": str(MiB),
}


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A hub (its environment: the test's indirect parameter) and a slow node."""
    c = Cluster(tmp_path, hub_env=getattr(request, "param", None), node_env=dict(SLOW_NODE))
    with ThreadPoolExecutor(1) as pool:
        node_started = pool.submit(c.start_node)
        try:
            c.start_hub()
        finally:
            node_started.result()
    yield c
    c.stop()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def write_random(vm: QsdVm, disk: int, offset: int, length: int) -> None:
    h = vm.guest(disk)
    for at in range(offset, offset + length, 4 * MiB):
        h.pwrite(os.urandom(min(4 * MiB, offset + length - at)), at)
    h.flush()
    h.shutdown()


def procs(c: Cluster, name: str) -> list[tuple[int, str]]:
    return [p for p in processes_under(c.root) if name in p[1]]


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


def wait_mid_copy(c: Cluster, job_id: str, min_bytes: int = 2 * MiB) -> None:
    def moving() -> bool:
        st = node_status(c, job_id)
        assert st["status"] == "running", f"job ended before the fault was injected: {st}"
        return any(d.get("bytes_done", 0) >= min_bytes for d in st["disks"].values())

    wait_for(f"job {job_id} to be copying", moving)


def follow(c: Cluster, job_id: str, timeout: float = 120) -> tuple[dict[str, Any], list[Any]]:
    """Poll the job to its end; also what it showed while retrying."""
    seen: list[Any] = []
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = c.client.get(f"/api/v1/jobs/{job_id}")
        if job["step"] == "retrying" or job.get("retry"):
            seen.append((job["step"], job.get("retry"), [d.get("retry") for d in job["disks"]]))
        if job["status"] in ("completed", "failed", "cancelled"):
            return job, seen
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"
        time.sleep(0.1)


def watch(c: Cluster, job_id: str) -> subprocess.Popen[str]:
    """``sendense job watch`` as a user runs it, in the background."""
    env = {**os.environ, "SENDENSE_URL": c.hub_url, "SENDENSE_TOKEN": c.admin_token}
    env["COLUMNS"] = "200"
    return subprocess.Popen(
        [sys.executable, "-m", "sendense.cli.main", "job", "watch", job_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def assert_exact(c: Cluster, vm: QsdVm, job: dict[str, Any]) -> list[dict[str, Any]]:
    assert job["status"] == "completed", job
    backups = [c.client.get(f"/api/v1/backups/{bid}") for bid in job["backups"]]
    for b in backups:
        assert b["status"] == "completed", b
        assert img.compare(b["file_path"], str(vm.disks[b["disk_id"]])), b
        img.check(b["file_path"])  # no leaks, no corruption left by the kill
    return backups


def assert_hub_side_clean(c: Cluster) -> None:
    assert not procs(c, "qemu-nbd"), procs(c, "qemu-nbd")
    assert not busy_ports(c.nbd_first, c.nbd_last)
    assert not list((c.hub_dir / "run").glob("nbd-*.pid"))
    assert not list((c.hub_dir / "run").glob("tls-*"))


def target_pids(c: Cluster) -> list[int]:
    return [pid for pid, _ in procs(c, "qemu-nbd")]


def test_target_killed_mid_copy_is_served_again_and_the_job_completes(
    cluster: Cluster, make_vm
) -> None:
    vm = make_vm("resume1", [64 * MiB])
    write_random(vm, 0, 0, 24 * MiB)  # ~8 s of copy at 3 MiB/s
    cluster.register(vm)
    started = cluster.start_backup("resume1", "full")
    job_id = started["job_id"]
    watcher = watch(cluster, job_id)
    # Late enough for the CLI (a Python start on a busy machine) to follow.
    wait_mid_copy(cluster, job_id, 8 * MiB)
    (old,) = target_pids(cluster)
    ports = busy_ports(cluster.nbd_first, cluster.nbd_last)
    assert len(ports) == 1, ports
    os.kill(old, signal.SIGKILL)

    # Served again: a new qemu-nbd, on the same port.
    wait_for("the target served again", lambda: target_pids(cluster) not in ([], [old]))
    wait_for("its port", lambda: busy_ports(cluster.nbd_first, cluster.nbd_last) == ports)
    job, seen = follow(cluster, job_id)
    out, _ = watcher.communicate(timeout=60)
    assert_exact(cluster, vm, job)
    assert seen, "the job never showed retrying"
    assert any("served again" in m for m in job["messages"]), job["messages"]
    assert "retrying:" in out, (out, seen)
    assert f"job {job_id}: completed" in out, out
    assert_hub_side_clean(cluster)


def test_hub_and_its_targets_killed_mid_copy_the_restarted_hub_resumes(
    cluster: Cluster, make_vm
) -> None:
    """As systemd stops a hub's whole cgroup: the hub and its qemu-nbd die;
    the node keeps retrying; the restarted hub serves the targets again on
    their ports and the job completes."""
    vm = make_vm("resume2", [64 * MiB])
    write_random(vm, 0, 0, MiB)
    cluster.register(vm)
    full = cluster.backup("resume2", "full")

    write_random(vm, 0, 8 * MiB, 20 * MiB)
    started = cluster.start_backup("resume2", "auto")
    job_id = started["job_id"]
    wait_mid_copy(cluster, job_id)
    cluster.kill("hub", signal.SIGKILL)
    for pid in target_pids(cluster):
        os.kill(pid, signal.SIGKILL)
    cluster.start_hub()

    job, _ = follow(cluster, job_id)
    (b,) = assert_exact(cluster, vm, job)
    assert b["backup_type"] == "incremental" and b["parent_backup_id"] == full["backups"][0]
    assert any("served again" in m for m in job["messages"]), job["messages"]
    assert_hub_side_clean(cluster)
    # The port came back: the next backup works.
    nxt = cluster.backup("resume2", "auto")
    assert_exact(cluster, vm, nxt)
    assert_hub_side_clean(cluster)


@pytest.mark.parametrize("cluster", [{"SENDENSE_NBD_TARGET_RESTARTS": "1"}], indirect=True)
def test_a_target_that_keeps_dying_fails_the_job_cleanly(cluster: Cluster, make_vm) -> None:
    """Restarts are limited (SENDENSE_NBD_TARGET_RESTARTS): past them the job
    fails with target_lost, its partial file removed, nothing left running."""
    vm = make_vm("resume3", [64 * MiB])
    write_random(vm, 0, 0, 24 * MiB)
    cluster.register(vm)
    started = cluster.start_backup("resume3", "full")
    job_id = started["job_id"]
    wait_mid_copy(cluster, job_id)
    (first,) = target_pids(cluster)
    os.kill(first, signal.SIGKILL)
    # Once served again (the job says so), kill it again.
    wait_for(
        "the target served again",
        lambda: any(
            "served again" in m for m in cluster.client.get(f"/api/v1/jobs/{job_id}")["messages"]
        ),
    )
    (second,) = target_pids(cluster)
    assert second != first
    os.kill(second, signal.SIGKILL)

    job, _ = follow(cluster, job_id)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "target_lost", job
    assert "given up after 1 restarts" in job["error"]["message"], job
    assert "SENDENSE_NBD_TARGET_RESTARTS" in job["error"]["message"], job
    (b,) = [cluster.client.get(f"/api/v1/backups/{bid}") for bid in job["backups"]]
    assert b["status"] == "failed", b
    assert not Path(b["file_path"]).exists(), b
    assert_hub_side_clean(cluster)
    # The node stopped its worker (the hub cancelled it) and the VM is usable:
    # the next backup works.
    wait_for("the node's job to end", lambda: node_status(cluster, job_id)["status"] != "running")
    nxt = cluster.backup("resume3", "auto")
    assert_exact(cluster, vm, nxt)


def test_encrypted_target_killed_mid_copy_is_served_again_with_its_key(
    cluster: Cluster, make_vm, tmp_path: Path
) -> None:
    """An encrypted repository's target (LUKS QCOW2): served again with the
    repository's key (a secret file that lives only while qemu-nbd starts),
    checked for leaks with it, and the restore point reads as the disk."""
    r = cluster.http(
        "POST",
        "/api/v1/repositories",
        json={"name": "vault", "path": str(tmp_path / "vault"), "encrypted": True},
    )
    assert r.status_code == 201, r.text
    repo_id = r.json()["repository_id"]
    vm = make_vm("resume4", [64 * MiB])
    write_random(vm, 0, 0, 24 * MiB)
    cluster.register(vm)
    started = cluster.start_backup("resume4", "full", repository_id=repo_id)
    job_id = started["job_id"]
    wait_mid_copy(cluster, job_id, 4 * MiB)
    (old,) = target_pids(cluster)
    os.kill(old, signal.SIGKILL)
    wait_for("the target served again", lambda: target_pids(cluster) not in ([], [old]))

    job, _ = follow(cluster, job_id)
    assert job["status"] == "completed", job
    assert any("served again" in m for m in job["messages"]), job["messages"]
    (b,) = [cluster.client.get(f"/api/v1/backups/{bid}") for bid in job["backups"]]
    exported = cluster.client.post(f"/api/v1/repositories/{repo_id}/key/export", {})
    key = img.ImageKey(exported["passphrase"].encode())
    assert img.info(b["file_path"])["encrypted"] is True
    assert img.compare(b["file_path"], str(vm.disks[0]), key=key)
    img.check(b["file_path"], key=key)
    # The passphrase never went to a command line or a log.
    assert exported["passphrase"] not in cluster.log("hub")
    assert_hub_side_clean(cluster)
