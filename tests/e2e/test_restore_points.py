"""Property-style: every restore point of a chain reads exactly as its disk did.

A qsd VM with two disks gets random writes (512 B to several MiB, some
zeroes, some touching the end of the disk) between a full and several
incrementals. After each backup the disks are copied as they are (the
"snapshot" a user would compare against). At the end every restore point,
old ones included, must compare identical to its snapshot and its recorded
digest must match what its chain reads.
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest

from fixtures.cluster import Cluster
from sendense.mover.digest import algorithm_of
from sendense.mover.verify import digest_of_image
from sendense.qemu import img
from sendense.qemu.qsd import QsdVm

SIZES = [48 << 20, (24 << 20) + 512 * 3]  # the second is not a multiple of 64 KiB


def random_writes(vm: QsdVm, rng: random.Random, count: int) -> None:
    for index in range(len(vm.disks)):
        size = SIZES[index]
        h = vm.guest(index)
        for _ in range(count):
            length = rng.choice([512, 4096, 65536, 300_000, 1 << 20, 3 << 20])
            length = min(length, size)
            where = rng.random()
            if where < 0.15:
                offset = size - length  # the end of the disk
            else:
                offset = rng.randrange(0, size - length + 1) // 512 * 512
            if rng.random() < 0.25:
                h.pwrite(bytes(length), offset)  # zeroes over whatever was there
            else:
                h.pwrite(rng.randbytes(length), offset)
        h.flush()
        h.shutdown()


def snapshot(vm: QsdVm, index: int, dest: Path) -> Path:
    """A raw copy of what the guest sees now, read through the VM's own export."""
    url = f"nbd+unix:///guest{index}?socket={vm.guest_socket}"
    subprocess.run(["qemu-img", "convert", "-f", "raw", url, "-O", "raw", str(dest)], check=True)
    return dest


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_every_restore_point_reads_as_its_snapshot(
    cluster: Cluster, make_vm, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    vm = make_vm("prop", SIZES)
    cluster.register(vm)
    points: list[tuple[dict, dict[int, Path]]] = []
    for round_no in range(4):
        random_writes(vm, rng, count=12 if round_no == 0 else 6)
        snaps = {
            i: snapshot(vm, i, tmp_path / f"snap-{round_no}-{i}.raw") for i in range(len(vm.disks))
        }
        job = cluster.backup("prop", "full" if round_no == 0 else "incremental")
        points.append((job, snaps))

    for job, snaps in points:
        for backup_id in job["backups"]:
            b = cluster.client.get(f"/api/v1/backups/{backup_id}")
            assert img.compare(b["file_path"], str(snaps[b["disk_id"]])), b
            alg = algorithm_of(b["digest"])
            assert digest_of_image(b["file_path"], algorithm=alg) == b["digest"], b
            assert (
                digest_of_image(str(snaps[b["disk_id"]]), fmt="raw", algorithm=alg) == b["digest"]
            )
    chain = cluster.client.get("/api/v1/backups/prop/chain")
    assert [d["chain_length"] for d in chain["disks"]] == [4, 4]


def test_writes_during_a_backup_are_not_in_it(tmp_path: Path, make_vm) -> None:
    """Copy-before-write fleecing: the restore point is the disk at the freeze."""
    rng = random.Random(7)
    c = Cluster(tmp_path / "cluster", node_env={"SENDENSE_NODE_MAX_RATE": str(16 << 20)})
    c.start_node()
    c.start_hub()
    try:
        vm = make_vm("busy", [64 << 20])
        h = vm.guest(0)
        for offset in range(0, 64 << 20, 4 << 20):
            h.pwrite(rng.randbytes(2 << 20), offset)
        h.flush()
        before = snapshot(vm, 0, tmp_path / "before.raw")
        c.register(vm)
        started = c.start_backup("busy", "full")
        deadline = time.monotonic() + 30
        while True:
            job = c.client.get(f"/api/v1/jobs/{started['job_id']}")
            if job["disks"] and job["disks"][0]["bytes_done"] > 0:
                break
            assert job["status"] == "running", job
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # The copy is under way: overwrite all of the disk, data and holes.
        for offset in range(0, 64 << 20, 1 << 20):
            h.pwrite(rng.randbytes(1 << 20), offset)
        h.flush()
        after = snapshot(vm, 0, tmp_path / "after.raw")
        job = c.wait_job(started["job_id"])
        assert job["status"] == "completed", job
        full = c.client.get(f"/api/v1/backups/{job['backups'][0]}")
        assert img.compare(full["file_path"], str(before))
        assert not img.compare(full["file_path"], str(after))
        # ... and the next incremental has them.
        inc = c.backup("busy", "incremental")
        b = c.client.get(f"/api/v1/backups/{inc['backups'][0]}")
        assert img.compare(b["file_path"], str(after))
    finally:
        c.stop()


def test_incremental_is_small_after_small_change(cluster: Cluster, make_vm) -> None:
    rng = random.Random(3)
    size = 128 << 20
    vm = make_vm("small", [size])
    h = vm.guest(0)
    for offset in range(0, size, 4 << 20):
        h.pwrite(rng.randbytes(4 << 20), offset)
    h.flush()
    cluster.register(vm)
    full = cluster.backup("small", "full")
    blocks = size // 65536
    for block in rng.sample(range(blocks), blocks // 100):  # 1% of 64 KiB blocks
        h.pwrite(rng.randbytes(65536), block * 65536)
    h.flush()
    inc = cluster.backup("small", "incremental")
    fb = cluster.client.get(f"/api/v1/backups/{full['backups'][0]}")
    ib = cluster.client.get(f"/api/v1/backups/{inc['backups'][0]}")
    assert ib["bytes_transferred"] == (blocks // 100) * 65536
    # Generous: 1% changed; anything near a full copy fails.
    assert ib["size_on_disk"] < 0.05 * fb["size_on_disk"], (ib["size_on_disk"], fb["size_on_disk"])
    assert img.compare(ib["file_path"], str(vm.disks[0]))
