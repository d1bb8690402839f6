"""Restore benchmark: whole-disk restore against ``qemu-img convert``.

Run by ``make bench-restore`` (and ``make bench``). One run:

1. builds a disk (default 4 GiB, ``--data-fraction`` of its 4 MiB regions
   random, the rest holes) in a qemu-storage-daemon "VM", starts a real hub
   and node, takes a full backup and ``--incrementals`` incrementals (the
   guest rewriting ``--change`` of the 64 KiB blocks before each);
2. per round (``--repeat``), for the newest restore point (read through its
   whole chain):
   - ``qemu-img convert -O raw`` of it into the hub's restore directory,
     flushed (``fsync``) as a restore flushes its file: the reference, as a
     user would run it; and the same with ``-t none`` (O_DIRECT, as the
     restore writes): the reference for the copy alone;
   - a Sendense whole-disk restore to a raw file in the same directory
     (``POST /api/v1/restores``), timed from the API call to the job's end
     (planning, the job, the flush and the rename included); the two take
     turns going first, after an untimed convert warmed the page cache;
3. checks that the restored file reads exactly as the restore point
   (``qemu-img compare``): ``restore_vs_convert`` is convert time / restore
   time (1.0 is as fast as convert; the target is at least 0.8), and
   ``restore_vs_convert_direct`` the same against ``convert -t none``;
4. file-level restore: a second VM whose disk has a GPT with one ext4
   partition holding a ``--file-mib`` (256) MiB file and a 3,000-entry
   directory gets a full and ``--chain`` - 1 (19) incrementals (the guest
   writes behind the partition, so the file's data stays in the base image
   and every read goes through the whole chain). Through restore sessions:
   the 3,000-entry directory listed ``--listings`` times (one page), p50/p99;
   the big file downloaded from the full and from the newest point, each as
   a ratio to reading the same bytes from a raw copy of the disk (warm cache
   for all three: each is read once before it is timed); the directory as a
   ZIP (MiB/s of archive).

Last line (``key=value``): ``listing_p50_ms= listing_p99_ms= full_vs_raw=
chain20_vs_full= zip_mib_s= restore_vs_convert= restore_vs_convert_direct=``
and the times behind them.
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
    p.add_argument("--file-mib", type=int, default=256, help="size of the downloaded file")
    p.add_argument("--chain", type=int, default=20, help="restore points of the file VM")
    p.add_argument("--listings", type=int, default=200, help="timed listings")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/var/tmp")))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.size_gib, args.incrementals, args.repeat = 0.5, 2, 1
        args.file_mib, args.chain, args.listings = 64, 5, 50
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
        converts, directs, restores_s = [], [], []

        def convert(*cache: str) -> float:
            # The same work as a restore, made as durable: a restore flushes
            # its file before it is linked into place.
            t0 = time.monotonic()
            subprocess.run(
                ["qemu-img", "convert", "-U", *cache, "-O", "raw", source, str(reference)],
                check=True,
                capture_output=True,
            )
            fd = os.open(reference, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return time.monotonic() - t0

        def restore() -> float:
            t0 = time.monotonic()
            started = cluster.client.post(
                "/api/v1/restores",
                {
                    "backup_id": backup_id,
                    "destination": {"type": "file", "path": str(restored), "format": "raw"},
                },
            )
            done = cluster.wait_job(started["job_id"], timeout=3600)
            if done["status"] != "completed":
                raise RuntimeError(f"restore ended {done['status']}: {done.get('error')}")
            return time.monotonic() - t0

        convert()  # the source in the page cache for both (not timed)
        drop(reference)
        for n in range(args.repeat):
            # Alternate which goes first, so neither always finds the cache warmer.
            # Two references: convert as a user runs it (through the page
            # cache, then flushed) and with O_DIRECT as the restore writes.
            if n % 2 == 0:
                converts.append(convert())
                subprocess.run(["sync"], check=True)
                drop(reference)
                directs.append(convert("-t", "none"))
                restores_s.append(restore())
            else:
                restores_s.append(restore())
                directs.append(convert("-t", "none"))
                drop(reference)
                subprocess.run(["sync"], check=True)
                converts.append(convert())
            same = subprocess.run(["qemu-img", "compare", "-U", str(restored), source])
            if same.returncode != 0:
                raise RuntimeError("the restored disk reads differently from the restore point")
            say(
                f"round {n + 1}: convert {converts[-1]:.2f}s, convert -t none "
                f"{directs[-1]:.2f}s, restore {restores_s[-1]:.2f}s"
            )
            drop(reference)
            drop(restored)
        convert_s = sorted(converts)[len(converts) // 2]
        direct_s = sorted(directs)[len(directs) // 2]
        restore_s = sorted(restores_s)[len(restores_s) // 2]
        results.update(convert_s=converts, convert_direct_s=directs, restore_s=restores_s)
        files = file_restore(cluster, work, args, rng)
        results.update(files)
        out = ROOT / "bench" / "results" / f"restore-{time.strftime('%Y%m%dT%H%M%SZ')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(
            f"listing_p50_ms={files['listing_p50_ms']:.1f} "
            f"listing_p99_ms={files['listing_p99_ms']:.1f} "
            f"full_vs_raw={files['full_mib_s'] / files['raw_mib_s']:.3f} "
            f"chain{args.chain}_vs_full={files['chain_mib_s'] / files['full_mib_s']:.3f} "
            f"zip_mib_s={files['zip_mib_s']:.0f} "
            f"restore_vs_convert={convert_s / restore_s:.3f} "
            f"restore_vs_convert_direct={direct_s / restore_s:.3f} restore_s={restore_s:.2f} "
            f"convert_s={convert_s:.2f} convert_direct_s={direct_s:.2f} size_gib={size / GiB:g} "
            f"raw_mib_s={files['raw_mib_s']:.0f} full_mib_s={files['full_mib_s']:.0f} "
            f"chain_mib_s={files['chain_mib_s']:.0f}"
        )
        return 0
    finally:
        cluster.stop()
        vm.stop()
        shutil.rmtree(work, ignore_errors=True)


def _download(cluster: Cluster, mount_id: str, path: str) -> tuple[int, float]:
    t0 = time.monotonic()
    n = 0
    with cluster.client.http.stream(
        "GET",
        f"/api/v1/restore/mounts/{mount_id}/download",
        params={"path": path, "partition": 1},
        timeout=600,
    ) as r:
        r.raise_for_status()
        for chunk in r.iter_raw():
            n += len(chunk)
    return n, time.monotonic() - t0


def file_restore(
    cluster: Cluster, work: Path, args: argparse.Namespace, rng: random.Random
) -> dict[str, Any]:
    """Listing latency, downloads (full, deep chain, raw) and ZIP throughput."""
    from fixtures.disks import PartitionSpec, build_ext4, build_partitioned

    tree = work / "tree"
    (tree / "many").mkdir(parents=True)
    for i in range(3000):
        (tree / "many" / f"f{i:04d}.txt").write_bytes(f"file {i}\n".encode())
    big = tree / "big.bin"
    with big.open("wb") as f:
        for _ in range(args.file_mib // 4):
            f.write(os.urandom(4 << 20))
    ext4 = work / "p1.ext4"
    build_ext4(ext4, tree, size=(args.file_mib + 96) << 20)
    raw = work / "fsdisk.raw"
    (offset,) = build_partitioned(raw, "gpt", [PartitionSpec(ext4, "linux")])
    tail = raw.stat().st_size
    with raw.open("r+b") as f:  # room behind the partition for the guest's writes
        f.truncate(tail + (64 << 20))
    shutil.rmtree(tree)
    vm = QsdVm(work / "fsvm", "fsvm")
    disk = vm.add_disk(raw.stat().st_size)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)],
        check=True,
        capture_output=True,
    )
    vm.start()
    try:
        node_id = cluster.client.get("/api/v1/nodes")["nodes"][0]["node_id"]
        src = cluster.client.post(
            "/api/v1/sources",
            {
                "name": "qemu-files",
                "node_id": node_id,
                "type": "qemu",
                "config": {"vms": [{"name": "fsvm", "qmp_socket": vm.qmp_socket}]},
            },
        )
        cluster.client.post("/api/v1/vms/discover", {"source_id": src["source_id"]})
        first = cluster.backup("fsvm", "full")["backups"][0]
        newest = first
        for i in range(args.chain - 1):
            h = vm.guest(0)
            try:
                h.pwrite(os.urandom(1 << 20), tail + (i % 60) * (1 << 20))
                h.flush()
            finally:
                h.shutdown()
            newest = cluster.backup("fsvm", "incremental")["backups"][0]
        say(f"file VM: full + {args.chain - 1} incrementals")
        # raw: the same bytes from a raw copy of the newest point's disk
        raw_copy = work / "fsdisk-copy.raw"
        src = cluster.client.get(f"/api/v1/backups/{newest}")["file_path"]
        subprocess.run(
            ["qemu-img", "convert", "-U", "-O", "raw", src, str(raw_copy)],
            check=True,
            capture_output=True,
        )
        size = args.file_mib << 20

        def read_raw() -> float:
            t0 = time.monotonic()
            with raw_copy.open("rb") as f:
                f.seek(offset)
                left = size
                while left > 0:
                    left -= len(f.read(min(4 << 20, left)))
            return time.monotonic() - t0

        read_raw()
        raw_s = read_raw()
        out: dict[str, Any] = {"raw_mib_s": args.file_mib / raw_s}
        sessions = {}
        for name, backup_id in (("full", first), ("chain", newest)):
            m = cluster.client.post("/api/v1/restore/mounts", {"backup_id": backup_id})
            sessions[name] = m["mount_id"]
            _download(cluster, m["mount_id"], "/big.bin")
            n, seconds = _download(cluster, m["mount_id"], "/big.bin")
            if n != size:
                raise RuntimeError(f"downloaded {n} bytes of {size}")
            out[f"{name}_mib_s"] = args.file_mib / seconds
            say(f"download from {name}: {out[f'{name}_mib_s']:.0f} MiB/s")
        mid = sessions["chain"]
        lat = []
        for _ in range(args.listings):
            t0 = time.monotonic()
            page = cluster.client.request(
                "GET",
                f"/api/v1/restore/mounts/{mid}/files",
                params={"path": "/many", "partition": 1, "limit": 5000},
            )
            lat.append((time.monotonic() - t0) * 1000)
            if page["total"] != 3000:
                raise RuntimeError(f"listing has {page['total']} entries")
        lat.sort()
        out["listing_p50_ms"] = lat[len(lat) // 2]
        out["listing_p99_ms"] = lat[max(0, -(-len(lat) * 99 // 100) - 1)]
        t0 = time.monotonic()
        n = 0
        with cluster.client.http.stream(
            "GET",
            f"/api/v1/restore/mounts/{mid}/download-directory",
            params={"path": "/", "partition": 1, "format": "zip"},
            timeout=600,
        ) as r:
            r.raise_for_status()
            for chunk in r.iter_raw():
                n += len(chunk)
        out["zip_mib_s"] = n / (1 << 20) / (time.monotonic() - t0)
        for mount_id in sessions.values():
            cluster.client.request("DELETE", f"/api/v1/restore/mounts/{mount_id}")
        return out
    finally:
        vm.stop()


if __name__ == "__main__":
    sys.exit(main())
