"""Pull full vs one-hop ``qemu-img convert`` vs push full, alternating, one run.

    .venv/bin/python bench/pull_bench.py [--size-gib 1] [--data-fraction 0.6] [--repeat 3]

One qsd VM with one disk (``fraction`` of its 4 MiB regions random data),
one hub and one node (real processes, tests/fixtures/cluster.py). Each round
runs, in an order that rotates every round:

- ``onehop``: ``qemu-img convert -f raw -O qcow2`` from the VM's own NBD
  export into a QCOW2 (as bench/backup_bench.py measures it: no TLS, no
  flush, nothing frozen);
- ``pull``: a Sendense full with the node at ``SENDENSE_NODE_TRANSFER=pull``
  (API call to job completed: freeze, TLS-PSK, the node's hashing read,
  ``qemu-img convert -t none``, check, catalog);
- ``push``: the same full with the node at ``push``.

The node is restarted between pull and push (its setting is read at start).
CPU seconds per kind of process, sampled (`CpuSampler`): hub, node,
worker, qemu-img, nbdkit, qemu-nbd, vm (qemu-storage-daemon). Last line:
``pull_full_vs_onehop=`` (one-hop seconds ÷ pull seconds, medians),
``pull_vs_push=`` (push seconds ÷ pull seconds) and CPU seconds per GiB
of data of each.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.cluster import Cluster, port_range  # noqa: E402
from sendense.qemu.qsd import QsdVm  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
REGION = 4 * MiB
VM = "pullbench"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


KINDS = (
    ("qemu-img", b"qemu-img"),
    ("nbdkit", b"nbdkit"),
    ("qemu-nbd", b"qemu-nbd"),
    ("vm", b"qemu-storage-daemon"),
    ("worker", b"sendense.node.worker"),
    ("node", b"node\0serve"),
    ("hub", b"hub"),
)


class CpuSampler:
    """CPU seconds per kind of process (hub, node, worker, qemu-img, nbdkit,
    qemu-nbd, vm) over a span: every 50 ms, the user+system time of each
    process whose command line mentions the work folder; a process's share
    is its last sample minus its first (or zero if it started in the span).
    A process that ends loses at most its last 50 ms."""

    def __init__(self, work: Path) -> None:
        self.needle = str(work).encode()
        self.first: dict[int, tuple[str, float]] = {}
        self.last: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _scan(self, initial: bool) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if self.needle not in cmd:
                continue
            t = (int(f[11]) + int(f[12])) / tick
            if pid not in self.first:
                kind = next((k for k, needle in KINDS if needle in cmd), "other")
                self.first[pid] = (kind, t if initial else 0.0)
            self.last[pid] = t

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self._scan(False)

    def __enter__(self) -> CpuSampler:
        self._scan(True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._scan(False)

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (kind, t0) in self.first.items():
            out[kind] = out.get(kind, 0.0) + self.last[pid] - t0
        return {k: round(v, 3) for k, v in sorted(out.items())}


def build_disk(vm: QsdVm, work: Path, size: int, fraction: float, rng: random.Random) -> int:
    disk = vm.add_disk(size)
    raw = work / "build.raw"
    regions = size // REGION
    chosen = sorted(rng.sample(range(regions), round(regions * fraction)))
    with open(raw, "wb") as f:
        f.truncate(size)
        for r in chosen:
            f.seek(r * REGION)
            f.write(os.urandom(REGION))
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)],
        check=True,
        capture_output=True,
    )
    raw.unlink()
    return len(chosen) * REGION


class Bench:
    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work = work
        self.args = args
        self.vm = QsdVm(work / "vm", VM)
        first, last = port_range()
        self.pull_env = {
            "SENDENSE_NODE_TRANSFER": "pull",
            "SENDENSE_NODE_PULL_PORT_FIRST": str(first),
            "SENDENSE_NODE_PULL_PORT_LAST": str(last),
        }
        self.cluster = Cluster(work / "cluster", node_env=dict(self.pull_env))
        self.samples: dict[str, list[float]] = {"onehop": [], "pull": [], "push": []}
        self.cpu: dict[str, list[dict[str, float]]] = {"pull": [], "push": []}
        self.data = 0
        self.mode = "pull"

    def setup(self) -> None:
        size = int(self.args.size_gib * GiB) // REGION * REGION
        rng = random.Random(7)
        self.data = build_disk(self.vm, self.work, size, self.args.data_fraction, rng)
        self.vm.start()
        (self.work / "cluster").mkdir()
        self.cluster.start_node()
        self.cluster.start_hub()
        self.cluster.register(self.vm)
        say(f"{size / GiB:g} GiB disk, {self.data / MiB:.0f} MiB data; hub and node up")

    def node_mode(self, mode: str) -> None:
        if mode == self.mode:
            return
        self.cluster.kill("node", 15)
        assert self.cluster.node is not None
        self.cluster.node.wait()
        self.cluster.node_env = dict(self.pull_env) if mode == "pull" else {}
        self.cluster.start_node()
        self.mode = mode

    def onehop(self) -> None:
        out = self.work / "onehop.qcow2"
        url = f"nbd+unix:///guest0?socket={self.vm.guest_socket}"
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", url, str(out)],
            check=True,
            capture_output=True,
        )
        s = time.perf_counter() - t0
        out.unlink()
        self.samples["onehop"].append(s)
        say(f"onehop {s:.3f}s")

    def full(self, mode: str) -> None:
        self.node_mode(mode)
        c = self.cluster
        os.sync()
        with CpuSampler(self.work) as sampler:
            t0 = time.perf_counter()
            started = c.client.post(
                "/api/v1/backups",
                {"vm_name": VM, "repository_id": "default", "backup_type": "full"},
            )
            while True:
                job: dict[str, Any] = c.client.get(f"/api/v1/jobs/{started['job_id']}", wait=0.25)
                if job["status"] in ("completed", "failed", "cancelled"):
                    break
            s = time.perf_counter() - t0
        if job["status"] != "completed":
            raise SystemExit(f"{mode} full {job['status']}: {job.get('error')}")
        used = sampler.by_kind()
        self.samples[mode].append(s)
        self.cpu[mode].append(used)
        say(f"{mode} full {s:.3f}s cpu " + " ".join(f"{k}={v:.2f}" for k, v in used.items()))
        for b in job["backups"]:
            path = c.client.get(f"/api/v1/backups/{b}")["file_path"]
            Path(path).unlink(missing_ok=True)  # keep the repository small; not a restore

    def run(self) -> str:
        order = ["onehop", "pull", "push"]
        for n in range(self.args.repeat):
            say(f"round {n + 1}/{self.args.repeat}")
            for what in order[n % 3 :] + order[: n % 3]:
                self.onehop() if what == "onehop" else self.full(what)
        med = {k: statistics.median(v) for k, v in self.samples.items()}
        gib = self.data / GiB
        cpu_per_gib = {
            mode: {
                k: statistics.median(r.get(k, 0.0) for r in rows) / gib
                for k in sorted({k for r in rows for k in r})
            }
            for mode, rows in self.cpu.items()
        }
        for mode, per in cpu_per_gib.items():
            say(f"{mode}: cpu s/GiB " + " ".join(f"{k}={v:.2f}" for k, v in per.items()))
        say("medians: " + " ".join(f"{k}={v:.3f}s" for k, v in med.items()))
        return (
            f"pull_full_vs_onehop={med['onehop'] / med['pull']:.3f} "
            f"pull_vs_push={med['push'] / med['pull']:.3f} "
            f"pull_s={med['pull']:.3f} push_s={med['push']:.3f} onehop_s={med['onehop']:.3f} "
            f"pull_cpu_s_per_gib={sum(cpu_per_gib['pull'].values()):.2f} "
            f"push_cpu_s_per_gib={sum(cpu_per_gib['push'].values()):.2f}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--data-fraction", type=float, default=0.6)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pullbench-"))
    bench = Bench(work, args)
    try:
        bench.setup()
        print(bench.run())
    finally:
        bench.cluster.stop()
        bench.vm.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
