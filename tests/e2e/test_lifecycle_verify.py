"""POST /api/v1/backups/{id}/verify: real restore points, real corruption.

The reference digest of a restore point is computed here from a raw copy
(``qemu-img convert -O raw``) with the documented definition, never by the
mover's code. Corruption is made the way a disk or a careless admin would:
bytes flipped inside a data cluster of the image file (found with ``qemu-img
map``), and a QCOW2 refcount block overwritten.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.cluster import Cluster
from fixtures.lifecycle import (
    BLOCK,
    MiB,
    by_disk,
    catalog_exec,
    error_body,
    lifecycle_cluster,
    raw_copy,
    reference_digest,
    write_random,
)

BOTH = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


def two_points(c: Cluster, make_vm, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    vm = make_vm(name, [16 * MiB])
    c.register(vm)
    write_random(vm, 0, 0, 4 * MiB)
    full = by_disk(c, c.backup(name, "full"))[0]
    write_random(vm, 0, 2 * MiB, MiB)
    write_random(vm, 0, 9 * MiB, 3 * 65536)
    inc = by_disk(c, c.backup(name, "incremental"))[0]
    return full, inc


def verify(c: Cluster, backup_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a verify job to its end: (the job, the backup afterwards)."""
    r = c.http("POST", f"/api/v1/backups/{backup_id}/verify")
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["job"]["kind"] == "verify"
    job = c.wait_job(started["job_id"])
    assert job["status"] == "completed", job
    return job, c.client.get(f"/api/v1/backups/{backup_id}")


def own_data_cluster(path: str, *, after: int = 0) -> tuple[int, int]:
    """(disk offset, file offset) of a data cluster stored in ``path`` itself
    (depth 0 in its chain), at or after disk offset ``after``."""
    out = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", path], check=True, capture_output=True
    ).stdout
    for e in json.loads(out):
        if e["depth"] == 0 and e["data"] and e["start"] + e["length"] > after:
            start = max(e["start"], after)
            return start, e["offset"] + (start - e["start"])
    raise AssertionError(f"no data cluster of its own in {path}")


def flip_bytes(path: str, file_offset: int, length: int = 16) -> None:
    with open(path, "r+b") as f:
        f.seek(file_offset)
        data = f.read(length)
        f.seek(file_offset)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.parametrize("cluster", BOTH, indirect=True)
def test_verify_ok_is_stored_shown_and_filterable(
    cluster: Cluster, make_vm, tmp_path: Path
) -> None:
    full, inc = two_points(cluster, make_vm, "ver1")
    # the recorded digest is what the restore point reads (independent check)
    assert inc["digest"] == reference_digest(raw_copy(inc["file_path"], tmp_path / "inc.raw"))
    assert inc["verify_status"] is None

    job, b = verify(cluster, inc["backup_id"])
    assert job["result"]["verify_status"] == "ok"
    assert [c["backup_id"] for c in job["result"]["checked"]] == [
        full["backup_id"],
        inc["backup_id"],
    ]
    assert b["verify_status"] == "ok" and b["verify_error"] is None
    assert b["verified_at"] is not None
    # the block hash list of a good verify is kept next to the image
    assert Path(inc["file_path"]).with_suffix(".blocks").exists()

    ok = cluster.client.get("/api/v1/backups", vm_name="ver1", verify_status="ok")
    assert [x["backup_id"] for x in ok["backups"]] == [inc["backup_id"]]
    never = cluster.client.get("/api/v1/backups", vm_name="ver1", verify_status="never")
    assert [x["backup_id"] for x in never["backups"]] == [full["backup_id"]]
    chain = cluster.client.get("/api/v1/backups/ver1/chain")["disks"][0]["chain"]
    assert [x["verify_status"] for x in chain] == [None, "ok"]


def test_flipped_bytes_in_a_data_cluster_fail_with_the_range(
    cluster: Cluster, make_vm, tmp_path: Path
) -> None:
    full, inc = two_points(cluster, make_vm, "ver2")
    verify(cluster, inc["backup_id"])  # a good verify: its block hash list is kept

    # bytes flipped inside a data cluster of the incremental's own file
    disk_offset, file_offset = own_data_cluster(inc["file_path"], after=9 * MiB)
    flip_bytes(inc["file_path"], file_offset + 100)
    raw = raw_copy(inc["file_path"], tmp_path / "corrupt.raw")
    assert reference_digest(raw) != inc["digest"]  # it really reads differently

    job, b = verify(cluster, inc["backup_id"])
    assert b["verify_status"] == "failed"
    start = disk_offset // BLOCK * BLOCK
    expected = f"byte offsets {start}-{start + BLOCK - 1}"
    assert expected in b["verify_error"], b["verify_error"]
    assert Path(inc["file_path"]).name in b["verify_error"]
    assert job["result"]["ranges"] == [
        {"start": start, "end": start + BLOCK - 1, "image": inc["file_path"]}
    ]
    failed = cluster.client.get("/api/v1/backups", vm_name="ver2", verify_status="failed")
    assert [x["backup_id"] for x in failed["backups"]] == [inc["backup_id"]]

    # no earlier good verify of the full: the mismatch is still found and said
    _, file_offset = own_data_cluster(full["file_path"], after=0)
    flip_bytes(full["file_path"], file_offset + 7)
    _, fb = verify(cluster, full["backup_id"])
    assert fb["verify_status"] == "failed"
    assert "digest mismatch" in fb["verify_error"]
    assert full["digest"] in fb["verify_error"]


def test_corrupt_qcow2_metadata_fails_with_qemu_img_check(cluster: Cluster, make_vm) -> None:
    full, inc = two_points(cluster, make_vm, "ver3")
    # zero the full's first refcount block: every cluster it counts is now
    # "in use with refcount 0", which qemu-img check reports as corruption
    with open(full["file_path"], "r+b") as f:
        header = f.read(104)
        (refcount_table_offset,) = struct.unpack(">Q", header[48:56])
        f.seek(refcount_table_offset)
        (block_offset,) = struct.unpack(">Q", f.read(8))
        f.seek(block_offset)
        f.write(bytes(65536))
        f.flush()
        os.fsync(f.fileno())
    _, b = verify(cluster, inc["backup_id"])  # the chain's base is checked too
    assert b["verify_status"] == "failed"
    assert "qemu-img check" in b["verify_error"]
    assert full["backup_id"] in b["verify_error"]
    # qemu-img's own words, not thousands of lines of them
    assert "ERROR cluster" in b["verify_error"] and "refcount=0" in b["verify_error"]
    assert len(b["verify_error"]) < 2000


def test_verify_refusals(cluster: Cluster, make_vm) -> None:
    full, inc = two_points(cluster, make_vm, "ver4")
    # a chain being merged (as a consolidation leaves it mid-run)
    catalog_exec(
        cluster, "UPDATE backups SET status = 'merging' WHERE id = :id", id=full["backup_id"]
    )
    body = error_body(
        cluster.http("POST", f"/api/v1/backups/{inc['backup_id']}/verify"), 409, "in_use"
    )
    assert body["details"]["backup_id"] == full["backup_id"]
    catalog_exec(
        cluster, "UPDATE backups SET status = 'completed' WHERE id = :id", id=full["backup_id"]
    )
    # not a restore point
    catalog_exec(
        cluster, "UPDATE backups SET status = 'failed' WHERE id = :id", id=inc["backup_id"]
    )
    error_body(
        cluster.http("POST", f"/api/v1/backups/{inc['backup_id']}/verify"), 409, "not_completed"
    )
    error_body(cluster.http("POST", "/api/v1/backups/nope/verify"), 404, "not_found")
    # no job was created by any refusal
    assert cluster.client.get("/api/v1/jobs", kind="verify")["total"] == 0
