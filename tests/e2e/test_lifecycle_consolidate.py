"""POST /api/v1/backups/consolidate: real chains merged, checked as a user would.

Before the merge every restore point is copied to a raw file (``qemu-img
convert -O raw``); afterwards every remaining point must ``qemu-img compare``
identical to its copy, and its recorded digest must equal the digest of that
copy computed from the documented definition (not by the mover's code).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fixtures.cluster import Cluster
from fixtures.lifecycle import (
    SLOW_NODE,
    MiB,
    by_disk,
    catalog_exec,
    cluster_env,
    error_body,
    lifecycle_cluster,
    point_files,
    raw_copy,
    reference_digest,
    repo_files,
    wait_for,
    write_random,
    write_zeroes,
)
from sendense.qemu import img

BOTH = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


def five_points(
    c: Cluster, make_vm, tmp_path: Path, name: str, sizes: list[int], change: int = MiB
) -> tuple[Any, dict[int, list[dict[str, Any]]], dict[str, Path]]:
    """A full and four incrementals of every disk; the raw copy of each point."""
    vm = make_vm(name, sizes)
    c.register(vm)
    chains: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(sizes))}
    for round_no in range(5):
        for disk, size in enumerate(sizes):
            write_random(vm, disk, (round_no * 3 * MiB) % (size - change), change)
            if round_no == 2:  # zeroes over data an older point holds
                write_zeroes(vm, disk, 0, 128 * 1024)
            write_random(vm, disk, size - 65536, 65536)  # the last cluster
        job = c.backup(name, "full" if round_no == 0 else "incremental")
        for disk, b in by_disk(c, job).items():
            chains[disk].append(b)
    raws = {
        b["backup_id"]: raw_copy(b["file_path"], tmp_path / f"{b['backup_id']}.raw")
        for points in chains.values()
        for b in points
    }
    return vm, chains, raws


def assert_reads_as_before(c: Cluster, point: dict[str, Any], raws: dict[str, Path]) -> None:
    now = c.client.get(f"/api/v1/backups/{point['backup_id']}")
    assert img.compare(now["file_path"], str(raws[point["backup_id"]])), now
    assert now["digest"] == point["digest"] == reference_digest(raws[point["backup_id"]])
    assert img.check(now["file_path"])["check-errors"] == 0


@pytest.mark.parametrize("cluster", BOTH, indirect=True)
def test_consolidate_keep_two_of_five(cluster: Cluster, make_vm, tmp_path: Path) -> None:
    vm, chains, raws = five_points(cluster, make_vm, tmp_path, "cons1", [16 * MiB, 8 * MiB])

    # a dry run answers the plan and changes nothing
    files_before = repo_files(cluster)
    r = cluster.http(
        "POST",
        "/api/v1/backups/consolidate",
        params={"dry_run": "true"},
        json={"vm_name": "cons1", "keep": 2},
    )
    assert r.status_code == 200, r.text
    plan = r.json()
    assert plan["dry_run"] is True
    assert len(plan["disks"]) == 2
    for d in plan["disks"]:
        points = chains[d["disk_id"]]
        assert d["new_base"]["backup_id"] == points[3]["backup_id"]
        assert [x["backup_id"] for x in d["remove"]] == [p["backup_id"] for p in points[:3]]
        assert d["chain_length_before"] == 5 and d["chain_length_after"] == 2
    assert repo_files(cluster) == files_before

    r = cluster.http("POST", "/api/v1/backups/consolidate", json={"vm_name": "cons1", "keep": 2})
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["job"]["kind"] == "consolidate"
    job = cluster.wait_job(started["job_id"])
    assert job["status"] == "completed", job
    assert job["percent"] == 100.0
    assert job["result"]["freed_bytes"] > 0

    chain = cluster.client.get("/api/v1/backups/cons1/chain")
    for d in chain["disks"]:
        points = chains[d["disk_id"]]
        kept, removed = points[3:], points[:3]
        assert d["chain_length"] == 2
        assert [x["backup_id"] for x in d["chain"]] == [p["backup_id"] for p in kept]
        base = cluster.client.get(f"/api/v1/backups/{kept[0]['backup_id']}")
        assert base["parent_backup_id"] is None
        assert base["backup_type"] == "full"
        assert base["synthetic"] is True
        assert base["file_path"] == kept[0]["file_path"]
        assert "backing-filename" not in img.info(base["file_path"])
        sidecar = json.loads(Path(base["file_path"]).with_suffix(".json").read_text())
        assert sidecar["backup_type"] == "full"
        assert sidecar["synthetic"] is True
        assert sidecar["parent_backup_id"] is None and sidecar["backing_file"] is None
        newest = cluster.client.get(f"/api/v1/backups/{kept[1]['backup_id']}")
        assert newest["parent_backup_id"] == base["backup_id"]
        for p in kept:
            assert_reads_as_before(cluster, p, raws)
        for p in removed:
            error_body(cluster.http("GET", f"/api/v1/backups/{p['backup_id']}"), 404)
            assert not any(f.exists() for f in point_files(p["file_path"]))
    # nothing else is left in the repository
    expected = {
        f.name
        for points in chains.values()
        for p in points[3:]
        for f in point_files(p["file_path"])[:2]
    }
    assert {f.name for f in repo_files(cluster)} == expected

    # the chain goes on: the next incremental builds on the merged chain
    write_random(vm, 0, 5 * MiB, MiB)
    nxt = by_disk(cluster, cluster.backup("cons1", "incremental"))
    for disk, b in nxt.items():
        assert b["parent_backup_id"] == chains[disk][4]["backup_id"]
        assert img.compare(b["file_path"], str(vm.disks[disk]))
    assert [
        d["chain_length"] for d in cluster.client.get("/api/v1/backups/cons1/chain")["disks"]
    ] == [3, 3]


def test_consolidate_by_chain_id_down_to_one(cluster: Cluster, make_vm, tmp_path: Path) -> None:
    _, chains, raws = five_points(cluster, make_vm, tmp_path, "cons2", [8 * MiB, 8 * MiB])
    disk1 = chains[1]
    job = cluster.client.post(
        "/api/v1/backups/consolidate", {"chain_id": disk1[2]["backup_id"], "keep": 1}
    )
    assert cluster.wait_job(job["job_id"])["status"] == "completed"
    # only that chain: disk 1 is now one synthetic full, disk 0 untouched
    chain = {d["disk_id"]: d for d in cluster.client.get("/api/v1/backups/cons2/chain")["disks"]}
    assert [x["backup_id"] for x in chain[1]["chain"]] == [disk1[4]["backup_id"]]
    assert chain[1]["chain"][0]["synthetic"] is True
    assert chain[0]["chain_length"] == 5
    assert_reads_as_before(cluster, disk1[4], raws)
    for p in chains[0]:
        assert_reads_as_before(cluster, p, raws)

    # nothing left to merge: the job completes having done nothing
    again = cluster.client.post(
        "/api/v1/backups/consolidate", {"vm_name": "cons2", "disk_id": 1, "keep": 1}
    )
    done = cluster.wait_job(again["job_id"])
    assert done["status"] == "completed" and done["result"]["disks"] == []


def test_consolidate_refuses_locked_and_bad_requests(
    cluster: Cluster, make_vm, tmp_path: Path
) -> None:
    _, chains, raws = five_points(cluster, make_vm, tmp_path, "cons3", [8 * MiB])
    points = chains[0]
    until = datetime.now(UTC) + timedelta(days=1)
    catalog_exec(
        cluster,
        "UPDATE backups SET immutable_until = :until WHERE id = :id",
        until=until,
        id=points[1]["backup_id"],
    )
    files_before = repo_files(cluster)
    body = error_body(
        cluster.http("POST", "/api/v1/backups/consolidate", json={"vm_name": "cons3", "keep": 2}),
        409,
        "immutable",
    )
    assert body["details"]["backup_id"] == points[1]["backup_id"]
    assert points[1]["backup_id"] in body["message"]
    assert repo_files(cluster) == files_before
    assert {cluster.client.get(f"/api/v1/backups/{p['backup_id']}")["status"] for p in points} == {
        "completed"
    }
    # a lock on a point that stays is no obstacle: keep=4 only merges P1 into P2 ... no:
    # P2 would become the base (its file replaced), so that is refused too
    error_body(
        cluster.http("POST", "/api/v1/backups/consolidate", json={"vm_name": "cons3", "keep": 4}),
        409,
        "immutable",
    )
    # a lock on the newest points only: merging the oldest two is allowed
    catalog_exec(
        cluster,
        "UPDATE backups SET immutable_until = NULL WHERE id = :id",
        id=points[1]["backup_id"],
    )
    catalog_exec(
        cluster,
        "UPDATE backups SET immutable_until = :until WHERE id = :id",
        until=until,
        id=points[4]["backup_id"],
    )
    job = cluster.client.post("/api/v1/backups/consolidate", {"vm_name": "cons3", "keep": 4})
    assert cluster.wait_job(job["job_id"])["status"] == "completed"
    for p in points[1:]:
        assert_reads_as_before(cluster, p, raws)

    for bad, field in [
        ({"vm_name": "cons3", "keep": 0}, "keep"),
        ({"vm_name": "cons3"}, "keep"),
        ({"keep": 1}, "body"),
        ({"vm_name": "cons3", "chain_id": points[4]["backup_id"], "keep": 1}, "body"),
        ({"vm_name": "cons3", "keep": 2**40}, "keep"),
    ]:
        body = error_body(
            cluster.http("POST", "/api/v1/backups/consolidate", json=bad), 400, "invalid_request"
        )
        assert field in body["details"]["fields"], body
    error_body(
        cluster.http("POST", "/api/v1/backups/consolidate", json={"vm_name": "nope", "keep": 1}),
        404,
    )
    error_body(
        cluster.http(
            "POST",
            "/api/v1/backups/consolidate",
            json={"vm_name": "cons3", "disk_id": 5, "keep": 1},
        ),
        400,
    )


@cluster_env(node=SLOW_NODE)
def test_consolidate_refused_while_a_backup_reads_the_chain(cluster: Cluster, make_vm) -> None:
    vm = make_vm("cons4", [32 * MiB])
    cluster.register(vm)
    cluster.backup("cons4", "full")
    write_random(vm, 0, 0, MiB)
    cluster.backup("cons4", "incremental")
    write_random(vm, 0, 0, 24 * MiB)
    started = cluster.start_backup("cons4", "incremental")
    wait_for(
        "the incremental to copy",
        lambda: cluster.client.get(f"/api/v1/jobs/{started['job_id']}")["bytes_done"] > 0,
    )
    body = error_body(
        cluster.http("POST", "/api/v1/backups/consolidate", json={"vm_name": "cons4", "keep": 1}),
        409,
        "in_use",
    )
    assert body["details"]["holders"][0]["holder_id"] == started["job_id"]
    cluster.client.post(f"/api/v1/jobs/{started['job_id']}/cancel")
    assert cluster.wait_job(started["job_id"])["status"] == "cancelled"


@cluster_env(hub={"SENDENSE_MERGE_RATE": str(2 * MiB)})
@pytest.mark.parametrize("cluster", BOTH, indirect=True)
def test_hub_killed_mid_merge_rolls_forward_at_restart(
    cluster: Cluster, make_vm, tmp_path: Path
) -> None:
    # 4 increments of 6 MiB: at 2 MiB/s the merge takes ~10 s
    _, chains, raws = five_points(cluster, make_vm, tmp_path, "cons5", [32 * MiB], change=6 * MiB)
    points = chains[0]
    started = cluster.client.post("/api/v1/backups/consolidate", {"vm_name": "cons5", "keep": 1})
    job_id = started["job_id"]
    wait_for(
        "the merge to be under way",
        lambda: cluster.client.get(f"/api/v1/jobs/{job_id}")["result"].get("started_disks"),
    )
    time.sleep(1.0)
    # mid-merge the points being merged are no restore points any more
    statuses = {
        p["backup_id"]: cluster.client.get(f"/api/v1/backups/{p['backup_id']}")["status"]
        for p in points
    }
    assert [statuses[p["backup_id"]] for p in points] == ["merging"] * 4 + ["completed"]
    cluster.kill("hub")
    # the merge died with the hub (no qemu-img left holding the images)
    assert not [p for p in os.popen("pgrep -a qemu-img").read().splitlines() if str(tmp_path) in p]
    # killed mid-merge: the point that stays still has its backing chain ...
    assert "backing-filename" in img.info(points[4]["file_path"])
    # ... and reads as before
    assert img.compare(points[4]["file_path"], str(raws[points[4]["backup_id"]]))

    cluster.start_hub()
    job = cluster.client.get(f"/api/v1/jobs/{job_id}")
    assert job["status"] == "failed"
    assert job["error"]["code"] == "hub_restarted"
    assert "consistent" in job["error"]["message"]
    chain = cluster.client.get("/api/v1/backups/cons5/chain")["disks"][0]
    assert [x["backup_id"] for x in chain["chain"]] == [points[4]["backup_id"]]
    assert chain["chain"][0]["synthetic"] is True
    assert_reads_as_before(cluster, points[4], raws)
    for p in points[:4]:
        error_body(cluster.http("GET", f"/api/v1/backups/{p['backup_id']}"), 404)
    assert {f.name for f in repo_files(cluster)} == {
        f.name for f in point_files(points[4]["file_path"])[:2]
    }


@cluster_env(hub={"SENDENSE_MERGE_RATE": str(2 * MiB)})
def test_backup_while_its_vm_is_being_consolidated_is_refused(
    cluster: Cluster, make_vm, tmp_path: Path
) -> None:
    """The merge holds QEMU's write lock on the chain: a backup started then is
    a clean 409 ``disk_busy`` naming the merge, not a failed job."""
    _, chains, raws = five_points(cluster, make_vm, tmp_path, "cons6", [32 * MiB], change=6 * MiB)
    started = cluster.client.post("/api/v1/backups/consolidate", {"vm_name": "cons6", "keep": 1})
    job_id = started["job_id"]
    wait_for(
        "the merge to be under way",
        lambda: cluster.client.get(f"/api/v1/jobs/{job_id}")["result"].get("started_disks"),
    )
    jobs_before = cluster.client.get("/api/v1/jobs", limit=1000)["total"]
    body = error_body(
        cluster.http(
            "POST",
            "/api/v1/backups",
            json={"vm_name": "cons6", "repository_id": "default", "backup_type": "auto"},
        ),
        409,
        "disk_busy",
    )
    assert body["details"]["job_id"] == job_id
    assert cluster.client.get("/api/v1/jobs", limit=1000)["total"] == jobs_before
    assert cluster.wait_job(job_id, timeout=120)["status"] == "completed"
    assert_reads_as_before(cluster, chains[0][4], raws)
    # afterwards the next backup goes on from the synthetic base
    assert cluster.backup("cons6", "incremental")["status"] == "completed"
