"""Against a REAL vCenter, only when one is named: SENDENSE_VSPHERE_URL
(``https://vcenter.example.com`` or with ``:port``), SENDENSE_VSPHERE_USER,
SENDENSE_VSPHERE_PASSWORD and SENDENSE_VSPHERE_VM (its name or inventory
path, e.g. ``/DC1/vm/test/web1``; a small, powered-off or idle VM without
snapshots of its own). Optional: SENDENSE_VSPHERE_THUMBPRINT (the
certificate's SHA-1/SHA-256 fingerprint) or SENDENSE_VSPHERE_INSECURE=1,
SENDENSE_VSPHERE_DATACENTER.

Otherwise the test is reported as SKIPPED with the reason (``-ra`` lists it):
the rest of the vmware suite runs against a simulator (tests/vcsim), which is
not a vCenter.

It backs the VM up in full and incrementally through a real hub and node,
verifies both restore points (digest recomputed from the QCOW2 chain plus
``qemu-img check``) and checks that the backup snapshot is gone.
"""

from __future__ import annotations

import os
import ssl
import time
import urllib.parse
from typing import Any

import pytest

from fixtures.cluster import Cluster

NAMES = ("URL", "USER", "PASSWORD", "VM")
LIVE = {k: os.environ.get(f"SENDENSE_VSPHERE_{k}", "") for k in NAMES}
MISSING = [f"SENDENSE_VSPHERE_{k}" for k, v in LIVE.items() if not v]

pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"LIVE VCENTER TEST SKIPPED: no real vCenter named ({', '.join(MISSING)} unset); "
    "the vmware suite ran against the vcsim simulator only",
)


def live_config() -> dict[str, Any]:
    url = urllib.parse.urlsplit(LIVE["URL"] if "//" in LIVE["URL"] else f"https://{LIVE['URL']}")
    config: dict[str, Any] = {
        "host": url.hostname,
        "port": url.port or 443,
        "user": LIVE["USER"],
        "password": LIVE["PASSWORD"],
    }
    if os.environ.get("SENDENSE_VSPHERE_THUMBPRINT"):
        config["thumbprint"] = os.environ["SENDENSE_VSPHERE_THUMBPRINT"]
    if os.environ.get("SENDENSE_VSPHERE_INSECURE") == "1":
        config["insecure"] = True
    if os.environ.get("SENDENSE_VSPHERE_DATACENTER"):
        config["datacenter"] = os.environ["SENDENSE_VSPHERE_DATACENTER"]
    return config


def verify(c: Cluster, backup_id: str) -> dict[str, Any]:
    r = c.http("POST", f"/api/v1/backups/{backup_id}/verify")
    assert r.status_code == 202, r.text
    job = c.wait_job(r.json()["job_id"], timeout=3600)
    assert job["status"] == "completed", job
    b: dict[str, Any] = c.client.get(f"/api/v1/backups/{backup_id}")
    return b


def backup_snapshots(config: dict[str, Any], vm_path: str) -> list[str]:
    from pyVim.connect import Disconnect, SmartConnect

    ctx = ssl.create_default_context()
    if config.get("insecure") or config.get("thumbprint"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    si = SmartConnect(
        host=config["host"],
        port=config["port"],
        user=config["user"],
        pwd=config["password"],
        sslContext=ctx,
    )
    try:
        vm = si.content.searchIndex.FindByInventoryPath(vm_path.lstrip("/"))
        names = []
        stack = list(vm.snapshot.rootSnapshotList) if vm.snapshot else []
        while stack:
            node = stack.pop()
            names.append(node.name)
            stack.extend(node.childSnapshotList or [])
        return [n for n in names if n.startswith("sendense-backup-")]
    finally:
        Disconnect(si)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_live_vcenter_full_then_incremental(cluster: Cluster) -> None:
    """A real vCenter: discover, full, incremental, both restore points verify."""
    config = live_config()
    c = cluster.client
    node = c.post("/api/v1/nodes", cluster.node_body("node1"))
    source = c.post(
        "/api/v1/sources",
        {"name": "vc-live", "node_id": node["node_id"], "type": "vmware", "config": config},
    )
    found = c.post("/api/v1/vms/discover", {"source_id": source["source_id"]})["vms"]
    wanted = LIVE["VM"]
    vm = next((v for v in found if wanted in (v["name"], v["path"])), None)
    assert vm is not None, f"{wanted} not among {[v['path'] for v in found][:20]}"
    assert vm["disks"] and all(d["disk_key"] >= 2000 for d in vm["disks"])

    full = cluster.wait_job(cluster.start_backup(vm["name"], "full")["job_id"], timeout=7200)
    assert full["status"] == "completed", full
    time.sleep(5)
    inc = cluster.wait_job(cluster.start_backup(vm["name"], "auto")["job_id"], timeout=7200)
    assert inc["status"] == "completed", inc
    for job in (full, inc):
        for bid in job["backups"]:
            assert verify(cluster, bid)["verify_status"] == "ok"
    assert all(d["mode"] == "incremental" for d in inc["disks"]), inc["disks"]
    assert backup_snapshots(config, vm["path"]) == []
    assert config["password"] not in cluster.log("node") + cluster.log("hub")
