"""The hub serves its API from several processes (hub/serve.py).

What a user relies on: every answer is as new as the catalog whichever
process gives it (lists, totals and ``/vms`` are reused while the catalog is
unchanged, catalog/cache.py), and a hub that dies, even by ``kill -9``,
leaves no worker behind holding its port.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fixtures.cluster import Cluster
from fixtures.lifecycle import write_random
from sendense.qemu.qsd import QsdVm

MiB = 1 << 20
WORKERS = 3


def workers_of(pid: int) -> list[int]:
    """Pids of the hub's API worker processes (its children running hub/serve.py)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = stat.read_text().rsplit(")", 1)[1].split()[1]
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == str(pid) and b"sendense.hub.serve" in cmdline:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, hub_env={"SENDENSE_API_WORKERS": str(WORKERS)})
    c.start_node()
    c.start_hub()
    yield c
    c.stop()


def wait_workers(c: Cluster, n: int, timeout: float = 30) -> list[int]:
    assert c.hub is not None
    deadline = time.monotonic() + timeout
    while len(pids := workers_of(c.hub.pid)) < n:
        assert time.monotonic() < deadline, f"{len(pids)} of {n} workers after {timeout}s"
        time.sleep(0.2)
    return pids


def test_a_killed_hub_leaves_no_worker_and_frees_its_port(hub: Cluster) -> None:
    pids = wait_workers(hub, WORKERS - 1)
    assert hub.http("GET", "/api/v1/health").status_code == 200

    hub.kill("hub", signal.SIGKILL)

    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "workers outlived their hub"
    assert not listening(hub.hub_port), "a dead hub's port still answers"

    hub.start_hub()  # the same port, at once
    wait_workers(hub, WORKERS - 1)
    assert hub.http("GET", "/api/v1/health").status_code == 200


def test_a_stopped_hub_stops_its_workers(hub: Cluster) -> None:
    pids = wait_workers(hub, WORKERS - 1)
    hub.stop()
    assert not [p for p in pids if alive(p)]
    assert not listening(hub.hub_port)


def test_a_worker_that_dies_alone_is_started_again(hub: Cluster) -> None:
    (victim, *_) = wait_workers(hub, WORKERS - 1)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while victim in workers_of(hub.hub.pid) or len(workers_of(hub.hub.pid)) < WORKERS - 1:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the dead worker was not replaced"
        time.sleep(0.2)
    assert "exited with -9: starting it again" in hub.log("hub")


def test_every_worker_answers_with_the_newest_catalog(
    hub: Cluster, make_vm: Callable[..., QsdVm]
) -> None:
    """After each backup, totals, lists and /vms from fresh connections (the
    kernel spreads them over the workers) all show it: no worker answers
    from an older catalog."""
    wait_workers(hub, WORKERS - 1)
    vm = make_vm("fresh", [16 * MiB])
    hub.register(vm)
    # Warm every worker's cache with the empty answers first.
    for _ in range(3 * WORKERS):
        assert hub.http("GET", "/api/v1/backups?vm_name=fresh").json()["total"] == 0
        assert hub.http("GET", "/api/v1/vms").json()["vms"][0]["last_backup"] is None
    for n in range(1, 4):
        write_random(vm, 0, (n - 1) * MiB, MiB)
        job = hub.backup("fresh", "auto")
        (newest,) = job["backups"]
        for _ in range(3 * WORKERS):
            listed = hub.http("GET", "/api/v1/backups?vm_name=fresh").json()
            assert listed["total"] == n
            assert listed["backups"][0]["backup_id"] == newest
            (shown,) = hub.http("GET", "/api/v1/vms").json()["vms"]
            assert shown["last_backup"]["backup_id"] == newest
            jobs = hub.http("GET", "/api/v1/jobs?limit=1").json()
            assert jobs["jobs"][0]["job_id"] == job["job_id"]
            assert jobs["jobs"][0]["status"] == "completed"
