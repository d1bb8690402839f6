"""Consolidation benchmark: merging a chain against ``qemu-img convert``.

Run by ``make bench-consolidate`` (and ``make bench``). One run:

1. builds a disk (default 4 GiB, ``--data-fraction`` of its 4 MiB regions
   random, the rest holes) in a qemu-storage-daemon "VM", starts a real hub
   and node, and takes a full backup and ``--incrementals`` incrementals, the
   guest rewriting ``--change`` of the 64 KiB blocks before each;
2. per round (``--repeat``), on a copy of that repository state:
   - ``qemu-img convert`` of the newest restore point (through its chain)
     to a new QCOW2 in the same repository folder: the cost of writing the
     whole restore point once, the reference;
   - a Sendense consolidation that keeps one restore point
     (``POST /api/v1/backups/consolidate {"vm_name", "keep": 1}``), timed
     from the API call to the job's end;
3. checks that the consolidated restore point still reads exactly as before
   (``qemu-img compare`` against the convert's output), and prints as its
   last line ``consolidate_vs_convert=`` (Sendense time / convert time; lower
   is better) with the times behind it.

The repository is restored from a tarball-free copy (``cp --reflink=auto
-a``) before each round so every round merges the same chain.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the Cluster fixture (real hub + node processes)
sys.path.insert(0, str(ROOT / "bench"))

from backup_bench import BLOCK, REGION, GiB, build_disk, guest_change  # noqa: E402
from fixtures.cluster import Cluster  # noqa: E402
from sendense.qemu.qsd import QsdVm  # noqa: E402

VM_NAME = "consvm"


def say(msg: str) -> None:
    print(f"[consolidate] {msg}", file=sys.stderr, flush=True)


def run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    run(argv)
    return time.monotonic() - t0


def chain_files(cluster: Cluster) -> list[str]:
    chain = cluster.client.get(f"/api/v1/backups/{VM_NAME}/chain")
    return [link["file_path"] for link in chain["disks"][0]["chain"]]


def consolidate(cluster: Cluster) -> tuple[float, dict[str, Any]]:
    t0 = time.monotonic()
    started = cluster.client.post("/api/v1/backups/consolidate", {"vm_name": VM_NAME, "keep": 1})
    job = cluster.wait_job(started["job_id"], timeout=3600)
    return time.monotonic() - t0, job


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=float, default=4.0)
    p.add_argument("--data-fraction", type=float, default=0.6)
    p.add_argument("--incrementals", type=int, default=3)
    p.add_argument("--change", type=float, default=0.05, help="blocks rewritten per increment")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="512 MiB disk, 2 incrementals")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/var/tmp")))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.size_gib, args.incrementals = 0.5, 2
    size = int(args.size_gib * GiB) // REGION * REGION
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="sendense-consbench-", dir=args.workdir))
    vm = QsdVm(work / "vm", VM_NAME)
    cluster = Cluster(work / "cluster")
    results: dict[str, Any] = {"size_bytes": size, "incrementals": args.incrementals}
    try:
        say(f"building a {size / GiB:g} GiB disk, {args.data_fraction:.0%} random data")
        results["data_bytes"] = build_disk(vm, work, size, args.data_fraction, rng)
        vm.start()
        (work / "cluster").mkdir()
        cluster.start_node()
        cluster.start_hub()
        cluster.register(vm)
        cluster.backup(VM_NAME, "full")
        for _ in range(args.incrementals):
            guest_change(vm, size, args.change, rng)
            cluster.backup(VM_NAME, "incremental")
        files = chain_files(cluster)
        repo = Path(files[0]).parents[2]
        cluster.stop()
        pristine = work / "pristine"
        shutil.copytree(repo, pristine, symlinks=True)
        catalog = cluster.hub_dir / "catalog.db"
        shutil.copyfile(catalog, work / "catalog.pristine")
        converts, merges = [], []
        for n in range(args.repeat):
            if n:
                shutil.rmtree(repo)
                shutil.copytree(pristine, repo, symlinks=True)
                shutil.copyfile(work / "catalog.pristine", catalog)
                for suffix in ("-wal", "-shm"):
                    Path(f"{catalog}{suffix}").unlink(missing_ok=True)
            reference = Path(files[-1]).with_name("reference.qcow2")
            run(["sync"])
            converts.append(
                timed(
                    [
                        "qemu-img",
                        "convert",
                        "-t",
                        "writeback",
                        "-O",
                        "qcow2",
                        "-o",
                        f"cluster_size={BLOCK}",
                        files[-1],
                        str(reference),
                    ]
                )
            )
            run(["sync"])
            cluster.start_hub()
            seconds, job = consolidate(cluster)
            if job["status"] != "completed":
                raise RuntimeError(f"consolidation ended {job['status']}: {job.get('error')}")
            merges.append(seconds)
            left = chain_files(cluster)
            if len(left) != 1:
                raise RuntimeError(f"expected one restore point left, chain is {left}")
            same = subprocess.run(["qemu-img", "compare", "-U", left[0], str(reference)])
            if same.returncode != 0:
                raise RuntimeError("the consolidated restore point reads differently")
            reference.unlink()
            cluster.stop()
            say(f"round {n + 1}: convert {converts[-1]:.2f}s, consolidate {merges[-1]:.2f}s")
        convert_s = sorted(converts)[len(converts) // 2]
        merge_s = sorted(merges)[len(merges) // 2]
        results.update(convert_s=converts, consolidate_s=merges)
        out = ROOT / "bench" / "results" / f"consolidate-{time.strftime('%Y%m%dT%H%M%SZ')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(
            f"consolidate_vs_convert={merge_s / convert_s:.3f} consolidate_s={merge_s:.2f} "
            f"convert_s={convert_s:.2f} size_gib={size / GiB:g} incrementals={args.incrementals}"
        )
        return 0
    finally:
        cluster.stop()
        vm.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
