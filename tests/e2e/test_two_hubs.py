"""Two hub processes on one PostgreSQL catalog: a job belongs to the hub that
started it (owner and lease). The other hub never recovers, cancels or
finishes it on its own; it passes a cancel on through the catalog, and takes
the job over only once its owner is gone.
"""

from __future__ import annotations

import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cluster import Cluster
from fixtures.processes import busy_ports, processes_under
from sendense.qemu import img

pytestmark = pytest.mark.postgres

MiB = 1 << 20
SLOW_NODE = {"SENDENSE_NODE_MAX_RATE": str(3 * MiB), "SENDENSE_NODE_REQUEST_SIZE": str(MiB)}
LEASE = {"SENDENSE_JOB_LEASE": "3"}


@pytest.fixture
def hubs(pg_server, tmp_path: Path) -> Iterator[tuple[Cluster, Cluster]]:  # type: ignore[no-untyped-def]
    """Hub A with a slow node, and hub B on the same catalog and repository."""
    url = str(pg_server.create_database(f"two_{uuid.uuid4().hex[:10]}"))
    a = Cluster(tmp_path / "a", url, hub_env=LEASE, node_env=SLOW_NODE)
    b = Cluster(tmp_path / "b", url, hub_env=LEASE)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a.start_node()
    a.start_hub()
    # Hubs sharing a catalog share the key that encrypts its credentials.
    b.hub_dir.mkdir(parents=True)
    shutil.copy2(a.hub_dir / "secret.key", b.hub_dir / "secret.key")
    try:
        yield a, b
    finally:
        b.stop()
        a.stop()


def wait_copying(c: Cluster, job_id: str) -> None:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = c.client.get(f"/api/v1/jobs/{job_id}")
        assert job["status"] in ("pending", "running"), job
        if job["bytes_done"] >= MiB:
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not start copying")


def write_random(vm, offset: int, length: int) -> None:  # type: ignore[no-untyped-def]
    import os

    h = vm.guest(0)
    h.pwrite(os.urandom(length), offset)
    h.flush()
    h.shutdown()


def test_second_hub_leaves_a_running_job_alone_and_cancel_goes_through_its_owner(
    hubs: tuple[Cluster, Cluster], make_vm
) -> None:
    a, b = hubs
    vm = make_vm("shared1", [64 * MiB])
    write_random(vm, 0, 16 * MiB)
    a.register(vm)
    started = a.start_backup("shared1", "full")
    job_id = started["job_id"]
    wait_copying(a, job_id)

    b.start_hub()  # its start-up recovery must not touch A's job
    seen = b.client.get(f"/api/v1/jobs/{job_id}")
    assert seen["status"] == "running", seen
    assert f"job={job_id}" not in b.log("hub")  # B's engine never acted on it

    r = b.http("POST", f"/api/v1/jobs/{job_id}/cancel")
    assert r.status_code == 202, r.text
    # B's long-poll ends when A's monitor finishes the job (catalog re-reads).
    job = b.client.get(f"/api/v1/jobs/{job_id}", wait=20)
    assert job["status"] == "cancelled", job
    (bid,) = job["backups"]
    assert not Path(b.client.get(f"/api/v1/backups/{bid}")["file_path"]).exists()
    assert not [p for p in processes_under(a.root) if "qemu-nbd" in p[1]]
    assert not busy_ports(a.nbd_first, a.nbd_last)


def test_a_job_of_a_dead_hub_is_taken_over_by_the_other_and_completes(
    hubs: tuple[Cluster, Cluster], make_vm
) -> None:
    a, b = hubs
    vm = make_vm("shared2", [64 * MiB])
    write_random(vm, 0, 12 * MiB)
    a.register(vm)
    b.start_hub()
    started = a.start_backup("shared2", "full")
    job_id = started["job_id"]
    wait_copying(a, job_id)
    a.kill("hub", signal.SIGKILL)  # its targets and the node go on copying

    job = b.wait_job(job_id, timeout=90)
    assert job["status"] == "completed", job
    (bid,) = job["backups"]
    backup = b.client.get(f"/api/v1/backups/{bid}")
    assert img.compare(backup["file_path"], str(vm.disks[0]))
    # Taken over on a lease tick ("took over"), or by one of b's API worker
    # processes that was still starting when a died ("left running by a
    # previous hub"): either way b says so.
    log = b.log("hub")
    assert "took over" in log or "left running by a previous hub" in log, log[-2000:]
    assert not [p for p in processes_under(a.root) if "qemu-nbd" in p[1]]
