"""The vmware part of ``bench/source_bench.py`` (see its docstring).

Against a vCenter *simulator* (govmomi's vcsim with Sendense's CBT double,
``tests/vcsim``): a thin flat disk with random data in ``--data-fraction``
of its 4 MiB regions, a real hub and node, a ``vmware`` source.

- reference, per round: the connector's own point in time (the backup
  snapshot, ``nbdkit curl`` on the base ``-flat.vmdk`` with only the
  allocated areas listed), ``nbdcopy`` from it into a fresh QCOW2 served by
  qemu-nbd as the hub serves its targets, then the snapshot removed: timed
  from the snapshot to its removal, as a backup is;
- a Sendense full backup through the API (POST to the job's end);
- after the guest rewrote 10 % of the data regions (64 KiB blocks in them),
  an incremental.

The simulator scans the flat file for its CBT double at every snapshot
(about 2 s per GiB here): both the reference and the backup pay it, so the
ratio compares like with like; the times without it are not separable from
outside the job.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from backup_bench import HUB_CLUSTER, NBDCOPY, nbd_target, run_timed
from fixtures.cluster import Cluster
from sendense.connectors.registry import make_connector
from vcsim.kit import running_vcsim

GiB = 1 << 30
REGION = 4 << 20
BLOCK = 64 << 10
VM = "vmbench"


def say(msg: str) -> None:
    print(f"[vmware] {msg}", file=sys.stderr, flush=True)


def fill(path: Path, size: int, fraction: float, rng: random.Random) -> list[int]:
    """Random data in ``fraction`` of the regions; the regions written."""
    regions = []
    with path.open("r+b") as f:
        for offset in range(0, size, REGION):
            if rng.random() < fraction:
                f.seek(offset)
                f.write(os.urandom(REGION))
                regions.append(offset)
    return regions


def rewrite(path: Path, regions: list[int], share: float, rng: random.Random) -> int:
    """The guest rewrites ``share`` of the data: 64 KiB blocks in data regions."""
    blocks = [r + b for r in regions for b in range(0, REGION, BLOCK)]
    chosen = rng.sample(blocks, int(len(blocks) * share))
    with path.open("r+b") as f:
        for offset in chosen:
            f.seek(offset)
            f.write(os.urandom(BLOCK))
    return len(chosen) * BLOCK


def reference(sim: Any, work: Path, size: int, n: int) -> float:
    connector = make_connector(
        {"type": "vmware", "config": sim.source_config()}, workdir=str(work / f"ref{n}")
    )
    t0 = time.perf_counter()
    pit = connector.freeze(VM, [2000], {})
    try:
        (view,) = pit.views
        with nbd_target(work / f"ref{n}.qcow2", size, HUB_CLUSTER, work) as target:
            run_timed([*NBDCOPY, view.nbd_url, target.url], work / "nbdcopy.log")
    finally:
        connector.release(True)
    seconds = time.perf_counter() - t0
    (work / f"ref{n}.qcow2").unlink(missing_ok=True)
    return seconds


def timed_backup(cluster: Cluster, kind: str) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    job = cluster.backup(VM, kind)
    seconds = time.perf_counter() - t0
    if job["status"] != "completed":
        raise RuntimeError(f"{kind} backup ended {job['status']}: {job.get('error')}")
    return seconds, job


def bench_vmware(args: argparse.Namespace, work: Path, rng: random.Random) -> dict[str, Any]:
    size = int(args.size_gib * GiB) // REGION * REGION
    rounds = max(3, args.repeat // 2) if not args.quick else 1
    with running_vcsim(work / "vcsim") as sim:
        vm = sim.create_vm(VM, [(size, True)])
        flat = vm.disks[0].path
        regions = fill(flat, size, args.data_fraction, rng)
        say(f"{size / GiB:g} GiB thin disk, {len(regions) * REGION / GiB:.2f} GiB data")
        cluster = Cluster(work / "cluster")
        try:
            (work / "cluster").mkdir()
            cluster.start_node()
            cluster.start_hub()
            c = cluster.client
            node = c.post(
                "/api/v1/nodes",
                cluster.node_body("node1"),  # HTTPS, the node's certificate pinned
            )
            source = c.post(
                "/api/v1/sources",
                {
                    "name": "vc1",
                    "node_id": node["node_id"],
                    "type": "vmware",
                    "config": sim.source_config(),
                },
            )
            c.post("/api/v1/vms/discover", {"source_id": source["source_id"]})
            refs, fulls = [], []
            for n in range(rounds):
                # Alternate which goes first.
                if n % 2 == 0:
                    refs.append(reference(sim, work, size, n))
                    fulls.append(timed_backup(cluster, "full")[0])
                else:
                    fulls.append(timed_backup(cluster, "full")[0])
                    refs.append(reference(sim, work, size, n))
                say(f"round {n + 1}: nbdcopy {refs[-1]:.2f}s, full backup {fulls[-1]:.2f}s")
            changed = rewrite(flat, regions, 0.10, rng)
            inc_s, job = timed_backup(cluster, "incremental")
            moved = sum(c.get(f"/api/v1/backups/{b}")["bytes_transferred"] for b in job["backups"])
            say(
                f"incremental: {changed >> 20} MiB rewritten, {moved >> 20} MiB moved, {inc_s:.2f}s"
            )
        finally:
            cluster.stop()
    nbdcopy_s, full_s = statistics.median(refs), statistics.median(fulls)
    return {
        "vmware_size_bytes": size,
        "vmware_data_bytes": len(regions) * REGION,
        "nbdcopy_s_all": refs,
        "vmware_full_s_all": fulls,
        "nbdcopy_s": nbdcopy_s,
        "vmware_full_s": full_s,
        "vmware_full_ratio": nbdcopy_s / full_s,
        "vmware_inc10_s": inc_s,
        "vmware_inc10_changed_bytes": changed,
        "vmware_inc10_moved_bytes": moved,
        "vmware_inc10_time_ratio": inc_s / full_s,
    }
