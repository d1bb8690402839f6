"""What must hold after any fault, once the system has settled.

Each check returns a list of problems (empty: it holds), one line each, so
the soak can print every broken invariant of a step at once. They take what
a user or an administrator has: the API's answers, the repository folder,
the process table, the NBD ports, and the catalog (for leases, which the API
does not show).

- `restore_point_problems`: every restore point the catalog calls completed
  reads byte-identical (``qemu-img compare``) to the truth image of its
  point in time;
- `repository_problems`: no file in the repository without a completed
  record, no completed record without its image and sidecar (the block hash
  list ``.blocks`` of a verify is the one optional file of a point:
  storage/chain.py ``point_files``);
- `process_problems` / `port_problems`: no qemu-nbd, nbdkit, node worker
  (beyond a live node's one spare) or file-restore worker left, no busy port
  in the hubs' NBD ranges;
- `lease_problems`: no job ``running`` past its lease;
- `restore_dir_problems`: a whole-disk restore that did not complete leaves
  no file at its path and no hidden partial file (guide, "Nothing
  half-written"); the soak removes what completed ones wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from fixtures.processes import busy_ports, processes_under
from sendense.catalog.db import Database
from sendense.catalog.models import BackupJob
from sendense.qemu import img

# Processes that may stay between steps are the hubs, nodes and VMs themselves;
# these may not (processes.py WATCHED, less the VMs and the hub).
LEAKABLE = ("qemu-nbd", "nbdkit", "sendense.node.worker", "sendense.restore.fs.worker")


def restore_point_problems(
    backups: Iterable[dict[str, Any]], truth_of: Callable[[dict[str, Any]], Path | None]
) -> list[str]:
    """Completed restore points that do not read as their truth image."""
    problems = []
    for b in backups:
        if b["status"] != "completed":
            continue
        truth = truth_of(b)
        where = (
            f"restore point {b['backup_id']} ({b['vm_name']} disk {b['disk_id']}, "
            f"job {b['job_id']})"
        )
        if truth is None:
            problems.append(f"{where}: completed, but no backup job of the soak made it")
        elif not Path(b["file_path"]).exists():
            problems.append(f"{where}: completed, but {b['file_path']} is missing")
        elif not img.compare(b["file_path"], str(truth)):
            problems.append(f"{where}: {b['file_path']} differs from its truth image {truth}")
    return problems


def repository_problems(repo: Path, backups: Iterable[dict[str, Any]]) -> list[str]:
    """Files without a record and records without their files."""
    problems = []
    allowed: set[Path] = set()
    for b in backups:
        if b["status"] != "completed":
            continue
        qcow2 = Path(b["file_path"])
        for required in (qcow2, qcow2.with_suffix(".json")):
            if not required.exists():
                problems.append(f"record {b['backup_id']} without its file {required}")
        allowed |= {qcow2, qcow2.with_suffix(".json"), qcow2.with_suffix(".blocks")}
    for path in sorted(p for p in repo.rglob("*") if p.is_file() or p.is_symlink()):
        if path not in allowed:
            problems.append(f"file without a completed record: {path}")
    return problems


def process_problems(root: Path, nodes: Iterable[int] = ()) -> list[str]:
    """qemu-nbd, nbdkit and worker processes left under ``root``.

    A live node keeps one spare worker (``sendense.node.worker --serve``, its
    child, waiting for the next job: node/runner.py); ``nodes`` are the pids
    of the live nodes, and one worker child of each is not a leak.
    """
    spares = set(nodes)
    problems = []
    for pid, cmd in processes_under(root):
        if not any(name in cmd for name in LEAKABLE):
            continue
        if "sendense.node.worker" in cmd and _parent(pid) in spares:
            spares.discard(_parent(pid))
            continue
        problems.append(f"process left: pid {pid}: {cmd[:300]}")
    return problems


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def port_problems(ranges: Iterable[tuple[int, int]]) -> list[str]:
    return [f"NBD port still busy: {port}" for r in ranges for port in busy_ports(*r)]


def lease_problems(db: Database, grace: float = 2.0) -> list[str]:
    """Jobs ``running`` whose owner's lease ran out (more than ``grace`` s ago)."""
    now = datetime.now(UTC)
    problems = []
    with db.session() as s:
        rows = s.scalars(select(BackupJob).where(BackupJob.status == "running")).all()
        for job in rows:
            lease = job.lease_until
            if lease is not None and lease.tzinfo is None:
                lease = lease.replace(tzinfo=UTC)
            if lease is None or lease + timedelta(seconds=grace) < now:
                problems.append(
                    f"job {job.id} ({job.kind}) running past its lease "
                    f"(owner {job.owner}, lease_until {job.lease_until}, step {job.step})"
                )
    return problems


def restore_dir_problems(directory: Path) -> list[str]:
    """Files in a restore directory the soak did not keep: partial files and
    files of restores that did not complete."""
    return [f"file left in the restore directory: {p}" for p in sorted(directory.rglob("*"))]
