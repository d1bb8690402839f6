"""Restore benchmark: whole-disk restore against ``qemu-img convert``.

Run by ``make bench-restore`` (and ``make bench``). One run:

1. builds a disk (default 4 GiB, ``--data-fraction`` of its 4 MiB regions
   random, the rest holes) in a qemu-storage-daemon "VM", starts a real hub
   and node, takes a full backup and ``--incrementals`` incrementals (the
   guest rewriting ``--change`` of the 64 KiB blocks before each);
2. per round (``--repeat``), for the newest restore point (read through its
   whole chain):
   - ``qemu-img convert -O raw`` of it into the hub's restore directory: the
     reference;
   - a Sendense whole-disk restore to a raw file in the same directory
     (``POST /api/v1/restores``), timed from the API call to the job's end
     (planning, the job, the flush and the rename included);
3. checks that the restored file reads exactly as the restore point
   (``qemu-img compare``) and prints as its last line ``restore_vs_convert=``
   (convert time / restore time: 1.0 is as fast as convert; the target is at
   least 0.8) with the times behind it.

File-level restore figures (listing latency, downloads from a deep chain,
ZIP throughput) join this benchmark when restore sessions land.
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

from backup_bench import REGION, GiB, build_disk, guest_change  # noqa: E402
from fixtures.cluster import Cluster  # noqa: E402
from sendense.qemu.qsd import QsdVm  # noqa: E402

VM_NAME = "restvm"


def say(msg: str) -> None:
    print(f"[restore] {msg}", file=sys.stderr, flush=True)


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    return time.monotonic() - t0


def drop(path: Path) -> None:
    path.unlink(missing_ok=True)
    subprocess.run(["sync"], check=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=float, default=4.0)
    p.add_argument("--data-fraction", type=float, default=0.6)
    p.add_argument("--incrementals", type=int, default=3)
    p.add_argument("--change", type=float, default=0.05, help="blocks rewritten per increment")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--quick", action="store_true", help="512 MiB disk, 2 incrementals, 1 round")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/var/tmp")))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.size_gib, args.incrementals, args.repeat = 0.5, 2, 1
    size = int(args.size_gib * GiB) // REGION * REGION
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="sendense-restbench-", dir=args.workdir))
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
        job = cluster.backup(VM_NAME, "full")
        for _ in range(args.incrementals):
            guest_change(vm, size, args.change, rng)
            job = cluster.backup(VM_NAME, "incremental")
        (backup_id,) = job["backups"]
        source = cluster.client.get(f"/api/v1/backups/{backup_id}")["file_path"]
        restores = cluster.hub_dir / "restores"
        reference, restored = restores / "reference.raw", restores / "restored.raw"
        converts, restores_s = [], []
        for n in range(args.repeat):
            subprocess.run(["sync"], check=True)
            converts.append(
                timed(["qemu-img", "convert", "-U", "-O", "raw", source, str(reference)])
            )
            subprocess.run(["sync"], check=True)
            t0 = time.monotonic()
            started = cluster.client.post(
                "/api/v1/restores",
                {
                    "backup_id": backup_id,
                    "destination": {"type": "file", "path": str(restored), "format": "raw"},
                },
            )
            done = cluster.wait_job(started["job_id"], timeout=3600)
            restores_s.append(time.monotonic() - t0)
            if done["status"] != "completed":
                raise RuntimeError(f"restore ended {done['status']}: {done.get('error')}")
            same = subprocess.run(["qemu-img", "compare", "-U", str(restored), source])
            if same.returncode != 0:
                raise RuntimeError("the restored disk reads differently from the restore point")
            say(f"round {n + 1}: convert {converts[-1]:.2f}s, restore {restores_s[-1]:.2f}s")
            drop(reference)
            drop(restored)
        convert_s = sorted(converts)[len(converts) // 2]
        restore_s = sorted(restores_s)[len(restores_s) // 2]
        results.update(convert_s=converts, restore_s=restores_s)
        out = ROOT / "bench" / "results" / f"restore-{time.strftime('%Y%m%dT%H%M%SZ')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(
            f"restore_vs_convert={convert_s / restore_s:.3f} restore_s={restore_s:.2f} "
            f"convert_s={convert_s:.2f} size_gib={size / GiB:g} "
            f"chain_length={args.incrementals + 1}"
        )
        return 0
    finally:
        cluster.stop()
        vm.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
