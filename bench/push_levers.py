"""A/B of the push copy's CPU levers (issue 11), alternating in one run.

    .venv/bin/python bench/push_levers.py [--gib 1] [--rounds 3]
        [--workdir /var/tmp] [--variants JSON]

The push data path without hub and node: a raw source (``--gib`` GiB, 60 %
random data in 4 MiB regions) served read-only by qemu-nbd on a unix socket
(the VM's frozen view), copied by `Mover` with the digest (a process of its
own, as the node's worker) into a new QCOW2 served by qemu-nbd over TCP with
TLS-PSK and the hub's modes (``--cache=none --aio=native``,
``--detect-zeroes=unmap``). Per sample: wall seconds and CPU seconds per GiB
of data of the worker, the target and the source (``w_cpg``, ``t_cpg``,
``s_cpg``), the target's peak RSS (MiB) and, with ``count``, the mover's
trips through its poll loop. Variants (JSON object name -> settings):

- ``malloc``: false runs both qemu-nbd with glibc's defaults
  (``QemuNbdServer(tune_malloc=False)``); ``src_malloc``: the source's alone
  (false: as a VM's QEMU runs);
- ``drain``: `sendense.mover.copy.DRAIN_ROUNDS` in the worker (0: one notify
  per wake-up, as before);
- ``inline``: `HASH_INLINE_BELOW` (0: every hash in the hashing thread);
  ``pread_init``: `PREAD_INITIALIZE` (true: libnbd zeroes read buffers);
- ``rs``, ``in_flight``, ``window``: the mover's request size, requests and
  bytes in flight; ``nohash``: no digest;
- ``cluster``, ``opts``: the target's cluster size and other qemu-img create
  options (``{"extended_l2": "on"}``); ``cache``, ``aio``: its modes;
- ``prio``: the target's GnuTLS priority string (`nbd.psk.PRIORITY`);
- ``inc``: an incremental's pattern instead of a full (this share of the
  64 KiB blocks, scattered, given as dirty extents; the target not zero);
  ``cprof``: print the worker's cProfile (top 25 by own time) to stderr;
  ``perf``: a file to ``perf record`` the worker into; ``wenv``: more
  environment for the worker.

Measured with it: docs/performance.md, "The push full's CPU".
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sendense.nbd import psk  # noqa: E402
from sendense.qemu import img  # noqa: E402
from sendense.qemu.nbd_server import QemuNbdServer  # noqa: E402

MiB = 1 << 20
DEFAULT_VARIANTS = {
    "before": {"malloc": False, "drain": 0},
    "malloc": {"drain": 0},
    "malloc+drain": {},
}

CHILD = r"""
import json, sys, time
import nbd
import sendense.mover.copy as mc
from sendense.mover.copy import Mover
from sendense.mover.digest import BlockHashList
from sendense.nbd import psk
a = json.loads(sys.argv[1])
if "drain" in a:
    mc.DRAIN_ROUNDS = a["drain"]
if "inline" in a:
    mc.HASH_INLINE_BELOW = a["inline"]
if "pread_init" in a:
    mc.PREAD_INITIALIZE = a["pread_init"]
def src():
    h = nbd.NBD(); h.add_meta_context("base:allocation"); h.connect_uri(a["src"]); return h
def dst():
    h = nbd.NBD(); psk.use_key_file(h, a["key"]); h.connect_uri(a["dst"]); return h
polls = [0]
real = Mover._poll
def counted(*x):
    polls[0] += 1
    return real(*x)
Mover._poll = staticmethod(counted)
if a.get("cprof"):
    import cProfile, pstats
    prof = cProfile.Profile()
t0 = time.monotonic(); c0 = time.process_time()
if a.get("cprof"):
    prof.enable()
m = Mover(src(), dst(), a["size"], dirty_extents=a.get("dirty"),
          target_is_zero=a.get("dirty") is None,
          hashes=None if a.get("nohash") else BlockHashList(a["hl"], a["size"]),
          in_flight=a.get("in_flight", 8), request_size=a.get("rs", 4 << 20),
          window_bytes=a.get("window"), reconnect_source=src, reconnect_target=dst,
          reconnect_deadline=300)
r = m.run()
wall, cpu = time.monotonic() - t0, time.process_time() - c0
if a.get("cprof"):
    prof.disable()
    pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
print(json.dumps({"wall": wall, "cpu": cpu,
                  "data": r.data_bytes, "polls": polls[0], "requests": m.requests}))
"""


def cpu_of(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def hwm_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) // 1024
    return 0


def make_source(path: Path, size: int) -> None:
    rng = random.Random(1)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // (4 * MiB)):
            if rng.random() < 0.6:
                f.seek(i * 4 * MiB)
                f.write(rng.randbytes(4 * MiB))


def sample(work: Path, size: int, v: dict, src: QemuNbdServer) -> dict:
    target = work / "dst.qcow2"
    target.unlink(missing_ok=True)
    img.create(str(target), size, cluster_size=v.get("cluster"), extra_options=v.get("opts"))
    keys = work / "tls"
    psk.remove_dir(keys)
    psk.make_server_dir(keys, psk.new_key())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    default_priority = psk.PRIORITY
    psk.PRIORITY = v.get("prio", default_priority)
    subprocess.run(["sync"], check=True)
    try:
        dst = QemuNbdServer(
            str(target),
            port=port,
            tls_psk_dir=str(keys),
            shared=16,
            cache=v.get("cache", "none"),
            aio=v.get("aio", "native"),
            detect_zeroes="unmap",
            tune_malloc=v.get("malloc", True),
        )
        dst.start()
    finally:
        psk.PRIORITY = default_priority
    try:
        assert dst.pid is not None and src.pid is not None
        t0, s0 = cpu_of(dst.pid), cpu_of(src.pid)
        args = dict(v, src=src.url, dst=dst.url, key=str(keys / psk.SERVER_FILE), size=size)
        args["hl"] = str(work / "h.x3")
        if v.get("inc"):
            rng, block = random.Random(2), 64 << 10
            picked = sorted(rng.sample(range(size // block), int(size // block * v["inc"])))
            args["dirty"] = [(b * block, block) for b in picked]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        env.update(v.get("wenv", {}))
        cmd = [sys.executable, "-c", CHILD, json.dumps(args)]
        if v.get("perf"):  # perf record of the worker into WORKDIR/../perf-<file>
            cmd = ["perf", "record", "-q", "-g", "-F", "2999", "-o", v["perf"], "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        if v.get("cprof"):
            print(out.stderr[-8000:])
        x: dict = json.loads(out.stdout)
        x["t_hwm"] = hwm_mib(dst.pid)
        x["tgt_cpu"], x["src_cpu"] = cpu_of(dst.pid) - t0, cpu_of(src.pid) - s0
    finally:
        dst.stop()
    gib = x["data"] / (1 << 30)
    x.update(w_cpg=x["cpu"] / gib, t_cpg=x["tgt_cpu"] / gib, s_cpg=x["src_cpu"] / gib)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--variants", default="", help="JSON (default: the built-in set)")
    a = ap.parse_args()
    variants = json.loads(a.variants) if a.variants else DEFAULT_VARIANTS
    size = int(a.gib * 1024) * MiB
    work = Path(tempfile.mkdtemp(prefix="push-levers-", dir=a.workdir))
    keys = ("wall", "w_cpg", "t_cpg", "s_cpg", "t_hwm", "polls")
    try:
        make_source(work / "src.raw", size)
        results: dict[str, list[dict]] = {n: [] for n in variants}
        for r in range(a.rounds):
            for name, v in variants.items():
                # The source server is started per sample: its malloc settings
                # follow the variant's (a VM's QEMU has glibc's defaults).
                with QemuNbdServer(
                    str(work / "src.raw"),
                    fmt="raw",
                    socket_path=str(work / "s.sock"),
                    read_only=True,
                    shared=16,
                    tune_malloc=v.get("src_malloc", v.get("malloc", True)),
                ) as src:
                    x = sample(work, size, v, src)
                results[name].append(x)
                print(name, r, {k: round(x[k], 3) for k in keys}, flush=True)
        print("--- medians")
        for name, xs in results.items():
            print(name, {k: round(statistics.median(x[k] for x in xs), 3) for k in keys})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
