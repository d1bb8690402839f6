"""Per-node job limits and the queue, through real hub and node processes.

A node limited to one job at a time (``max_jobs`` 1, set through the API)
and a node throttled (``SENDENSE_NODE_MAX_RATE``) so that a backup lasts
long enough for the next requests to find the node busy:

- three VMs: the second and third backups are queued (step ``queued``, with
  the reason, no restore point or target yet), run one after another, and
  every restore point compares identical to its VM's disk (SQLite and
  PostgreSQL);
- a queued job is cancelled: nothing on disk, nothing in the catalog but the
  cancelled job, and the VM's next backup works; a second backup of a busy
  VM is 409 ``disk_busy`` unless the request asks to queue;
- fairness: five requests for one VM do not delay another VM's single
  request behind all five;
- two hub processes on one PostgreSQL catalog each claim queued jobs, and
  every job starts exactly once; a job queued on a hub that is then killed
  (SIGKILL) is claimed and run by the other hub.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from fixtures.cluster import Cluster, cli
from sendense.qemu import img

MiB = 1 << 20
# 8 MiB of data at 2 MiB/s: a full lasts about 4 s, longer than a few
# requests take on a loaded machine.
SLOW_NODE = {"SENDENSE_NODE_MAX_RATE": str(2 * MiB), "SENDENSE_NODE_REQUEST_SIZE": str(MiB)}
QUEUED_REASON = "waiting for node node1: 1 of 1 jobs running"


def dbs(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if getattr(request, "param", "sqlite") == "sqlite":
        return ""
    server = request.getfixturevalue("pg_server")
    return str(server.create_database(f"dq_{uuid.uuid4().hex[:10]}"))


@pytest.fixture
def limited(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A hub and a slow node (parametrize indirectly: "sqlite"/"postgresql")."""
    c = Cluster(tmp_path, dbs(request, tmp_path), node_env=dict(SLOW_NODE))
    c.start_node()
    c.start_hub()
    try:
        yield c
    finally:
        c.stop()


def vm_with_data(make_vm: Callable[..., Any], name: str, data: int = 8 * MiB) -> Any:
    """A VM with ``data`` random bytes: a full of it lasts data / 2 MiB/s."""
    vm = make_vm(name, [data + 8 * MiB])
    g = vm.guest(0)
    g.pwrite(os.urandom(data), 4 * MiB)
    g.flush()
    g.shutdown()
    return vm


def limit_node(c: Cluster, node_id: str, max_jobs: int | None) -> dict[str, Any]:
    r = c.http("PATCH", f"/api/v1/nodes/{node_id}", json={"max_jobs": max_jobs})
    assert r.status_code == 200, r.text
    node: dict[str, Any] = r.json()
    return node


def jobs(c: Cluster, ids: list[str]) -> list[dict[str, Any]]:
    return [c.wait_job(j, timeout=180) for j in ids]


def never_two_at_once(done: list[dict[str, Any]]) -> None:
    ordered = sorted(done, key=lambda j: j["started_at"])
    for before, after in itertools.pairwise(ordered):
        assert before["finished_at"] <= after["started_at"], (before, after)


def compare_points(c: Cluster, job: dict[str, Any], vm: Any) -> None:
    assert job["status"] == "completed", job
    for bid in job["backups"]:
        b = c.client.get(f"/api/v1/backups/{bid}")
        assert b["status"] == "completed"
        assert img.compare(b["file_path"], str(vm.disks[b["disk_id"]]))


@pytest.mark.parametrize("limited", ["sqlite", "postgresql"], indirect=True)
def test_node_limit_one_three_vms_queue_and_run_in_turn(limited: Cluster, make_vm) -> None:  # type: ignore[no-untyped-def]
    c = limited
    # q0 holds the slot (about 8 s) while the other two are asked.
    vms = [vm_with_data(make_vm, f"q{i}", (16 if i == 0 else 8) * MiB) for i in range(3)]
    node_id = c.register(*vms)["node"]["node_id"]
    node = limit_node(c, node_id, 1)
    assert (node["max_jobs"], node["job_limit"]) == (1, 1)

    answers = [c.start_backup(f"q{i}", "full") for i in range(3)]
    assert answers[0]["job"]["step"] != "queued"
    for a in answers[1:]:
        job = a["job"]
        assert (a["status"], job["step"]) == ("pending", "queued"), a
        assert job["params"]["queue"]["reason"] == QUEUED_REASON
        assert f"queued: {QUEUED_REASON}" in job["messages"]
        assert a["backups"] == [] and job["backups"] == []  # no target, no file yet
    node = c.client.get(f"/api/v1/nodes/{node_id}")
    assert (node["jobs_running"], node["jobs_queued"]) == (1, 2), node

    done = jobs(c, [a["job_id"] for a in answers])
    assert [j["status"] for j in done] == ["completed"] * 3, done
    never_two_at_once(done)
    ordered = sorted(done, key=lambda j: j["started_at"])
    gaps = [
        (datetime.fromisoformat(b["started_at"]) - datetime.fromisoformat(a["finished_at"]))
        for a, b in itertools.pairwise(ordered)
    ]
    # A slot freed to the next job running on the node: claim, plan, targets, node start.
    print("slot_to_running_s=" + ",".join(f"{g.total_seconds():.2f}" for g in gaps))
    assert all(g.total_seconds() < 10 for g in gaps), gaps
    # Same VM history (none), so the order of the requests.
    assert [j["vm_name"] for j in sorted(done, key=lambda j: j["started_at"])] == ["q0", "q1", "q2"]
    for job, vm in zip(done, vms, strict=True):
        compare_points(c, job, vm)
    assert "started after" in " ".join(done[2]["messages"])
    node = c.client.get(f"/api/v1/nodes/{node_id}")
    assert (node["jobs_running"], node["jobs_queued"]) == (0, 0)


@pytest.mark.parametrize("limited", ["sqlite", "postgresql"], indirect=True)
def test_cancel_a_queued_job_and_disk_busy_unless_asked_to_queue(limited: Cluster, make_vm) -> None:  # type: ignore[no-untyped-def]
    c = limited
    # c0 holds the slot (about 12 s) while the requests below are made.
    vms = [vm_with_data(make_vm, "c0", 24 * MiB), vm_with_data(make_vm, "c1")]
    node_id = c.register(*vms)["node"]["node_id"]
    limit_node(c, node_id, 1)
    first = c.start_backup("c0", "full")
    queued = c.start_backup("c1", "full")
    assert queued["job"]["step"] == "queued"

    # The same VM again: refused, as before, unless asked to queue.
    r = c.http(
        "POST",
        "/api/v1/backups",
        json={"vm_name": "c0", "repository_id": "default", "backup_type": "full"},
    )
    body = r.json()
    assert (r.status_code, body["error"]) == (409, "disk_busy"), r.text
    assert body["details"]["job_id"] == first["job_id"], body
    assert "one job per VM" in body["message"]
    behind = c.start_backup("c0", "auto", queue=True)
    assert behind["job"]["step"] == "queued"
    assert behind["job"]["params"]["queue"]["reason"].startswith("waiting for VM c0: ")

    r = c.http("POST", f"/api/v1/jobs/{queued['job_id']}/cancel")
    assert r.status_code == 202, r.text
    cancelled = r.json()
    assert cancelled["status"] == "cancelled" and cancelled["error"]["code"] == "cancelled"
    assert c.wait_job(queued["job_id"])["status"] == "cancelled"
    assert c.client.get("/api/v1/backups", vm_name="c1")["total"] == 0
    repo = c.client.get("/api/v1/repositories/default")
    assert not (Path(repo["path"]) / "c1").exists()  # nothing on disk

    done = jobs(c, [first["job_id"], behind["job_id"]])
    assert [j["status"] for j in done] == ["completed", "completed"], done
    never_two_at_once(done)
    compare_points(c, done[0], vms[0])
    compare_points(c, done[1], vms[0])
    # The cancelled one never ran; the VM's next backup does.
    again = c.backup("c1", "auto")
    compare_points(c, again, vms[1])
    assert again["disks"][0]["backup_type"] == "full"


@pytest.mark.parametrize("limited", ["sqlite", "postgresql"], indirect=True)
def test_fairness_five_requests_of_one_vm_do_not_delay_another_vm(
    limited: Cluster, make_vm
) -> None:  # type: ignore[no-untyped-def]
    c = limited
    vms = [vm_with_data(make_vm, "busy", 16 * MiB), vm_with_data(make_vm, "single")]
    node_id = c.register(*vms)["node"]["node_id"]
    limit_node(c, node_id, 1)
    many = [c.start_backup("busy", "full", queue=True)["job_id"] for _ in range(5)]
    single = c.start_backup("single", "full")["job_id"]
    done = jobs(c, [*many, single])
    assert [j["status"] for j in done] == ["completed"] * 6, done
    never_two_at_once(done)
    order = [j["job_id"] for j in sorted(done, key=lambda j: j["started_at"])]
    # The VM with one request goes right after the busy VM's first job (its
    # last backup started longer ago: never), not behind all five.
    assert order == [many[0], single, *many[1:]], order
    compare_points(c, done[-1], vms[1])
    compare_points(c, done[4], vms[0])


def test_max_jobs_is_validated_and_the_cli_says_queued(limited: Cluster, make_vm) -> None:  # type: ignore[no-untyped-def]
    c = limited
    # v0 holds the slot (about 12 s) while the CLI (slow to start) asks.
    vms = [vm_with_data(make_vm, "v0", 24 * MiB), vm_with_data(make_vm, "v1")]
    node_id = c.register(*vms)["node"]["node_id"]
    for bad in (0, -1, 1001, "four", "3", 2.5, True):
        r = c.http("PATCH", f"/api/v1/nodes/{node_id}", json={"max_jobs": bad})
        body = r.json()
        assert (r.status_code, body["error"]) == (400, "invalid_request"), r.text
        assert "max_jobs" in body["message"], body
    r = c.http("POST", "/api/v1/nodes", json=c.node_body("other", max_jobs=0))
    assert r.status_code == 400 and "max_jobs" in r.json()["message"], r.text
    r = c.http("PATCH", "/api/v1/nodes/nope", json={"max_jobs": 2})
    assert r.status_code == 404, r.text
    r = c.http("PATCH", f"/api/v1/nodes/{node_id}", json={"max_jobs": 2}, token=None)
    assert r.status_code == 401
    node = c.client.get(f"/api/v1/nodes/{node_id}")
    assert (node["max_jobs"], node["job_limit"]) == (None, 4)  # nothing changed: the default
    limit_node(c, node_id, 1)
    # Back to the default with null.
    assert limit_node(c, node_id, None)["job_limit"] == 4
    edited = cli(c, "node", "edit", "node1", "--max-jobs", "1")
    assert "job limit 1" in edited.stdout, edited.stdout
    bad = cli(c, "node", "edit", "node1", "--max-jobs", "lots", ok=False)
    assert "--max-jobs must be a number or 'default'" in bad.stderr + bad.stdout

    first = cli(c, "backup", "start", "v0", "--type", "full")
    assert "started" in first.stdout
    second = cli(c, "backup", "start", "v1", "--type", "full")
    assert f"queued: {QUEUED_REASON}" in second.stdout, second.stdout
    [listed] = json.loads(cli(c, "--json", "node", "ls").stdout)["nodes"]
    # (the CLI is slow to start on a loaded machine: v1 may have started by now)
    assert (listed["max_jobs"], listed["job_limit"], listed["jobs_running"]) == (1, 1, 1)
    busy = cli(c, "backup", "start", "v0", ok=False)
    assert "disk_busy" in busy.stdout + busy.stderr
    behind = cli(c, "--json", "backup", "start", "v0", "--queue")
    answer = json.loads(behind.stdout)
    assert answer["job"]["step"] == "queued"
    ids = [j["job_id"] for j in c.client.get("/api/v1/jobs", kind="backup")["jobs"]]
    assert len(ids) == 3
    done = jobs(c, ids)
    assert [j["status"] for j in done] == ["completed"] * 3, done
    never_two_at_once(done)


def test_queued_jobs_survive_a_hub_restart(limited: Cluster, make_vm) -> None:  # type: ignore[no-untyped-def]
    """SQLite, one hub killed (SIGKILL) with one job running and one queued:
    the restarted hub resolves the running one and runs the queued one (not
    failed as an orphan)."""
    c = limited
    vms = [vm_with_data(make_vm, n) for n in ("r0", "r1")]
    node_id = c.register(*vms)["node"]["node_id"]
    limit_node(c, node_id, 1)
    first = c.start_backup("r0", "full")
    waiting = c.start_backup("r1", "full")
    assert waiting["job"]["step"] == "queued"
    c.kill("hub")
    c.start_hub()
    ended = c.wait_job(first["job_id"], timeout=180)
    assert ended["status"] in ("completed", "failed"), ended
    done = c.wait_job(waiting["job_id"], timeout=180)
    assert done["status"] == "completed", done
    assert not done["error"]
    compare_points(c, done, vms[1])
    compare_points(c, c.backup("r0", "auto"), vms[0])


# ------------------------------------------------------------ two hubs


@pytest.fixture
def two_hubs(pg_server, tmp_path: Path) -> Iterator[tuple[Cluster, Cluster]]:  # type: ignore[no-untyped-def]
    """Hub A with the slow node, hub B on the same PostgreSQL catalog and
    repository. Dispatch passes are rare (60 s): a hub claims when one of its
    own jobs ends, so which hub claims is known."""
    url = str(pg_server.create_database(f"dq2_{uuid.uuid4().hex[:10]}"))
    env = {"SENDENSE_DISPATCH_INTERVAL": "60", "SENDENSE_JOB_LEASE": "3"}
    a = Cluster(tmp_path / "a", url, hub_env=env, node_env=dict(SLOW_NODE))
    b = Cluster(tmp_path / "b", url, hub_env=dict(env))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a.start_node()
    a.start_hub()
    b.hub_dir.mkdir(parents=True)
    shutil.copy2(a.hub_dir / "secret.key", b.hub_dir / "secret.key")
    b.start_hub()
    try:
        yield a, b
    finally:
        b.stop()
        a.stop()


def claims(c: Cluster, job_id: str) -> int:
    return c.log("hub").count(f"job={job_id} claimed from the queue")


@pytest.mark.postgres
def test_two_hubs_each_claim_queued_jobs_and_each_job_starts_once(
    two_hubs: tuple[Cluster, Cluster], make_vm
) -> None:  # type: ignore[no-untyped-def]
    a, b = two_hubs
    # t0 and t1 hold both slots (about 8 s) while the others are asked.
    vms = [vm_with_data(make_vm, f"t{i}", (16 if i < 2 else 8) * MiB) for i in range(6)]
    node_id = a.register(*vms)["node"]["node_id"]
    limit_node(a, node_id, 2)
    # Alternate hubs: t0 runs on A, t1 on B, t2..t5 wait.
    answers = [(a if i % 2 == 0 else b).start_backup(f"t{i}", "full") for i in range(6)]
    assert [x["job"]["step"] == "queued" for x in answers] == [False, False] + [True] * 4
    ids = [x["job_id"] for x in answers]
    done = jobs(a, ids)
    assert [j["status"] for j in done] == ["completed"] * 6, done
    for job, vm in zip(done, vms, strict=True):
        compare_points(a, job, vm)
    queued = ids[2:]
    by_a = [j for j in queued if claims(a, j)]
    by_b = [j for j in queued if claims(b, j)]
    assert all(claims(a, j) + claims(b, j) == 1 for j in queued), (by_a, by_b)
    assert by_a and by_b, (by_a, by_b)  # both hubs claimed
    # Started once: a second launch of a job would have planned it twice.
    assert [len(j["backups"]) for j in done] == [1] * 6
    # Never more than two at once on the node.
    events = sorted(
        [(j["started_at"], 1) for j in done] + [(j["finished_at"], -1) for j in done],
        key=lambda e: (e[0], e[1]),
    )
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2
    print(f"claimed by A: {len(by_a)}, by B: {len(by_b)}")


@pytest.mark.postgres
def test_a_job_queued_on_a_hub_that_died_is_claimed_by_the_other(
    two_hubs: tuple[Cluster, Cluster], make_vm
) -> None:  # type: ignore[no-untyped-def]
    a, b = two_hubs
    vms = [vm_with_data(make_vm, n) for n in ("k0", "k1")]
    node_id = a.register(*vms)["node"]["node_id"]
    limit_node(a, node_id, 1)
    first = a.start_backup("k0", "full")
    waiting = a.start_backup("k1", "full")
    assert waiting["job"]["step"] == "queued"
    a.kill("hub")  # SIGKILL: A never ends its job nor claims the queued one
    # B takes k0 over once A's lease ran out (adopted or failed), then
    # claims k1 when the slot frees.
    ended = b.wait_job(first["job_id"], timeout=180)
    assert ended["status"] in ("completed", "failed"), ended
    done = b.wait_job(waiting["job_id"], timeout=180)
    assert done["status"] == "completed", done
    assert claims(b, waiting["job_id"]) == 1
    compare_points(b, done, vms[1])
    if ended["status"] == "completed":
        compare_points(b, ended, vms[0])
    # The next backup of k0 works whatever happened to the first.
    compare_points(b, b.backup("k0", "auto"), vms[0])
