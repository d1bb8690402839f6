"""VMware VMs backed up end to end through a real hub and node, against a
vCenter *simulator* (govmomi's vcsim with Sendense's CBT double, tests/vcsim)
rather than a real vCenter: registration, discovery, full and incremental
backups read through nbdkit curl on the datastore /folder path, and faults.

"Guest writes" go into the disks' -flat.vmdk files between backups (the
simulator's snapshots create no delta disks). Every restore point must
compare identical (``qemu-img compare``) to the flat file as it was when its
backup's snapshot was taken; a copy of it is kept for that.
"""

from __future__ import annotations

import random
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.cluster import Cluster
from sendense.mover.digest import algorithm_of
from sendense.mover.verify import digest_of_image
from sendense.qemu import img
from vcsim.kit import SimVm, Vcsim
from vcsim.kit import vcsim as vcsim  # the fixture

MiB = 1 << 20
BLOCK = 64 << 10


# ------------------------------------------------------------------ helpers


def register(cluster: Cluster, sim: Vcsim, **config: Any) -> dict[str, Any]:
    """The node and a vmware source for the simulator; discovery answered."""
    c = cluster.client
    node = c.post("/api/v1/nodes", cluster.node_body("node1"))
    r = cluster.http(
        "POST",
        "/api/v1/sources",
        json={
            "name": "vc1",
            "node_id": node["node_id"],
            "type": "vmware",
            "config": sim.source_config(**config),
        },
    )
    assert r.status_code == 201, r.text
    source = r.json()
    found = c.post("/api/v1/vms/discover", {"source_id": source["source_id"]})
    return {"node": node, "source": source, "vms": {v["name"]: v for v in found["vms"]}}


def error_body(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body: dict[str, Any] = r.json()
    assert set(body) == {"error", "message", "details"}, body
    if code is not None:
        assert body["error"] == code, body
    return body


def fill(vm: SimVm, rng: random.Random, *, data: int = 2 * MiB) -> None:
    """Random data at random places of every disk (``data`` bytes each)."""
    for disk in vm.disks:
        done = 0
        while done < data:
            length = rng.choice([4096, BLOCK, 5 * BLOCK + 123, MiB])
            disk.write(rng.randrange(0, disk.capacity - length), rng.randbytes(length))
            done += length


def keep(vm: SimVm, root: Path, label: str) -> dict[int, Path]:
    """Copies of the flat files now (what a backup starting now must restore to)."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for d in vm.disks:
        out[d.key] = root / f"{label}-{d.key}.raw"
        shutil.copyfile(d.path, out[d.key])
    return out


def backups_of(cluster: Cluster, job: dict[str, Any]) -> dict[int, dict[str, Any]]:
    out = {}
    for bid in job["backups"]:
        b = cluster.client.get(f"/api/v1/backups/{bid}")
        out[b["disk_key"]] = b
    return out


def assert_restores(backups: dict[int, dict[str, Any]], expected: dict[int, Path]) -> None:
    for key, b in backups.items():
        assert b["status"] == "completed", b
        assert img.compare(b["file_path"], str(expected[key])), f"disk {key} differs"
        assert digest_of_image(b["file_path"], algorithm=algorithm_of(b["digest"])) == b["digest"]


def repo_files(cluster: Cluster) -> list[Path]:
    repo = cluster.hub_dir / "repositories" / "default"
    return sorted(p for p in repo.rglob("*") if p.is_file())


def logs(cluster: Cluster) -> str:
    text = cluster.log("hub") + cluster.log("node")
    for path in (cluster.node_dir / "jobs").rglob("*"):
        if path.is_file() and path.suffix in (".log", ".json", ".stderr"):
            text += path.read_text(errors="replace")
    return text


# -------------------------------------------------------------------- tests


def test_vmware_full_and_incrementals_restore_exactly_on_a_vcenter_simulator(
    cluster: Cluster, vcsim: Vcsim, tmp_path: Path
) -> None:
    """vCenter simulator (vcsim + CBT double): register a vmware source (the
    password sealed, never shown), discover, full backup, guest writes,
    incremental (only changed blocks move), again; every restore point
    compares identical to its flat file at snapshot time; no snapshot, nbdkit
    or password is left anywhere."""
    vm = vcsim.create_vm("web1", [(32 * MiB, True), (16 * MiB, False)])
    rng = random.Random(80)
    fill(vm, rng)
    reg = register(cluster, vcsim)
    assert reg["source"]["has_credentials"] is True
    assert "password" not in reg["source"]["config"]
    web1 = reg["vms"]["web1"]
    assert web1["path"] == "/DC0/vm/web1"
    assert [(d["disk_key"], d["capacity_bytes"]) for d in web1["disks"]] == [
        (2000, 32 * MiB),
        (2001, 16 * MiB),
    ]

    at_full = keep(vm, tmp_path / "expected", "full")
    full_job = cluster.backup("web1", "full")
    full = backups_of(cluster, full_job)
    assert {b["backup_type"] for b in full.values()} == {"full"}
    assert_restores(full, at_full)
    # A thin disk with ~2 MiB of data: only its allocated areas moved.
    assert full[2000]["bytes_transferred"] < 4 * MiB
    assert vcsim.snapshot_names("web1") == []

    disk = vm.disk(2000)
    disk.write(3 * MiB + 17, rng.randbytes(5000))
    disk.write(20 * MiB, bytes(2 * BLOCK))  # zeroes over whatever was there
    disk.write(32 * MiB - 4096, rng.randbytes(4096))
    at_inc1 = keep(vm, tmp_path / "expected", "inc1")
    inc1_job = cluster.backup("web1", "auto")
    inc1 = backups_of(cluster, inc1_job)
    for key, b in inc1.items():
        assert b["backup_type"] == "incremental", b
        assert b["parent_backup_id"] == full[key]["backup_id"]
        assert b["change_id"] != full[key]["change_id"]
    assert [d["mode"] for d in inc1_job["disks"]] == ["incremental", "incremental"]
    assert inc1[2000]["bytes_transferred"] <= 4 * BLOCK
    assert inc1[2001]["bytes_transferred"] == 0
    assert_restores(inc1, at_inc1)

    vm.disk(2001).write(MiB, rng.randbytes(3 * BLOCK))
    at_inc2 = keep(vm, tmp_path / "expected", "inc2")
    inc2 = backups_of(cluster, cluster.backup("web1", "incremental"))
    assert_restores(inc2, at_inc2)
    # Every restore point still reads as its own point in time.
    assert_restores(full, at_full)
    assert_restores(inc1, at_inc1)

    chain = cluster.client.get("/api/v1/backups/web1/chain")
    assert [d["chain_length"] for d in chain["disks"]] == [3, 3]
    assert vcsim.snapshot_names("web1") == []
    assert vcsim.state()["folder_refused"] == 0  # every read had the session cookie
    text = logs(cluster)
    assert vcsim.password not in text
    assert vcsim.password not in cluster.http("GET", "/api/v1/sources").text


def test_vmware_cbt_reset_falls_back_to_a_full_read_on_a_vcenter_simulator(
    cluster: Cluster, vcsim: Vcsim, tmp_path: Path
) -> None:
    """vCenter simulator + CBT double: an administrator turned CBT off and on
    again between backups (a CBT reset: the old change id is unknown). The
    incremental reads the disk in full, says why in the job, and restores
    exactly; the next one is incremental again."""
    vm = vcsim.create_vm("db1", [(16 * MiB, True)])
    rng = random.Random(81)
    fill(vm, rng)
    register(cluster, vcsim)
    full = backups_of(cluster, cluster.backup("db1", "full"))
    ref = vcsim.find_vm("db1")
    from pyVmomi import vim

    vcsim.wait(ref.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=False)))
    vcsim.wait(ref.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    vm.disk(2000).write(5 * MiB, rng.randbytes(BLOCK))
    expected = keep(vm, tmp_path / "expected", "after-reset")
    job = cluster.backup("db1", "auto")
    (disk,) = job["disks"]
    assert disk["mode"] == "full"
    assert full[2000]["change_id"] in disk["fallback_reason"]
    assert "CBT reset" in disk["fallback_reason"]
    assert any("full read instead of incremental" in m for m in job["messages"])
    after = backups_of(cluster, job)
    # Read in full, it stands alone (the hub makes it a full, as for QEMU).
    assert after[2000]["backup_type"] == "full" and after[2000]["parent_backup_id"] is None
    assert_restores(after, expected)

    vm.disk(2000).write(7 * MiB, rng.randbytes(BLOCK))
    expected = keep(vm, tmp_path / "expected", "next")
    job = cluster.backup("db1", "auto")
    assert job["disks"][0]["mode"] == "incremental" and not job["disks"][0]["fallback_reason"]
    assert_restores(backups_of(cluster, job), expected)


def test_vmware_wrong_password_is_refused_without_echo_on_a_vcenter_simulator(
    cluster: Cluster, vcsim: Vcsim
) -> None:
    """vCenter simulator: a source with a wrong password registers (its shape is
    right), but discovery answers 400 saying vCenter refused the login; no
    password appears in an answer or a log. A config without a password is a
    400 naming the field; a vCenter that does not answer is a 503."""
    node = cluster.client.post("/api/v1/nodes", cluster.node_body("node1"))
    body = {"name": "vc1", "node_id": node["node_id"], "type": "vmware"}
    config = vcsim.source_config()
    del config["password"]
    r = cluster.http("POST", "/api/v1/sources", json={**body, "config": config})
    assert error_body(r, 400, "invalid_request")["message"] == "config.password is required"
    wrong = "Wr0ng-Pa55word!"
    r = cluster.http(
        "POST", "/api/v1/sources", json={**body, "config": vcsim.source_config(password=wrong)}
    )
    assert r.status_code == 201, r.text
    r = cluster.http("POST", "/api/v1/vms/discover", json={"source_id": r.json()["source_id"]})
    err = error_body(r, 400, "vsphere_login_failed")
    assert "refused the user name or password" in err["message"]
    for text in (r.text, logs(cluster)):
        assert wrong not in text
        assert vcsim.password not in text

    # A vCenter that does not answer: 503, the address named.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    r = cluster.http(
        "POST",
        "/api/v1/sources",
        json={**body, "name": "vc2", "config": vcsim.source_config(port=closed)},
    )
    r = cluster.http("POST", "/api/v1/vms/discover", json={"source_id": r.json()["source_id"]})
    err = error_body(r, 503, "vsphere_unreachable")
    assert f"127.0.0.1:{closed}" in err["message"]
    assert vcsim.password not in r.text


def test_vmware_snapshot_failure_fails_the_job_cleanly_on_a_vcenter_simulator(
    cluster: Cluster, vcsim: Vcsim, tmp_path: Path
) -> None:
    """vCenter simulator: vSphere refuses the backup snapshot. The job fails
    with that reason, nothing is left in the repository or the VM, and the
    next backup works."""
    vm = vcsim.create_vm("app1", [(8 * MiB, True)])
    fill(vm, random.Random(82), data=MiB)
    register(cluster, vcsim)
    vcsim.faults(snapshot_failures=1)
    started = cluster.start_backup("app1", "full")
    job = cluster.wait_job(started["job_id"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "vsphere_snapshot_failed", job["error"]
    assert "injected by the test double" in job["error"]["message"]
    assert repo_files(cluster) == []
    assert vcsim.snapshot_names("app1") == []
    expected = keep(vm, tmp_path / "expected", "retry")
    assert_restores(backups_of(cluster, cluster.backup("app1", "full")), expected)


def test_vmware_read_dropping_mid_copy_fails_and_leaves_nothing_on_a_vcenter_simulator(
    cluster: Cluster, vcsim: Vcsim, tmp_path: Path
) -> None:
    """vCenter simulator: the datastore HTTPS read drops after 1 MiB of an 8 MiB
    copy. The job fails naming the disk, the backup snapshot is removed, the
    nbdkit readers are stopped, nothing is left on the hub; the next backup works."""
    vm = vcsim.create_vm("big1", [(16 * MiB, True)])
    vm.disk(2000).write(0, random.Random(83).randbytes(8 * MiB))
    register(cluster, vcsim)
    vcsim.faults(folder_drop_after=MiB)
    started = cluster.start_backup("big1", "full")
    job = cluster.wait_job(started["job_id"])
    assert job["status"] == "failed", job
    assert "disk 2000" in job["error"]["message"], job["error"]
    assert vcsim.state()["folder_bytes"] >= MiB  # it did drop mid-copy
    assert repo_files(cluster) == []
    assert vcsim.snapshot_names("big1") == []
    vcsim.faults(folder_drop_after=-1)
    expected = keep(vm, tmp_path / "expected", "retry")
    assert_restores(backups_of(cluster, cluster.backup("big1", "full")), expected)


@pytest.fixture
def slow_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A hub and a node whose mover copies at 2 MiB/s in 1 MiB requests."""
    c = Cluster(
        tmp_path,
        node_env={"SENDENSE_NODE_MAX_RATE": str(2 * MiB), "SENDENSE_NODE_REQUEST_SIZE": str(MiB)},
    )
    c.start_node()
    c.start_hub()
    yield c
    c.stop()


def test_vmware_cancel_mid_copy_removes_the_snapshot_on_a_vcenter_simulator(
    slow_cluster: Cluster, vcsim: Vcsim
) -> None:
    """vCenter simulator: a backup cancelled while it copies ends cancelled, with
    its snapshot removed and nothing on the hub."""
    cluster = slow_cluster
    vm = vcsim.create_vm("slow1", [(16 * MiB, True)])
    vm.disk(2000).write(0, random.Random(84).randbytes(12 * MiB))
    register(cluster, vcsim)
    started = cluster.start_backup("slow1", "full")
    job_id = started["job_id"]
    deadline = time.monotonic() + 30
    while True:
        job = cluster.client.get(f"/api/v1/jobs/{job_id}")
        if any(d.get("bytes_done", 0) >= MiB for d in job.get("disks", [])):
            break
        assert job["status"] in ("pending", "running"), job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert vcsim.snapshot_names("slow1"), "the backup snapshot exists while copying"
    cluster.client.post(f"/api/v1/jobs/{job_id}/cancel", {})
    job = cluster.wait_job(job_id)
    assert job["status"] == "cancelled", job
    assert vcsim.snapshot_names("slow1") == []
    assert repo_files(cluster) == []


def test_vmware_worker_killed_mid_copy_leaves_no_reader_and_next_backup_cleans_up(
    slow_cluster: Cluster, vcsim: Vcsim, tmp_path: Path
) -> None:
    """vCenter simulator: the node's worker process is killed (SIGKILL) while it
    copies. Its nbdkit readers end with it (--exit-with-parent), the job
    fails, and the next backup removes the snapshot the dead worker left and
    restores exactly."""
    import os
    import signal

    from vcsim.kit import nbdkit_processes

    cluster = slow_cluster
    vm = vcsim.create_vm("crash1", [(16 * MiB, True)])
    vm.disk(2000).write(0, random.Random(85).randbytes(12 * MiB))
    register(cluster, vcsim)
    job_id = cluster.start_backup("crash1", "full")["job_id"]
    deadline = time.monotonic() + 30
    while not any(
        d.get("bytes_done", 0) >= MiB
        for d in cluster.client.get(f"/api/v1/jobs/{job_id}").get("disks", [])
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    readers = nbdkit_processes(f"127.0.0.1:{vcsim.port}/")
    assert readers, "an nbdkit reads the disk while the job copies"
    pid = int((cluster.node_dir / "jobs" / job_id / "pid").read_text())
    os.kill(pid, signal.SIGKILL)
    job = cluster.wait_job(job_id)
    assert job["status"] == "failed", job
    deadline = time.monotonic() + 10
    while nbdkit_processes(f"127.0.0.1:{vcsim.port}/"):
        assert time.monotonic() < deadline, "nbdkit outlived its worker"
        time.sleep(0.1)
    assert len(vcsim.snapshot_names("crash1")) == 1  # left by the dead worker
    assert repo_files(cluster) == []

    expected = keep(vm, tmp_path / "expected", "retry")
    assert_restores(backups_of(cluster, cluster.backup("crash1", "full")), expected)
    assert vcsim.snapshot_names("crash1") == []


def test_vmware_vm_with_its_own_snapshot_is_refused_naming_vddk_on_a_vcenter_simulator(
    cluster: Cluster, vcsim: Vcsim
) -> None:
    """vCenter simulator: a VM with a snapshot of its own cannot be read right
    without VDDK; the job fails saying so (needs_vddk, the snapshot named),
    nothing is written on the hub and the VM keeps its snapshot, only it."""
    vm = vcsim.create_vm("snap1", [(8 * MiB, True)])
    fill(vm, random.Random(86), data=MiB)
    register(cluster, vcsim)
    vcsim.wait(
        vcsim.find_vm("snap1").CreateSnapshot_Task(name="pre-patch", memory=False, quiesce=False)
    )
    job = cluster.wait_job(cluster.start_backup("snap1", "full")["job_id"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "needs_vddk", job["error"]
    assert "pre-patch" in job["error"]["message"] and "VDDK" in job["error"]["message"]
    assert repo_files(cluster) == []
    assert vcsim.snapshot_names("snap1") == ["pre-patch"]
