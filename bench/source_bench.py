"""Source benchmark: the file source's hash pass, and the vmware source.

Run by ``make bench-source`` (and ``make bench``). One run:

1. file source: an incremental of a ``file`` source reads the whole image
   once and hashes each 64 KiB block with the digest's leaf hash (XXH3 by
   default) to find what changed (``connectors/file/changes.py``). On a raw
   image of ``--size-gib`` with ``--data-fraction`` of its 4 MiB regions
   random (the rest holes) and on a fully written one of half that size,
   the hash pass (``find_changes`` over ``file_chunks``) against ``xxhsum
   -H2`` (XXH128) and ``b3sum --num-threads 1`` of the same file, all from
   the page cache (each read once untimed), ``--repeat`` rounds taking
   turns, medians: ``file_hash_vs_xxhsum`` and ``file_hash_vs_b3sum`` are
   rates (tool time / our time; above 1.0 is faster than the tool);
2. vmware source (when the vCenter simulator builds here, see
   ``tests/vcsim``): a ``--size-gib`` flat disk with ``--data-fraction``
   random data behind vcsim, backed up through a real hub and node (``nbdkit
   curl`` on the datastore's ``/folder`` URL), full and then an incremental
   after the guest rewrote 10 % of the data; each against ``nbdcopy`` from
   the same ``nbdkit curl`` export into a qemu-nbd QCOW2 target in the same
   run: ``vmware_full_ratio`` (nbdcopy time / backup time) and
   ``vmware_inc10_time_ratio`` (incremental time / full time).

Last line (``key=value``): ``file_hash_vs_xxhsum= file_hash_vs_b3sum=
vmware_full_ratio= vmware_inc10_time_ratio=`` and the figures behind them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from sendense.connectors.file import changes  # noqa: E402
from sendense.mover import digest as dg  # noqa: E402

GiB = 1 << 30
REGION = 4 << 20


def say(msg: str) -> None:
    print(f"[source] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=float, default=4.0)
    p.add_argument("--data-fraction", type=float, default=0.6)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--quick", action="store_true", help="small sizes, for a try")
    p.add_argument("--skip-vmware", action="store_true")
    return p.parse_args(argv)


def write_image(path: Path, size: int, fraction: float, rng: random.Random) -> int:
    """A raw file of ``size`` with ``fraction`` of its regions random."""
    written = 0
    with path.open("wb") as f:
        f.truncate(size)
        for offset in range(0, size, REGION):
            if rng.random() < fraction:
                f.seek(offset)
                f.write(os.urandom(min(REGION, size - offset)))
                written += REGION
    return written


def medians(cases: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    for fn in cases.values():  # each read once: the page cache warm for all
        fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for n in range(repeat):
        for k in names if n % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            cases[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_file(args: argparse.Namespace, work: Path, rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    size = int(args.size_gib * GiB) // REGION * REGION
    images = {
        "sparse": (size, args.data_fraction),
        "full": (size // 2 // REGION * REGION, 1.0),
    }
    for label, (bytes_, fraction) in images.items():
        path = work / f"{label}.raw"
        data = write_image(path, bytes_, fraction, rng)
        previous = work / f"{label}.prev"
        previous.write_bytes(bytes(16 * dg.block_count(bytes_)))

        def ours(path: Path = path, size: int = bytes_, previous: Path = previous) -> object:
            return changes.find_changes(
                changes.file_chunks(str(path), size), size, previous, changes.CountMarker()
            )

        def tool(*argv: str, path: Path = path) -> Callable[[], object]:
            return lambda: subprocess.run([*argv, str(path)], check=True, capture_output=True)

        say(f"hash pass: {label} image, {bytes_ / GiB:g} GiB, {data / GiB:.2f} GiB data")
        t = medians(
            {
                "ours": ours,
                "xxhsum": tool("xxhsum", "-H2"),
                "b3sum": tool("b3sum", "--num-threads", "1"),
            },
            args.repeat,
        )
        out[f"{label}_ours_s"] = t["ours"]
        out[f"{label}_xxhsum_s"] = t["xxhsum"]
        out[f"{label}_b3sum_s"] = t["b3sum"]
        out[f"{label}_ours_gib_s"] = bytes_ / GiB / t["ours"]
        out[f"{label}_vs_xxhsum"] = t["xxhsum"] / t["ours"]
        out[f"{label}_vs_b3sum"] = t["b3sum"] / t["ours"]
        path.unlink()
    # The headline: the image as the other benchmarks build it (60 % data).
    out["file_hash_vs_xxhsum"] = out["sparse_vs_xxhsum"]
    out["file_hash_vs_b3sum"] = out["sparse_vs_b3sum"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.size_gib, args.repeat = 0.5, 3
    for tool in ("xxhsum", "b3sum"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: make setup installs it (Debian xxhash, b3sum)")
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="sendense-srcbench-", dir=args.workdir))
    try:
        results = bench_file(args, work, rng)
        line = (
            f"file_hash_vs_xxhsum={results['file_hash_vs_xxhsum']:.3f} "
            f"file_hash_vs_b3sum={results['file_hash_vs_b3sum']:.3f} "
            f"file_hash_gib_s={results['sparse_ours_gib_s']:.2f} "
            f"file_full_vs_xxhsum={results['full_vs_xxhsum']:.3f} "
            f"file_full_vs_b3sum={results['full_vs_b3sum']:.3f}"
        )
        if not args.skip_vmware:
            from vmware_bench import bench_vmware

            vm = bench_vmware(args, work, rng)
            results.update(vm)
            line += (
                f" vmware_full_ratio={vm['vmware_full_ratio']:.3f}"
                f" vmware_inc10_time_ratio={vm['vmware_inc10_time_ratio']:.3f}"
                f" vmware_full_s={vm['vmware_full_s']:.2f} nbdcopy_s={vm['nbdcopy_s']:.2f}"
                f" vmware_inc10_s={vm['vmware_inc10_s']:.2f}"
            )
        out = ROOT / "bench" / "results" / f"source-{time.strftime('%Y%m%dT%H%M%SZ')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(line)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
