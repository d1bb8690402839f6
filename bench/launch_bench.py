"""Where a small incremental spends its wall time on the hub (issue 11: a 1 %
incremental must take at most 0.1 x the full's time), A/B in one run.

Run: ``.venv/bin/python bench/launch_bench.py [--rounds 8] [--fulls 1] [--a-env K=V ...]
[--b-env K=V ...]``.

Two clusters side by side (each a hub and a node, real processes), one VM
each (``--size-gib`` 4 GiB, ``--data-fraction`` 0.6 of its 4 MiB regions
random, as bench/backup_bench.py builds it), a full backup each, then
``--rounds`` rounds of: the guest rewrites 1 % of its 64 KiB blocks, an
incremental through the API until the client sees it completed. The two
sides alternate (the order flips every round) so that the shared machine's
noise hits both alike; they differ only by the hub settings given with
``--a-env`` / ``--b-env``.

Per job, from the hub's and the worker's own log lines: the POST's answer
time, the hub's launch (read, targets up, record, node call), the node's part
(worker start to "status=" in job.log), the hub noticing the end (worker done
to the hub's finish start), the hub's finish (targets stopped, files:
``qemu-img check`` + sidecar, records, status) and the client's view.
Medians per side; the last line ``key=value``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from backup_bench import GiB, build_disk, guest_change  # noqa: E402
from fixtures.cluster import Cluster  # noqa: E402
from sendense.qemu.qsd import QsdVm  # noqa: E402

LAUNCHED = re.compile(
    r"job=(\S+) launched in ([\d.]+)s: read ([\d.]+), \d+ target\(s\) up ([\d.]+), "
    r"recorded ([\d.]+), node ([\d.]+)"
)
PLANNED = re.compile(r"job=\S+ vm=\S+ planned in ([\d.]+)s")
FINISHED = re.compile(
    r"job=(\S+) status=\S+ error=.* \(finished in ([\d.]+)s: read ([\d.]+), targets stopped "
    r"([\d.]+), files ([\d.]+), records ([\d.]+), status ([\d.]+)\)"
)


def stamp_of(line: str) -> float | None:
    try:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def parse_env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, _, v = item.partition("=")
        out[k] = v
    return out


class Side:
    def __init__(self, name: str, work: Path, env: dict[str, str], args: Any) -> None:
        self.name = name
        self.env = env
        self.vm = QsdVm(work / f"vm-{name}", f"vm{name}")
        self.size = int(args.size_gib * GiB)
        self.rng = random.Random(args.seed)
        build_disk(self.vm, work, self.size, args.data_fraction, self.rng)
        self.vm.start()
        (work / f"cluster-{name}").mkdir()
        self.cluster = Cluster(work / f"cluster-{name}", hub_env=env)
        self.cluster.start_node()
        self.cluster.start_hub()
        self.cluster.register(self.vm)
        self.samples: list[dict[str, float]] = []
        self.fulls: list[str] = []

    def backup(self, kind: str) -> dict[str, float]:
        c = self.cluster
        t0 = time.time()
        p0 = time.perf_counter()
        started = c.client.post(
            "/api/v1/backups",
            {"vm_name": self.vm.name, "repository_id": "default", "backup_type": kind},
        )
        post_s = time.perf_counter() - p0
        job = c.wait_job(started["job_id"], timeout=600)
        seconds = time.perf_counter() - p0
        seen = time.time()
        assert job["status"] == "completed", job
        if kind == "full":
            # Only the newest full (and what follows it) stays: the shared
            # disk holds few 2.4 GiB restore points.
            for old in self.fulls:
                c.client.request("DELETE", f"/api/v1/backups/{old}", params={"cascade": "true"})
            self.fulls = list(job["backups"])
        return self.phases(started["job_id"], t0, seen, seconds, post_s)

    def phases(
        self, job_id: str, t0: float, seen: float, seconds: float, post_s: float
    ) -> dict[str, float]:
        c = self.cluster
        out: dict[str, float] = {"seconds": seconds, "post": post_s}
        worker_done = worker_running = None
        for line in (c.node_dir / "jobs" / job_id / "job.log").read_text().splitlines():
            stamp = stamp_of(line)
            if stamp is None:
                continue
            if " status=" in line:
                worker_done = stamp
        status = json.loads((c.node_dir / "jobs" / job_id / "status.json").read_text())
        worker_running = datetime.fromisoformat(status["started_at"]).timestamp()
        finish_end = None
        for line in (c.root / "hub.log").read_text().splitlines():
            if job_id not in line:
                continue
            m = PLANNED.search(line)
            if m:
                out["plan"] = float(m[1])
            m = LAUNCHED.search(line)
            if m:
                out.update(
                    launch=float(m[2]),
                    launch_read=float(m[3]),
                    launch_targets=float(m[4]),
                    launch_record=float(m[5]),
                    launch_node=float(m[6]),
                )
            m = FINISHED.search(line)
            if m:
                finish_end = stamp_of(line)
                out.update(
                    finish=float(m[2]),
                    finish_read=float(m[3]),
                    finish_stop=float(m[4]),
                    finish_files=float(m[5]),
                    finish_records=float(m[6]),
                    finish_status=float(m[7]),
                )
        if worker_done and worker_running:
            out["node_worker"] = worker_done - worker_running
        if worker_done and finish_end is not None and "finish" in out:
            out["hub_notice"] = finish_end - out["finish"] - worker_done
        if finish_end is not None:
            out["client_notice"] = seen - finish_end
        return out

    def stop(self) -> None:
        self.cluster.stop()
        self.vm.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--fulls", type=int, default=1, help="full backups per side (median)")
    p.add_argument("--size-gib", type=float, default=4.0)
    p.add_argument("--data-fraction", type=float, default=0.6)
    p.add_argument("--fraction", type=float, default=0.01, help="share of blocks changed")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--a-env", action="append", default=[], help="hub setting of side A")
    p.add_argument("--b-env", action="append", default=[], help="hub setting of side B")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sendense-launch-", dir=args.workdir)).resolve()
    sides: list[Side] = []
    try:
        for name, env in (("a", parse_env(args.a_env)), ("b", parse_env(args.b_env))):
            sides.append(Side(name, work, env, args))
            print(f"side {name}: hub env {env}", flush=True)
        full_s: dict[str, list[float]] = {s.name: [] for s in sides}
        for n in range(args.fulls):
            for s in sides if n % 2 == 0 else sides[::-1]:
                full_s[s.name].append(s.backup("full")["seconds"])
                print(f"side {s.name}: full {full_s[s.name][-1]:.2f}s", flush=True)
        fulls = {k: statistics.median(v) for k, v in full_s.items()}
        for n in range(args.rounds):
            order = sides if n % 2 == 0 else sides[::-1]
            for s in order:
                guest_change(s.vm, s.size, args.fraction, s.rng)
                x = s.backup("incremental")
                s.samples.append(x)
                print(
                    f"round {n + 1} side {s.name}: "
                    + " ".join(f"{k}={v:.3f}" for k, v in x.items()),
                    flush=True,
                )
        keys = sorted({k for s in sides for x in s.samples for k in x})
        print(f"{'median s':<16}" + "".join(f"{s.name:>10}" for s in sides))
        result: dict[str, float] = {}
        for k in keys:
            row = []
            for s in sides:
                vals = [x[k] for x in s.samples if k in x]
                med = statistics.median(vals) if vals else float("nan")
                result[f"{s.name}_{k}"] = med
                row.append(med)
            print(f"{k:<16}" + "".join(f"{v:>10.3f}" for v in row))
        for s in sides:
            result[f"{s.name}_full"] = fulls[s.name]
            result[f"{s.name}_inc_ratio"] = result[f"{s.name}_seconds"] / fulls[s.name]
        print(" ".join(f"{k}={v:.4f}" for k, v in sorted(result.items())))
    finally:
        for s in sides:
            try:
                s.stop()
            except Exception as e:
                print(f"stopping side {s.name}: {e}")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
