"""Pull mode (issue 11): the hub reads the node's frozen disks and writes the QCOW2.

Real hub and node processes; the node runs with ``SENDENSE_NODE_TRANSFER=pull``.
What a user checks: the restore point equals the disk at snapshot time
(``qemu-img compare`` against a copy taken before the backup, while the
guest writes during the pull), its digest is the one of that content, the
next incremental is pushed on top of it without a full re-read, and a
cancelled or broken pull leaves no file, process or port behind.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.cluster import Cluster, port_range
from fixtures.lifecycle import raw_copy, reference_digest
from fixtures.processes import busy_ports, processes_under
from sendense.qemu import img
from sendense.qemu.qmp import QmpClient
from sendense.qemu.qsd import QsdVm

MiB = 1 << 20


def pull_node(**extra: str) -> dict[str, str]:
    first, last = port_range()
    return {
        "SENDENSE_NODE_TRANSFER": "pull",
        "SENDENSE_NODE_PULL_PORT_FIRST": str(first),
        "SENDENSE_NODE_PULL_PORT_LAST": str(last),
        **extra,
    }


def cluster_env(
    *, hub: dict[str, str] | None = None, node: dict[str, str] | None = None
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def mark(fn: Callable[..., None]) -> Callable[..., None]:
        fn.cluster_env = {"hub": hub or {}, "node": node or {}}  # type: ignore[attr-defined]
        return fn

    return mark


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    env = getattr(request.function, "cluster_env", {})
    c = Cluster(tmp_path, hub_env=env.get("hub"), node_env=env.get("node") or pull_node())
    with ThreadPoolExecutor(1) as pool:
        node_started = pool.submit(c.start_node)
        try:
            c.start_hub()
        finally:
            node_started.result()
    yield c
    c.stop()
    ports = c.node_env["SENDENSE_NODE_PULL_PORT_FIRST"], c.node_env["SENDENSE_NODE_PULL_PORT_LAST"]
    assert not busy_ports(int(ports[0]), int(ports[1])), "a pull export's port is still in use"


# ------------------------------------------------------------------ helpers


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


def serving(c: Cluster, job_id: str) -> bool:
    """The node froze the VM and serves every disk for the hub to read."""
    st = node_status(c, job_id)
    assert st["status"] == "running", f"job ended before it was seen serving: {st}"
    return bool(st["disks"]) and all(d.get("pull_url") for d in st["disks"].values())


def pulling(c: Cluster, job_id: str) -> dict[str, Any] | None:
    """The job's progress, once the hub's convert has read some of a disk."""
    job: dict[str, Any] = c.client.get(f"/api/v1/jobs/{job_id}")
    assert job["status"] == "running", f"job ended before it was seen pulling: {job}"
    moving = [d for d in job["disks"] if 0 < (d["bytes_done"] or 0) < (d["bytes_total"] or 0)]
    return job if moving else None


def backups_of(c: Cluster, job: dict[str, Any]) -> list[dict[str, Any]]:
    return [c.client.get(f"/api/v1/backups/{b}") for b in job["backups"]]


def hub_qemu_img(c: Cluster) -> list[str]:
    """qemu-img processes writing into this test's repositories."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-img" in cmd and str(c.root).encode() in cmd:
                out.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
    return out


def vm_state(vm: QsdVm) -> dict[str, Any]:
    with QmpClient(vm.qmp_socket) as qmp:
        nodes = qmp.execute("query-named-block-nodes", flat=True)
        exports = qmp.execute("query-block-exports")
    return {
        "nodes": [n["node-name"] for n in nodes if n["node-name"].startswith("sendense-")],
        "exports": [e["id"] for e in exports if e["id"].startswith("sendense-")],
        "bitmaps": {
            n["node-name"]: sorted(b["name"] for b in n.get("dirty-bitmaps") or [])
            for n in nodes
            if n["node-name"].startswith("disk")
        },
    }


def assert_nothing_left(c: Cluster, job: dict[str, Any], vm: QsdVm) -> None:
    """A failed/cancelled pull: no restore point file, no key folder, no
    qemu-img, no export on the node, the VM released, its worker gone."""
    for b in backups_of(c, job):
        assert b["status"] == job["status"], b
        assert b["change_id"] is None and b["digest"] is None, b
        assert not Path(b["file_path"]).exists(), b["file_path"]
        assert not Path(b["file_path"]).with_suffix(".json").exists()
    assert not list((c.hub_dir / "run").glob("tls-*")), "a key folder was left on the hub"
    assert hub_qemu_img(c) == []
    pid = int((c.node_dir / "jobs" / job["job_id"] / "pid").read_text())
    wait_for(
        "the node's worker and its exports to end",
        lambda: not any(p == pid or "qemu-nbd" in cmd for p, cmd in processes_under(c.node_dir)),
    )
    state = wait_for("the VM to be released", lambda: (s := vm_state(vm))["nodes"] == [] and s)
    assert state["exports"] == [], state
    assert not list((c.node_dir / "jobs" / job["job_id"]).glob("*tls*")), "key files left"


# -------------------------------------------------------------------- tests


@cluster_env(node=pull_node(SENDENSE_NODE_MAX_RATE=str(24 * MiB)))
def test_pulled_full_then_pushed_incremental(cluster: Cluster, make_vm, tmp_path: Path) -> None:
    c = cluster
    health = httpx.get(f"{c.node_url}/api/v1/health", verify=c.node_verify).json()
    assert health["transfer"] == "pull"
    vm = make_vm("pull1", [64 * MiB, 32 * MiB])
    write_random(vm, 0, 0, 24 * MiB)
    write_random(vm, 1, 4 * MiB, 8 * MiB)
    c.register(vm)
    snaps = [raw_copy(vm.disks[i], tmp_path / f"snap-{i}.raw") for i in range(2)]

    started = c.start_backup("pull1", "full")
    job_id = started["job_id"]
    wait_for("the node to serve the frozen disks", lambda: serving(c, job_id))
    # The guest goes on writing while the hub reads: the restore point must
    # still be the disk as it was when the job froze it.
    write_random(vm, 0, 0, 4 * MiB)
    write_random(vm, 1, 28 * MiB, 4 * MiB)
    st = node_status(c, job_id)
    urls = [d["pull_url"] for d in st["disks"].values()]
    assert all(u.startswith("nbds://127.0.0.1:") for u in urls), urls  # TLS-PSK
    job = c.wait_job(job_id, timeout=120)
    assert job["status"] == "completed", job
    full = backups_of(c, job)
    for b in full:
        snap = snaps[b["disk_id"]]
        assert b["backup_type"] == "full" and b["status"] == "completed", b
        assert img.compare(b["file_path"], str(snap)), b
        assert not img.compare(b["file_path"], str(vm.disks[b["disk_id"]]))
        assert b["digest"] == reference_digest(snap), b
        assert img.info(b["file_path"])["cluster-size"] == 64 * 1024
    # No NBD target was served by the hub for it, and its key folder is gone.
    assert not list((c.hub_dir / "run").glob("nbd-*.pid"))
    assert not list((c.hub_dir / "run").glob("tls-*"))
    # Only the new change id remains in the VM, recording.
    state = vm_state(vm)
    assert state["nodes"] == [] and state["exports"] == [], state
    assert state["bitmaps"]["disk0"] == [full[0]["change_id"]], state

    # The next backup is a push incremental on top of the pulled full, and
    # the node had the block hash list to make its digest (no full re-read).
    write_random(vm, 0, 40 * MiB, 4 * MiB)
    write_random(vm, 1, 0, MiB)
    nxt = c.backup("pull1", "auto")
    assert nxt["status"] == "completed", nxt
    assert nxt["messages"] == [], nxt["messages"]
    by_full = {b["disk_id"]: b for b in full}
    for b in backups_of(c, nxt):
        assert b["backup_type"] == "incremental", b
        assert b["parent_backup_id"] == by_full[b["disk_id"]]["backup_id"], b
        assert img.compare(b["file_path"], str(vm.disks[b["disk_id"]])), b
        now = raw_copy(vm.disks[b["disk_id"]], tmp_path / f"now-{b['disk_id']}.raw")
        assert b["digest"] == reference_digest(now), b
        # Only what the guest wrote since the freeze (during the pull and after).
        assert b["bytes_transferred"] == {0: 8 * MiB, 1: 5 * MiB}[b["disk_id"]], b


def test_pulled_full_into_an_encrypted_repository(
    cluster: Cluster, make_vm, tmp_path: Path
) -> None:
    c = cluster
    vault = tmp_path / "vault"
    r = c.http(
        "POST",
        "/api/v1/repositories",
        json={"name": "vault", "path": str(vault), "encrypted": True},
    )
    assert r.status_code == 201, r.text
    repo_id = r.json()["repository_id"]
    vm = make_vm("pullenc", [32 * MiB])
    write_random(vm, 0, 0, 12 * MiB)
    c.register(vm)
    snap = raw_copy(vm.disks[0], tmp_path / "snap.raw")
    job = c.backup("pullenc", "full", repository_id=repo_id)
    assert job["status"] == "completed", job
    (b,) = backups_of(c, job)
    passphrase = c.client.post(f"/api/v1/repositories/{repo_id}/key/export", {})["passphrase"]
    key = img.ImageKey(passphrase.encode())
    assert img.info(b["file_path"])["encrypted"] is True
    assert img.compare(b["file_path"], str(snap), key=key)
    assert b["digest"] == reference_digest(snap)
    # The passphrase never went to a command line or a log.
    assert passphrase not in c.log("hub") and passphrase not in c.log("node")

    write_random(vm, 0, 20 * MiB, 2 * MiB)
    nxt = c.backup("pullenc", "auto", repository_id=repo_id)
    (inc,) = backups_of(c, nxt)
    assert inc["backup_type"] == "incremental" and inc["parent_backup_id"] == b["backup_id"]
    assert img.compare(inc["file_path"], str(vm.disks[0]), key=key)


@cluster_env(node=pull_node(SENDENSE_NODE_MAX_RATE=str(4 * MiB)))
def test_cancel_mid_pull_leaves_nothing(cluster: Cluster, make_vm) -> None:
    c = cluster
    vm = make_vm("pullstop", [64 * MiB])
    write_random(vm, 0, 0, 48 * MiB)  # 12 s at the node's rate
    c.register(vm)
    started = c.start_backup("pullstop", "full")
    job_id = started["job_id"]
    wait_for("the hub to be pulling", lambda: pulling(c, job_id), timeout=30)
    assert hub_qemu_img(c), "no qemu-img reading the node"
    r = c.http("POST", f"/api/v1/jobs/{job_id}/cancel")
    assert r.status_code == 202, r.text
    job = c.wait_job(job_id, timeout=30)
    assert job["status"] == "cancelled", job
    assert job["error"]["code"] == "cancelled", job
    assert_nothing_left(c, job, vm)
    assert vm_state(vm)["bitmaps"]["disk0"] == []  # a first full: no change id kept
    st = node_status(c, job_id)
    assert st["status"] in ("cancelled", "failed"), st


@cluster_env(
    hub={"SENDENSE_NODE_TIMEOUT": "2"},
    node=pull_node(SENDENSE_NODE_MAX_RATE=str(4 * MiB), SENDENSE_NODE_PULL_CONFIRM_TIMEOUT="2"),
)
def test_node_killed_mid_pull_leaves_nothing(cluster: Cluster, make_vm) -> None:
    c = cluster
    vm = make_vm("pullorphan", [64 * MiB])
    write_random(vm, 0, 0, 48 * MiB)
    c.register(vm)
    started = c.start_backup("pullorphan", "full")
    job_id = started["job_id"]
    wait_for("the hub to be pulling", lambda: pulling(c, job_id), timeout=30)
    t0 = time.monotonic()
    c.kill("node", signal.SIGKILL)
    job = c.wait_job(job_id, timeout=30)
    assert time.monotonic() - t0 < 15
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "node_unreachable", job
    # The worker outlives the agent; its export ends with the hub's qemu-img,
    # the hub never says "pulled": it fails, releases the VM and exits.
    assert_nothing_left(c, job, vm)
    assert vm_state(vm)["bitmaps"]["disk0"] == []

    c.node_env = {k: v for k, v in c.node_env.items() if k != "SENDENSE_NODE_MAX_RATE"}
    c.start_node()
    st = node_status(c, job_id)
    assert st["status"] == "failed" and st["error"]["code"] == "pull_unconfirmed", st
    again = c.backup("pullorphan", "full")
    (b,) = backups_of(c, again)
    assert img.compare(b["file_path"], str(vm.disks[0])), b


def test_a_pulled_incremental_is_refused(cluster: Cluster) -> None:
    """Incrementals are pushed: a pull request for one is a 400 naming why."""
    c = cluster
    body = {
        "job_id": "pull-refused",
        "vm_name": "x",
        "source": {"type": "qemu", "config": {"vms": [{"name": "x", "qmp_socket": "/none"}]}},
        "nbd_targets": "2000:nbd://pull/sendense-x",
        "backup_type": "incremental",
        "previous_change_ids": {"2000": "sendense-1"},
        "transfer": "pull",
    }
    r = httpx.post(
        f"{c.node_url}/api/v1/backup/start",
        json=body,
        headers={"Authorization": f"Bearer {c.node_token}"},
        verify=c.node_verify,
    )
    assert r.status_code == 400, r.text
    assert "full backups only" in r.json()["message"], r.text


@cluster_env(node=pull_node(SENDENSE_NODE_MAX_RATE=str(4 * MiB)))
def test_hub_killed_mid_pull_leaves_nothing(cluster: Cluster, make_vm) -> None:
    """The hub's qemu-img dies with it; the restarted hub fails the job (no
    target to adopt), removes the partial file and the key, and stops the
    node's job, which releases the VM."""
    c = cluster
    vm = make_vm("pullphoenix", [64 * MiB])
    write_random(vm, 0, 0, 48 * MiB)
    c.register(vm)
    started = c.start_backup("pullphoenix", "full")
    job_id = started["job_id"]
    wait_for("the hub to be pulling", lambda: pulling(c, job_id), timeout=30)
    c.kill("hub", signal.SIGKILL)
    wait_for("the hub's qemu-img to die with it", lambda: hub_qemu_img(c) == [], timeout=10)
    c.start_hub()
    job = c.wait_job(job_id, timeout=30)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "hub_restarted", job
    assert_nothing_left(c, job, vm)
    st = node_status(c, job_id)
    assert st["status"] in ("cancelled", "failed"), st
    again = c.backup("pullphoenix", "full")
    (b,) = backups_of(c, again)
    assert img.compare(b["file_path"], str(vm.disks[0])), b


@cluster_env(node=pull_node(SENDENSE_NODE_MAX_RATE=str(4 * MiB)))
def test_node_export_lost_mid_pull_fails_cleanly(cluster: Cluster, make_vm) -> None:
    """The node's export dies under the hub's read: the job fails with the
    reason, the node's job is cancelled, and nothing is left."""
    c = cluster
    vm = make_vm("pullcut", [64 * MiB])
    write_random(vm, 0, 0, 48 * MiB)
    c.register(vm)
    started = c.start_backup("pullcut", "full")
    job_id = started["job_id"]
    wait_for("the hub to be pulling", lambda: pulling(c, job_id), timeout=30)
    exports = [p for p, cmd in processes_under(c.node_dir) if "nbdkit" in cmd or "qemu-nbd" in cmd]
    assert len(exports) == 1, exports
    os.kill(exports[0], signal.SIGKILL)
    job = c.wait_job(job_id, timeout=30)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "pull_failed", job
    assert "reading disk 2000 from the node failed" in job["error"]["message"], job
    assert_nothing_left(c, job, vm)
    assert vm_state(vm)["bitmaps"]["disk0"] == []


@cluster_env(node=pull_node(SENDENSE_NODE_MAX_RATE=str(4 * MiB)))
def test_two_vms_pulled_at_once_get_ports_of_their_own(cluster: Cluster, make_vm) -> None:
    c = cluster
    vms = [make_vm(f"pullpair{i}", [48 * MiB]) for i in range(2)]
    for i, vm in enumerate(vms):
        write_random(vm, 0, i * MiB, 16 * MiB)  # 4 s each at the node's rate
    c.register(*vms)
    jobs = [c.start_backup(vm.name, "full")["job_id"] for vm in vms]
    wait_for("both to be served at once", lambda: all(serving(c, j) for j in jobs))
    urls = set()
    for vm, job_id in zip(vms, jobs, strict=True):
        job = c.wait_job(job_id, timeout=60)
        assert job["status"] == "completed", job
        (b,) = backups_of(c, job)
        assert img.compare(b["file_path"], str(vm.disks[0])), b
        (disk,) = node_status(c, job_id)["disks"].values()
        urls.add(disk["pull_url"].rsplit("/", 1)[0])
    assert len(urls) == 2, urls  # one port each


def path_without_nbdkit(root: Path) -> str:
    """A PATH with every program of this one but nbdkit (links in ``root``)."""
    root.mkdir()
    dirs = [d for d in os.environ["PATH"].split(os.pathsep) if d]
    for d in filter(os.path.isdir, dirs):
        for e in os.scandir(d):
            if e.name != "nbdkit" and not (root / e.name).exists():
                (root / e.name).symlink_to(e.path)
    return str(root)


@pytest.fixture
def qemu_nbd_cluster(tmp_path: Path) -> Iterator[Cluster]:
    env = pull_node(PATH=path_without_nbdkit(tmp_path / "bin"))
    c = Cluster(tmp_path, node_env=env)
    c.start_node()
    c.start_hub()
    yield c
    c.stop()


def test_pull_through_qemu_nbd_where_nbdkit_is_missing(
    qemu_nbd_cluster: Cluster, make_vm, tmp_path: Path
) -> None:
    c = qemu_nbd_cluster
    vm = make_vm("pullqn", [32 * MiB])
    write_random(vm, 0, 0, 12 * MiB)
    c.register(vm)
    snap = raw_copy(vm.disks[0], tmp_path / "snap.raw")
    job = c.backup("pullqn", "full")
    assert job["status"] == "completed", job
    (b,) = backups_of(c, job)
    assert img.compare(b["file_path"], str(snap)) and b["digest"] == reference_digest(snap)
    log = (c.node_dir / "jobs" / job["job_id"] / "job.log").read_text()
    assert "disk=2000 serving the frozen view at nbds://" in log and "with qemu-nbd" in log, log
    assert not list((c.node_dir / "jobs" / job["job_id"]).glob("*tls*")), "key files left"


@cluster_env(hub={"SENDENSE_NBD_TLS": "false"})
def test_pull_without_tls_for_the_benchmark_round(cluster: Cluster, make_vm) -> None:
    """A hub with SENDENSE_NBD_TLS=false (the bench's no-TLS round) sends no
    key: the node serves plain NBD and the pull still makes the same point."""
    c = cluster
    vm = make_vm("pullplain", [32 * MiB])
    write_random(vm, 0, 0, 8 * MiB)
    c.register(vm)
    job = c.backup("pullplain", "full")
    assert job["status"] == "completed", job
    (b,) = backups_of(c, job)
    assert img.compare(b["file_path"], str(vm.disks[0])), b
    (disk,) = node_status(c, job["job_id"])["disks"].values()
    assert disk["pull_url"].startswith("nbd://127.0.0.1:"), disk
