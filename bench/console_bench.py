"""Web console pages on the API benchmark's catalog (issue 9: p95 < 300 ms).

``.venv/bin/python bench/console_bench.py [--requests 40] [--workdir DIR]``

Fills a catalog as ``bench/api_bench.py`` does (1,000 VMs of 2 disks, 50 runs:
50,000 jobs, 100,000 backups; SQLite), starts a real hub on it (scheduler
off), signs in to the console with the bootstrap token, and requests each page
below ``--requests`` times in a row, one at a time (ids and names at random),
measuring from send to the last byte. Prints a table and, as its last line,
``console_worst_p95_ms=`` and the page it belongs to.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from api_bench import Size, fill_catalog
from sendense.catalog.db import Database, sqlite_url
from sendense.cli.services import free_port, start_service, stop_service, wait_healthy
from sendense.secretbox import SecretBox


def pages(ids: dict[str, list[str]], rng: random.Random) -> dict[str, Callable[[], str]]:
    return {
        "dashboard": lambda: "/ui/",
        "running_fragment": lambda: "/ui/fragments/running",
        "vms": lambda: "/ui/vms",
        "vms_page_11": lambda: "/ui/vms?offset=500",
        "vm": lambda: "/ui/vms/" + rng.choice(ids["vms"]),
        "jobs": lambda: "/ui/jobs",
        "jobs_failed": lambda: "/ui/jobs?status=failed",
        "job": lambda: "/ui/jobs/" + rng.choice(ids["jobs"]),
        "job_progress": lambda: "/ui/jobs/" + rng.choice(ids["jobs"]) + "/progress",
        "backups": lambda: "/ui/backups",
        "backups_deep": lambda: "/ui/backups?offset=50000",
        "backups_of_vm": lambda: "/ui/backups?vm_name=" + rng.choice(ids["vms"]),
        "backup": lambda: "/ui/backups/" + rng.choice(ids["backups"]),
        "repositories": lambda: "/ui/repositories",
        "nodes": lambda: "/ui/nodes",
        "policies": lambda: "/ui/policies",
        "restore": lambda: "/ui/restore",
        "tokens": lambda: "/ui/tokens",
        "audit": lambda: "/ui/audit",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (debugging)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sendense-console-bench-", dir=args.workdir or "/var/tmp"))
    data = work / "hub"
    repo = data / "repositories" / "default"
    repo.mkdir(parents=True, mode=0o700)
    db = Database(sqlite_url(data / "catalog.db"))
    db.upgrade()
    t0 = time.perf_counter()
    catalog = fill_catalog(db, repo, SecretBox(data / "secret.key"), Size(1000, 2, 50), 1)
    db.dispose()
    print(f"filled in {time.perf_counter() - t0:.1f}s: {catalog.counts}", flush=True)
    ids = {"vms": catalog.vm_names, "backups": catalog.backup_ids, "jobs": catalog.job_ids}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    hub = start_service(
        ["hub", "serve", "--port", str(port), "--data-dir", str(data)],
        work / "hub.log",
        {"SENDENSE_SCHEDULER": "false"},
    )
    results: dict[str, float] = {}
    try:
        wait_healthy(f"{base}/api/v1/health", hub, work / "hub.log")
        token = (data / "admin.token").read_text().strip()
        c = httpx.Client(base_url=base, timeout=60)
        form = c.get("/ui/signin").text
        m = re.search(r'name="csrf" value="([^"]+)"', form)
        assert m is not None
        r = c.post("/ui/signin", data={"csrf": m.group(1), "token": token})
        assert r.status_code == 303, r.text
        rng = random.Random(2)
        print(f"{'page':18s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s}")
        for name, path in pages(ids, rng).items():
            c.get(path())  # warm: caches as a page already looked at has them
            ms = []
            for _ in range(args.requests):
                t = time.perf_counter()
                r = c.get(path())
                ms.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, (name, r.status_code)
            ms.sort()
            p95 = ms[int(0.95 * (len(ms) - 1))]
            results[name] = p95
            print(f"{name:18s} {ms[len(ms) // 2]:8.1f} {p95:8.1f} {ms[-1]:8.1f}", flush=True)
    finally:
        stop_service(hub)
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))
    worst = max(results, key=lambda k: results[k])
    print(f"console_worst_p95_ms={results[worst]:.1f} console_worst_page={worst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
