"""A/B of the data mover's levers (issue 11), alternating in one run.

    .venv/bin/python bench/mover_levers.py [--gib 1] [--rounds 3] [--inc 0.1]
        [--workdir /var/tmp] [--variants JSON]

A source disk (raw, ``--gib`` GiB, 60 % random data in 1 MiB runs) is served
read-only by qemu-nbd on a unix socket (the VM's frozen view); each sample
copies it with `Mover` (in a process of its own, so that its peak RSS is the
mover's) into a new QCOW2 served by qemu-nbd over TCP with TLS-PSK, as the
hub serves targets. ``--inc F``: an incremental's pattern instead (a fraction
F of the 64 KiB blocks, scattered, into a target that is not zero).

Variants (JSON object name -> settings): in_flight, rs (request size),
window (bytes), conns (target connections), deadline (>0 turns resume and
its periodic flushes on), fb / fs (flush every bytes / seconds). Prints one
line per sample and the medians: wall s, mover CPU s, target qemu-nbd CPU s,
mover VmHWM MiB, flushes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from sendense.nbd import psk
from sendense.qemu import img
from sendense.qemu.nbd_server import QemuNbdServer

MiB = 1 << 20
DEFAULT_VARIANTS = {
    "base": {"in_flight": 8, "rs": 4 << 20},
    "resume": {"in_flight": 8, "rs": 4 << 20, "deadline": 300},
    "flush64M_1s": {"in_flight": 8, "rs": 4 << 20, "deadline": 300, "fb": 64 << 20, "fs": 1.0},
    "conns2": {"in_flight": 8, "rs": 4 << 20, "deadline": 300, "conns": 2},
    "conns4": {"in_flight": 16, "rs": 4 << 20, "deadline": 300, "conns": 4},
    "if64_win32M": {"in_flight": 64, "rs": 4 << 20, "deadline": 300, "window": 32 << 20},
}

CHILD = r"""
import json, sys, time
import nbd
from sendense.mover.copy import Mover
from sendense.mover.digest import BlockHashList
from sendense.nbd import psk
a = json.loads(sys.argv[1])
def src():
    h = nbd.NBD(); h.add_meta_context("base:allocation"); h.connect_uri(a["src"]); return h
def dst():
    h = nbd.NBD(); psk.use_key_file(h, a["key"]); h.connect_uri(a["dst"]); return h
dirty = a.get("dirty")
t0 = time.monotonic(); c0 = time.process_time()
m = Mover(src(), dst(), a["size"], hashes=BlockHashList(a["hl"], a["size"]),
          dirty_extents=dirty, target_is_zero=dirty is None,
          in_flight=a["in_flight"], request_size=a["rs"], window_bytes=a.get("window"),
          connections=a.get("conns", 1), reconnect_source=src, reconnect_target=dst,
          reconnect_deadline=a.get("deadline", 0), flush_bytes=a.get("fb", 256 << 20),
          flush_seconds=a.get("fs", 5.0))
r = m.run()
wall = time.monotonic() - t0
hwm = [x for x in open("/proc/self/status") if x.startswith("VmHWM")][0].split()[1]
print(json.dumps({"wall": wall, "cpu": time.process_time() - c0, "hwm_mib": int(hwm) / 1024,
                  "flushes": m.flushes, "data": r.data_bytes, "conns": len(m.dsts)}))
"""


def cpu_of(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def make_source(path: Path, size: int) -> None:
    rng = random.Random(1)
    with open(path, "wb") as f:
        f.truncate(size)
        for mib in range(size // MiB):
            if rng.random() < 0.6:
                f.seek(mib * MiB)
                f.write(rng.randbytes(MiB))


def sample(work: Path, size: int, variant: dict, src_url: str, dirty: list | None) -> dict:
    target = work / "dst.qcow2"
    target.unlink(missing_ok=True)
    img.create(str(target), size)
    keys = work / "tls"
    psk.remove_dir(keys)
    psk.make_server_dir(keys, psk.new_key())
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    subprocess.run(["sync"], check=True)
    with QemuNbdServer(str(target), port=port, tls_psk_dir=str(keys), shared=16) as d:
        assert d.pid is not None
        c0 = cpu_of(d.pid)
        args = dict(variant, src=src_url, dst=d.url, key=str(keys / psk.SERVER_FILE))
        args.update(size=size, hl=str(work / "h.x3"), dirty=dirty)
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"))
        out = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(args)],
            capture_output=True,
            text=True,
            env=env,
        )
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        res: dict = json.loads(out.stdout)
        res["tgt_cpu"] = cpu_of(d.pid) - c0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--inc", type=float, default=0.0, help="incremental: share of 64 KiB blocks")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--variants", default="", help="JSON (default: the built-in set)")
    a = ap.parse_args()
    variants = json.loads(a.variants) if a.variants else DEFAULT_VARIANTS
    size = int(a.gib * 1024) * MiB
    work = Path(tempfile.mkdtemp(prefix="mover-levers-", dir=a.workdir))
    try:
        make_source(work / "src.raw", size)
        dirty = None
        if a.inc:
            rng, block = random.Random(2), 64 << 10
            picked = sorted(rng.sample(range(size // block), int(size // block * a.inc)))
            dirty = [(b * block, block) for b in picked]
        results: dict[str, list[dict]] = {n: [] for n in variants}
        with QemuNbdServer(
            str(work / "src.raw"),
            fmt="raw",
            socket_path=str(work / "s.sock"),
            read_only=True,
            shared=16,
        ) as s:
            for r in range(a.rounds):
                for name, v in variants.items():
                    x = sample(work, size, v, s.url, dirty)
                    results[name].append(x)
                    print(name, r, json.dumps(x), flush=True)
        print("--- medians")
        keys = ("wall", "cpu", "tgt_cpu", "hwm_mib", "flushes")
        for name, xs in results.items():
            med = {k: round(statistics.median(x[k] for x in xs), 3) for k in keys}
            print(name, med, f"MB/s={xs[0]['data'] / 1e6 / med['wall']:.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
