"""Bugs the suite once let through (found by planting them one at a time in a
copy of the code). Each test here fails with its bug planted and passes
without it; the bug is named in the test's docstring.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbd
import pytest

from fixtures.cluster import Cluster
from fixtures.lifecycle import (
    SLOW_NODE,
    MiB,
    cluster_env,
    error_body,
    lifecycle_cluster,
    raw_copy,
    wait_for,
    write_random,
)
from sendense.mover.copy import Mover
from sendense.qemu import img
from sendense.qemu.nbd_server import QemuNbdServer


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


# ---------------------------------------------------------- final flush


def test_restore_point_survives_its_qemu_nbd_killed_right_after_the_copy(
    tmp_path: Path,
) -> None:
    """Bug: the mover skips the final flush of the target.

    qemu-nbd serves the target with cache=writeback (as the hub does): QCOW2
    metadata (L2 tables, refcounts) stays in qemu-nbd's memory until a flush.
    The hub normally stops the target with SIGTERM, which flushes too; the
    mover's own flush is what makes a completed copy durable when qemu-nbd
    dies hard (OOM killer, a crash). Without it the target below reads as
    empty after the SIGKILL.
    """
    size = 48 * MiB
    rng = random.Random(7)
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(size)
        for _ in range(120):
            f.seek(rng.randrange(0, size - 65536) // 65536 * 65536)
            f.write(rng.randbytes(65536))
    dst = tmp_path / "dst.qcow2"
    img.create(str(dst), size)
    with QemuNbdServer(
        str(src), fmt="raw", socket_path=str(tmp_path / "s.sock"), read_only=True
    ) as s:
        target = QemuNbdServer(str(dst), socket_path=str(tmp_path / "d.sock"), cache="writeback")
        target.start()
        try:
            a = nbd.NBD()
            a.add_meta_context("base:allocation")
            a.connect_uri(s.url)
            b = nbd.NBD()
            b.connect_uri(target.url)
            result = Mover(a, b, size).run()
            assert result.data_bytes > 0
            assert target.proc is not None
            os.kill(target.proc.pid, signal.SIGKILL)  # right after run() returned
            target.proc.wait()
        finally:
            target.stop()
    assert img.compare(str(dst), str(src)), "the copy did not survive qemu-nbd's SIGKILL"
    img.check(str(dst))


# -------------------------------------------- zeroes over data, incremental


def test_guest_zeroes_over_data_read_as_zeroes_in_the_incremental(
    cluster: Cluster, make_vm
) -> None:
    """Bug: zero ranges on an incremental target are skipped.

    The guest writes zeroes the way a trim-happy filesystem does, with
    NBD_CMD_WRITE_ZEROES (libnbd ``zero``), over blocks that held data at the
    full backup: QEMU then reports those ranges as zero, not as data, and the
    mover must write zeroes into the incremental's overlay. Skipped, the
    overlay reads through to the parent's stale data.
    """
    vm = make_vm("zero1", [32 * MiB])
    write_random(vm, 0, 0, 16 * MiB)
    cluster.register(vm)
    full = cluster.backup("zero1", "full")

    g = vm.guest(0)
    g.zero(4 * MiB, 2 * MiB)  # whole blocks: a zero extent
    g.zero(4096, 9 * MiB + 12288)  # inside one 64 KiB block: copied as data
    g.pwrite(os.urandom(65536), 12 * MiB)  # and some new data
    g.flush()
    # What the guest now reads there: zeroes (QEMU says so, not just the bytes).
    extents = img.map_extents(str(vm.disks[0]))
    assert any(e["zero"] and e["start"] <= 2 * MiB < e["start"] + e["length"] for e in extents)
    g.shutdown()

    inc = cluster.backup("zero1", "incremental")
    b = cluster.client.get(f"/api/v1/backups/{inc['backups'][0]}")
    assert b["backup_type"] == "incremental"
    assert b["parent_backup_id"] == full["backups"][0]
    raw = raw_copy(b["file_path"], cluster.root / "inc.raw")
    with open(raw, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(4 * MiB) == bytes(4 * MiB), "stale data where the guest wrote zeroes"
        f.seek(9 * MiB + 12288)
        assert f.read(4096) == bytes(4096)
    assert img.compare(b["file_path"], str(vm.disks[0]))


# ------------------------------------------------- simultaneous requests


def test_simultaneous_backup_requests_for_one_vm_start_one_job(cluster: Cluster, make_vm) -> None:
    """Bug: the busy check ignores jobs still ``pending``.

    Six requests for one VM at the same moment: exactly one 202, five clean
    409 ``disk_busy`` naming that job, and no failed job (a second job that
    got through would be refused by the node and end ``failed``).
    """
    vm = make_vm("busy1", [16 * MiB, 8 * MiB])
    write_random(vm, 0, 0, 4 * MiB)
    cluster.register(vm)
    n = 6
    barrier = threading.Barrier(n)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def post() -> None:
        with httpx.Client(timeout=60) as h:
            barrier.wait()
            r = h.post(
                f"{cluster.hub_url}/api/v1/backups",
                json={"vm_name": "busy1", "repository_id": "default", "backup_type": "full"},
                headers={"Authorization": f"Bearer {cluster.admin_token}"},
            )
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=post) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = sorted(r.status_code for r in answers)
    assert codes == [202] + [409] * (n - 1), [(r.status_code, r.text) for r in answers]
    [ok] = [r for r in answers if r.status_code == 202]
    job_id = ok.json()["job_id"]
    for r in answers:
        if r.status_code == 409:
            body = error_body(r, 409, "disk_busy")
            assert body["details"]["job_id"] == job_id, body
    assert cluster.wait_job(job_id)["status"] == "completed"
    jobs = cluster.client.get("/api/v1/jobs")["jobs"]
    assert [(j["job_id"], j["status"]) for j in jobs] == [(job_id, "completed")], jobs


# ------------------------------------------------------ a corrupt target


def corrupt_refcount_table(path: str) -> None:
    """Zero the first refcount table entry of a QCOW2 file on disk (header
    field ``refcount_table_offset``, QEMU's docs/interop/qcow2.txt): every
    cluster then has refcount 0 on disk while L1/L2 still reference them."""
    with open(path, "r+b") as f:
        header = f.read(104)
        assert header[:4] == b"QFI\xfb"
        (table,) = struct.unpack(">Q", header[48:56])
        f.seek(table)
        f.write(bytes(8))
        f.flush()
        os.fsync(f.fileno())


@cluster_env(node=SLOW_NODE)
def test_a_corrupt_target_fails_the_job(cluster: Cluster, make_vm) -> None:
    """Bug: a ``qemu-img check`` failure is ignored.

    A second writer (this test, standing for a faulty disk or a stray
    process on the repository) zeroes the target's refcount table while the
    copy runs. qemu-nbd keeps the table in memory and never rewrites it for
    a small image, so the data still reads back identical, but the file is
    corrupt (``qemu-img check`` exit 2; the next write through the chain
    could overwrite live clusters). The job must end ``failed`` with the
    check's verdict, its files removed, and no restore point recorded.
    """
    vm = make_vm("corrupt1", [24 * MiB])
    write_random(vm, 0, 0, 24 * MiB)  # ~8 s at the slow node's 3 MiB/s
    cluster.register(vm)
    started = cluster.start_backup("corrupt1", "full")
    job_id = started["job_id"]
    path = started["backups"][0]["file_path"]

    def copying() -> Any:
        job = cluster.client.get(f"/api/v1/jobs/{job_id}")
        assert job["status"] in ("pending", "running"), job
        return job["status"] == "running" and job["bytes_done"] >= 2 * MiB

    wait_for("the copy to be under way", copying, timeout=30)
    corrupt_refcount_table(path)
    job = cluster.wait_job(job_id, timeout=120)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "qemu_img_failed", job["error"]
    assert "check" in job["error"]["message"], job["error"]
    assert not Path(path).exists()
    assert not Path(path).with_suffix(".json").exists()
    listed = cluster.client.get("/api/v1/backups", vm_name="corrupt1", status="completed")
    assert listed["total"] == 0, listed
    # The VM is free again: the next backup is a clean full.
    again = cluster.backup("corrupt1", "auto")
    b = cluster.client.get(f"/api/v1/backups/{again['backups'][0]}")
    assert b["backup_type"] == "full"
    assert img.compare(b["file_path"], str(vm.disks[0]))
