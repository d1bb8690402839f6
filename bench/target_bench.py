"""Target options A/B (issue 11, "the target" levers): the hub's qemu-nbd target
with its cache and aio modes, QCOW2 cluster size and preallocation, and what
the final check costs.

``.venv/bin/python bench/target_bench.py [--size-gib 2] [--rounds 3]``

Per round, variants alternate (noise hits each alike). Each variant: a fresh
QCOW2 target served as the hub serves it (`QemuNbdServer`: TLS-PSK, detect-
zeroes=unmap, discard) with the variant's options; Sendense's `Mover` in this
process copies a source served by a read-only qemu-nbd into it (full: a disk
with ``--data-fraction`` of its 4 MiB regions random; incremental: 10 % of the
64 KiB blocks scattered, into a target backed by a full), then the target is
stopped (qemu-nbd flushes and closes: part of the time, as durability is).
After the copy: ``qemu-img check`` (what the hub runs) and the cheaper
structural probes (``qemu-img info``; ``check`` of an image never opened
uncleanly only walks metadata anyway). Prints medians and ratios to the
first variant; last line key=value.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import nbd  # noqa: E402

from backup_bench import BLOCK, REGION, build_scatter, run  # noqa: E402
from sendense.mover.copy import Mover  # noqa: E402
from sendense.nbd import psk  # noqa: E402
from sendense.qemu.nbd_server import QemuNbdServer  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30

# name -> (cache, aio, create options)
VARIANTS: dict[str, tuple[str, str | None, str]] = {
    "writeback": ("writeback", None, "cluster_size=65536"),
    "none_native": ("none", "native", "cluster_size=65536"),
    "none_io_uring": ("none", "io_uring", "cluster_size=65536"),
    "none_threads": ("none", "threads", "cluster_size=65536"),
    "writeback_prealloc": ("writeback", None, "cluster_size=65536,preallocation=metadata"),
    "none_native_prealloc": ("none", "native", "cluster_size=65536,preallocation=metadata"),
}


def full_source(path: Path, size: int, fraction: float, rng: random.Random) -> int:
    """A QCOW2 with ``fraction`` of its 4 MiB regions random data."""
    raw = path.with_suffix(".raw")
    regions = size // REGION
    chosen = sorted(rng.sample(range(regions), round(regions * fraction)))
    pool = [os.urandom(REGION) for _ in range(4)]
    fd = os.open(raw, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for n, region in enumerate(chosen):
            buf = bytearray(pool[n % 4])
            for off in range(0, REGION, BLOCK):
                buf[off : off + 8] = region.to_bytes(4, "little") + off.to_bytes(4, "little")
            os.pwrite(fd, buf, region * REGION)
    finally:
        os.close(fd)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    raw.unlink()
    return len(chosen) * REGION


def copy_once(
    work: Path,
    source: Path,
    size: int,
    variant: str,
    *,
    backing: Path | None,
) -> dict[str, float]:
    cache, aio, opts = VARIANTS[variant]
    target = work / f"t-{variant}.qcow2"
    target.unlink(missing_ok=True)
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if backing is not None:
        create += ["-b", str(backing), "-F", "qcow2"]
    run([*create, str(target), str(size)])
    tls = psk.make_server_dir(work / f"tls-{variant}", psk.new_key())
    src_srv = QemuNbdServer(
        str(source), export_name="src", socket_path=str(work / "src.sock"), read_only=True
    )
    dst_srv = QemuNbdServer(
        str(target),
        export_name="t",
        port=_free_port(),
        detect_zeroes="unmap",
        cache=cache,
        aio=aio,
        tls_psk_dir=str(tls),
        log_path=str(work / "qemu-nbd.log"),
    )
    src_srv.start()
    dst_srv.start()
    os.sync()
    try:
        src = nbd.NBD()
        src.add_meta_context("base:allocation")
        src.connect_uri(src_srv.url)
        dst = nbd.NBD()
        psk.use_key_file(dst, tls / psk.SERVER_FILE)
        dst.connect_uri(dst_srv.url)
        cpu0 = _cpu(dst_srv.pid)
        t0 = time.perf_counter()
        result = Mover(src, dst, size, target_is_zero=backing is None).run()
        dst.flush()
        copy_s = time.perf_counter() - t0
        cpu = _cpu(dst_srv.pid) - cpu0
        for h in (src, dst):
            h.shutdown()
        t1 = time.perf_counter()
        dst_srv.stop()
        close_s = time.perf_counter() - t1
    finally:
        dst_srv.stop()
        src_srv.stop()
        psk.remove_dir(tls)
    t2 = time.perf_counter()
    json.loads(run(["qemu-img", "check", "--output=json", str(target)]))
    check_s = time.perf_counter() - t2
    t3 = time.perf_counter()
    run(["qemu-img", "info", "--output=json", str(target)])
    info_s = time.perf_counter() - t3
    usage = target.stat().st_blocks * 512
    target.unlink()
    return {
        "seconds": copy_s + close_s,
        "copy_s": copy_s,
        "close_s": close_s,
        "target_cpu_s": cpu,
        "check_s": check_s,
        "info_s": info_s,
        "data_bytes": result.data_bytes,
        "usage_bytes": usage,
    }


def _cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-gib", type=float, default=2.0)
    p.add_argument("--data-fraction", type=float, default=0.6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--seed", type=int, default=2026)
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    size = int(args.size_gib * GiB) // REGION * REGION
    work = Path(tempfile.mkdtemp(prefix="sendense-targets-", dir=args.workdir))
    rng = random.Random(args.seed)
    samples: dict[str, list[dict[str, float]]] = {}
    try:
        full_src = work / "full.qcow2"
        data = full_source(full_src, size, args.data_fraction, rng)
        inc_src = build_scatter(work / "scatter.qcow2", size, 0.10, rng)
        base = work / "base.qcow2"
        shutil.copyfile(full_src, base)
        print(
            f"# {size / GiB:g} GiB disk, {data / MiB:.0f} MiB data; load {os.getloadavg()[0]:.2f}"
        )
        for n in range(args.rounds):
            order = variants if n % 2 == 0 else list(reversed(variants))
            for v in order:
                for kind, src, backing in (("full", full_src, None), ("inc10", inc_src, base)):
                    if backing is not None and "preallocation" in VARIANTS[v][2]:
                        # qemu-img: "Backing file and preallocation can only be
                        # used at the same time if extended_l2 is on".
                        continue
                    s = copy_once(work, src, size, v, backing=backing)
                    samples.setdefault(f"{kind}/{v}", []).append(s)
                    print(
                        f"# round {n + 1} {kind:5} {v:22} {s['seconds']:.3f}s "
                        f"(copy {s['copy_s']:.3f} close {s['close_s']:.3f}) "
                        f"target cpu {s['target_cpu_s']:.2f}s check {s['check_s']:.3f}s "
                        f"info {s['info_s']:.3f}s usage {s['usage_bytes'] / MiB:.0f} MiB",
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med: dict[str, dict[str, float]] = {
        k: {f: statistics.median(s[f] for s in v) for f in v[0]} for k, v in samples.items()
    }
    out: dict[str, Any] = {}
    for kind in ("full", "inc10"):
        ref = med[f"{kind}/{variants[0]}"]["seconds"]
        for v in variants:
            if f"{kind}/{v}" not in med:
                continue
            m = med[f"{kind}/{v}"]
            ratio = m["seconds"] / ref
            print(
                f"{kind:5} {v:22} {m['seconds']:.3f}s  x{ratio:.2f} of {variants[0]}  "
                f"target cpu {m['target_cpu_s']:.2f}s  check {m['check_s']:.3f}s  "
                f"info {m['info_s']:.3f}s"
            )
            out[f"{kind}_{v}_ratio"] = round(ratio, 3)
        out[f"{kind}_check_s"] = round(med[f"{kind}/{variants[0]}"]["check_s"], 3)
    print(" ".join(f"{k}={v}" for k, v in out.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
