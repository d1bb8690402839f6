"""DELETE /api/v1/backups/{id}: real restore points, checked on disk and in the API.

A restore point's image, sidecar and record go together; refusals (409
``has_dependents``, ``immutable``, ``in_use``) change nothing; a hub killed in
the middle of a delete finishes it at its next start.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fixtures.cluster import Cluster
from fixtures.lifecycle import (
    SLOW_NODE,
    MiB,
    by_disk,
    catalog_exec,
    chain_ids,
    chattr,
    cluster_env,
    error_body,
    lifecycle_cluster,
    point_files,
    repo_files,
    wait_for,
    write_random,
)
from sendense.qemu import img

BOTH = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


def three_points(c: Cluster, make_vm) -> tuple[object, list[dict]]:
    """A one-disk VM with a full and two incrementals (data changed before each)."""
    vm = make_vm("del1", [16 * MiB])
    c.register(vm)
    points = []
    for i, kind in enumerate(["full", "incremental", "incremental"]):
        write_random(vm, 0, i * 2 * MiB, MiB)
        points.append(by_disk(c, c.backup("del1", kind))[0])
    return vm, points


@pytest.mark.parametrize("cluster", BOTH, indirect=True)
def test_delete_leaf_removes_file_sidecar_and_record(cluster: Cluster, make_vm) -> None:
    vm, (full, inc1, inc2) = three_points(cluster, make_vm)
    assert all(p.exists() for p in point_files(inc2["file_path"])[:2])

    r = cluster.http("DELETE", f"/api/v1/backups/{inc2['backup_id']}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["deleted"] == [inc2["backup_id"]]
    assert body["freed_bytes"] >= inc2["size_on_disk"] > 0
    assert not any(p.exists() for p in point_files(inc2["file_path"]))
    error_body(cluster.http("GET", f"/api/v1/backups/{inc2['backup_id']}"), 404, "not_found")
    assert chain_ids(cluster, "del1", 0) == [full["backup_id"], inc1["backup_id"]]
    # gone for good: a second delete is a 404
    error_body(cluster.http("DELETE", f"/api/v1/backups/{inc2['backup_id']}"), 404)

    # the next backup restores exactly. The VM's change tracking follows the
    # newest restore point, which is gone: the node reads the whole disk.
    write_random(vm, 0, 9 * MiB, MiB)
    nxt = by_disk(cluster, cluster.backup("del1", "auto"))[0]
    assert nxt["parent_backup_id"] in (None, inc1["backup_id"])
    assert img.compare(nxt["file_path"], str(vm.disks[0]))


@pytest.mark.parametrize("cluster", BOTH, indirect=True)
def test_delete_with_dependents_is_refused_then_cascade_deletes_all(
    cluster: Cluster, make_vm
) -> None:
    _, (full, inc1, inc2) = three_points(cluster, make_vm)
    before = repo_files(cluster)

    body = error_body(
        cluster.http("DELETE", f"/api/v1/backups/{full['backup_id']}"), 409, "has_dependents"
    )
    assert body["details"]["dependents"] == [inc1["backup_id"], inc2["backup_id"]]
    body = error_body(
        cluster.http("DELETE", f"/api/v1/backups/{inc1['backup_id']}"), 409, "has_dependents"
    )
    assert body["details"]["dependents"] == [inc2["backup_id"]]
    assert repo_files(cluster) == before  # a refusal touches nothing

    r = cluster.http("DELETE", f"/api/v1/backups/{full['backup_id']}", params={"cascade": "true"})
    assert r.status_code == 200, r.text
    assert r.json()["deleted"] == [inc2["backup_id"], inc1["backup_id"], full["backup_id"]]
    assert repo_files(cluster) == []
    assert cluster.client.get("/api/v1/backups", vm_name="del1")["total"] == 0


def test_immutable_backups_are_refused_whole_cascade_checked_first(
    cluster: Cluster, make_vm
) -> None:
    _, (full, inc1, inc2) = three_points(cluster, make_vm)
    until = datetime.now(UTC) + timedelta(days=3)
    catalog_exec(
        cluster,
        "UPDATE backups SET immutable_until = :until WHERE id = :id",
        until=until,
        id=full["backup_id"],
    )
    before = repo_files(cluster)
    # the locked point is the oldest of the cascade: nothing newer goes either
    body = error_body(
        cluster.http("DELETE", f"/api/v1/backups/{full['backup_id']}", params={"cascade": "true"}),
        409,
        "immutable",
    )
    assert body["details"]["backup_id"] == full["backup_id"]
    assert datetime.fromisoformat(body["details"]["immutable_until"]) == until
    assert repo_files(cluster) == before
    assert {
        cluster.client.get(f"/api/v1/backups/{p['backup_id']}")["status"]
        for p in (full, inc1, inc2)
    } == {"completed"}

    # an expired lock is no lock
    catalog_exec(
        cluster,
        "UPDATE backups SET immutable_until = :until WHERE id = :id",
        until=datetime.now(UTC) - timedelta(seconds=1),
        id=full["backup_id"],
    )
    r = cluster.http("DELETE", f"/api/v1/backups/{full['backup_id']}", params={"cascade": "true"})
    assert r.status_code == 200, r.text


def test_file_with_the_immutable_attribute_is_a_409_not_a_500(cluster: Cluster, make_vm) -> None:
    _, (_, _, inc2) = three_points(cluster, make_vm)
    if not chattr(inc2["file_path"], "+i"):
        pytest.skip(
            "IMMUTABLE ATTRIBUTE UNTESTED: chattr +i is not supported here "
            "(filesystem or missing CAP_LINUX_IMMUTABLE)"
        )
    try:
        body = error_body(
            cluster.http("DELETE", f"/api/v1/backups/{inc2['backup_id']}"), 409, "immutable"
        )
        assert inc2["file_path"] in body["details"]["file"]
        assert Path(inc2["file_path"]).exists()
        assert cluster.client.get(f"/api/v1/backups/{inc2['backup_id']}")["status"] == "completed"
    finally:
        chattr(inc2["file_path"], "-i")
    r = cluster.http("DELETE", f"/api/v1/backups/{inc2['backup_id']}")
    assert r.status_code == 200, r.text


def test_expired_lock_whose_file_keeps_the_attribute_is_deleted(cluster: Cluster, make_vm) -> None:
    """Between a lock's end and the sweeper's next round the file still has
    the attribute: the delete lifts it itself instead of answering 409."""
    _, (_, _, inc2) = three_points(cluster, make_vm)
    if not chattr(inc2["file_path"], "+i"):
        pytest.skip(
            "IMMUTABLE ATTRIBUTE UNTESTED: chattr +i is not supported here "
            "(filesystem or missing CAP_LINUX_IMMUTABLE)"
        )
    catalog_exec(
        cluster,
        "UPDATE backups SET immutable_until = :until WHERE id = :id",
        until=datetime.now(UTC) - timedelta(seconds=1),
        id=inc2["backup_id"],
    )
    try:
        r = cluster.http("DELETE", f"/api/v1/backups/{inc2['backup_id']}")
        assert r.status_code == 200, r.text
        assert not Path(inc2["file_path"]).exists()
    finally:
        if Path(inc2["file_path"]).exists():
            chattr(inc2["file_path"], "-i")


@cluster_env(node=SLOW_NODE)
def test_parent_of_a_running_backup_is_in_use(cluster: Cluster, make_vm) -> None:
    vm = make_vm("busy1", [32 * MiB])
    cluster.register(vm)
    full = by_disk(cluster, cluster.backup("busy1", "full"))[0]
    write_random(vm, 0, 0, 24 * MiB)  # 8 s at the slow node's rate
    started = cluster.start_backup("busy1", "incremental")
    wait_for(
        "the incremental to copy",
        lambda: cluster.client.get(f"/api/v1/jobs/{started['job_id']}")["bytes_done"] > 0,
    )
    running = started["backups"][0]["backup_id"]
    for params in ({}, {"cascade": "true"}):
        body = error_body(
            cluster.http("DELETE", f"/api/v1/backups/{full['backup_id']}", params=params),
            409,
            "in_use",
        )
        assert body["details"]["backup_id"] == full["backup_id"]
        assert body["details"]["holders"][0]["holder_id"] == started["job_id"]
    # the point being written is not deleted either (cancel the job for that)
    error_body(cluster.http("DELETE", f"/api/v1/backups/{running}"), 409, "in_use")
    assert Path(full["file_path"]).exists()

    cluster.client.post(f"/api/v1/jobs/{started['job_id']}/cancel")
    job = cluster.wait_job(started["job_id"])
    assert job["status"] == "cancelled"
    # a cancelled backup is a record without a file: it can be deleted too
    r = cluster.http("DELETE", f"/api/v1/backups/{running}")
    assert r.status_code == 200, r.text
    assert r.json() == {"deleted": [running], "freed_bytes": 0}
    # and the hold ended with the job
    r = cluster.http("DELETE", f"/api/v1/backups/{full['backup_id']}")
    assert r.status_code == 200, r.text
    assert repo_files(cluster) == []


@pytest.mark.parametrize("cluster", BOTH, indirect=True)
def test_delete_interrupted_by_a_hub_crash_is_finished_at_restart(
    cluster: Cluster, make_vm
) -> None:
    _, (full, inc1, inc2) = three_points(cluster, make_vm)
    cluster.kill("hub")
    # as a kill -9 between "mark" and "drop" leaves them: rows "deleting",
    # the newest file already removed, the older one still there
    catalog_exec(
        cluster,
        "UPDATE backups SET status = 'deleting' WHERE id IN (:a, :b)",
        a=inc1["backup_id"],
        b=inc2["backup_id"],
    )
    Path(inc2["file_path"]).unlink()
    assert Path(inc1["file_path"]).exists()
    cluster.start_hub()

    for p in (inc1, inc2):
        assert not any(f.exists() for f in point_files(p["file_path"]))
        error_body(cluster.http("GET", f"/api/v1/backups/{p['backup_id']}"), 404)
    assert chain_ids(cluster, "del1", 0) == [full["backup_id"]]
    assert {f.name for f in repo_files(cluster)} == {
        Path(full["file_path"]).name,
        Path(full["file_path"]).with_suffix(".json").name,
    }
