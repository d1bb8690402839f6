"""Full and incremental backups through hub + node processes, checked as a user would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures.cluster import Cluster
from sendense.mover.digest import algorithm_of
from sendense.mover.verify import digest_of_image
from sendense.qemu import img


def test_full_then_incremental_restores_exactly(cluster: Cluster, make_vm) -> None:
    vm = make_vm("web1", [64 << 20, 32 << 20])
    g = vm.guest(0)
    g.pwrite(os.urandom(3 << 20), 5 << 20)
    g.pwrite(os.urandom(4096), (64 << 20) - 4096)
    g.flush()
    reg = cluster.register(vm)
    assert [d["disk_key"] for d in reg["vms"][0]["disks"]] == [2000, 2001]
    assert reg["vms"][0]["disks"][0]["capacity_bytes"] == 64 << 20

    started = cluster.start_backup("web1", "full")
    assert {b["disk_id"] for b in started["backups"]} == {0, 1}
    for b in started["backups"]:
        assert b["backup_type"] == "full"
        assert b["file_path"].startswith(str(cluster.hub_dir))
        assert b["nbd_export_name"]
        assert b["total_bytes"] in (64 << 20, 32 << 20)
    full = cluster.wait_job(started["job_id"])
    assert full["status"] == "completed", full
    assert full["percent"] == 100.0
    for d in full["disks"]:
        assert d["bytes_done"] == d["bytes_total"]

    fulls = {}
    for bid in full["backups"]:
        b = cluster.client.get(f"/api/v1/backups/{bid}")
        fulls[b["disk_id"]] = b
    for i, b in fulls.items():
        assert b["status"] == "completed"
        assert b["parent_backup_id"] is None
        assert b["change_id"] and b["digest"].startswith("x3-64k:")
        assert img.compare(b["file_path"], str(vm.disks[i]))
        assert digest_of_image(b["file_path"], algorithm=algorithm_of(b["digest"])) == b["digest"]
        assert Path(b["file_path"]).with_suffix(".json").exists()

    g.pwrite(os.urandom(65536), 0)
    g.pwrite(b"\0" * (1 << 20), 5 << 20)  # zeroes over data: must read back as zeroes
    g.flush()
    inc = cluster.backup("web1", "auto")
    incs = {}
    for bid in inc["backups"]:
        b = cluster.client.get(f"/api/v1/backups/{bid}")
        incs[b["disk_id"]] = b
    for i, b in incs.items():
        assert b["backup_type"] == "incremental"
        assert b["parent_backup_id"] == fulls[i]["backup_id"]
        info = img.info(b["file_path"])
        assert info["backing-filename"] == os.path.basename(fulls[i]["file_path"])
        assert info["backing-filename-format"] == "qcow2"
        assert img.compare(b["file_path"], str(vm.disks[i]))
        assert digest_of_image(b["file_path"], algorithm=algorithm_of(b["digest"])) == b["digest"]
    assert incs[1]["bytes_transferred"] == 0  # nothing written to disk 1

    chain = cluster.client.get("/api/v1/backups/web1/chain")
    assert [d["chain_length"] for d in chain["disks"]] == [2, 2]
    listed = cluster.client.get("/api/v1/backups", vm_name="web1", backup_type="incremental")
    assert listed["total"] == 2


def test_single_disk_backup(cluster: Cluster, make_vm) -> None:
    vm = make_vm("db1", [32 << 20, 32 << 20])
    cluster.register(vm)
    job = cluster.backup("db1", "full", disk_id=1)
    assert len(job["backups"]) == 1
    b = cluster.client.get(f"/api/v1/backups/{job['backups'][0]}")
    assert b["disk_id"] == 1 and b["disk_key"] == 2001
    assert img.compare(b["file_path"], str(vm.disks[1]))


@pytest.mark.parametrize("cluster", ["postgresql"], indirect=True)
def test_backup_on_postgresql_catalog(cluster: Cluster, make_vm) -> None:
    vm = make_vm("pg1", [32 << 20])
    g = vm.guest(0)
    g.pwrite(os.urandom(1 << 20), 0)
    g.flush()
    cluster.register(vm)
    cluster.backup("pg1", "full")
    g.pwrite(os.urandom(65536), 8 << 20)
    g.flush()
    job = cluster.backup("pg1", "incremental")
    b = cluster.client.get(f"/api/v1/backups/{job['backups'][0]}")
    assert b["backup_type"] == "incremental"
    assert img.compare(b["file_path"], str(vm.disks[0]))


def test_incremental_after_the_vm_restarted(cluster: Cluster, make_vm) -> None:
    """Persistent bitmaps survive a clean restart of the VM process: the next
    backup is still an incremental, and exact."""
    vm = make_vm("reboot1", [32 << 20])
    g = vm.guest(0)
    g.pwrite(os.urandom(2 << 20), 0)
    g.flush()
    g.shutdown()
    cluster.register(vm)
    full = cluster.backup("reboot1", "full")
    vm.stop()  # QMP quit: bitmaps are written into the qcow2 image
    vm.start()
    g = vm.guest(0)
    g.pwrite(os.urandom(65536), 16 << 20)
    g.flush()
    g.shutdown()
    inc = cluster.backup("reboot1", "auto")
    b = cluster.client.get(f"/api/v1/backups/{inc['backups'][0]}")
    assert b["backup_type"] == "incremental", inc
    assert b["parent_backup_id"] == full["backups"][0]
    assert inc["messages"] == []
    assert b["bytes_transferred"] == 65536
    assert img.compare(b["file_path"], str(vm.disks[0]))
