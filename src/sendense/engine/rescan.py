"""The ``rescan`` job: rebuild catalog records from a repository's files.

Disaster recovery of the hub itself. The catalog is lost; the repositories
are not. The administrator starts a hub on an empty catalog, registers the
node and source again and runs discovery (the VMs get rows again), creates
the repository on the same folder if it is not ``default``, then::

    POST /api/v1/repositories/{repository_id}/rescan      -> 202 job

Plan, then execute (``{"dry_run": true}`` stops after the plan)::

    scan      every <vm>/<disk_key>/*.qcow2 with its sidecar
              (storage/rescan.py), parents paired by the images' own
              backing file names
    plan      per restore point: import, already known (its backup_id is in
              the catalog), or skipped with a reason
    execute   per VM, one transaction: the disk row if the VM lost it, one
              synthetic completed job per original job_id, then the
              restore points, parents first, with their parent links,
              change ids, digests, sizes, times and immutable locks

Decisions:

- **VMs are matched, never invented.** A VM row needs its source (and the
  source its node): a restore point is imported only when the catalog knows
  its VM, by ``vm_context_id`` or else by ``vm_name``. Restore points of
  unknown VMs are counted in ``result.unknown_vms``; register and discover
  their source, then rescan again. Their files stay readable with stock
  ``qemu-img`` meanwhile (guide: "Reading a restore point without Sendense").
- **Disks are matched by disk_id.** A disk that no longer exists in the VM
  gets its row back from the sidecar (index, key, capacity). A disk_id now
  held by another disk_key is a conflict: those restore points are skipped.
- **Idempotent.** A backup_id or a file already in the catalog is left as
  it is; running the job twice imports nothing the second time.
- **Locks.** ``immutable_until`` is the later of the sidecar's and
  ``created_at + retention_days`` when the repository is immutable; a live
  lock puts the immutable attribute back on the files.

The imported rows take the repository being rescanned, whatever id the
sidecar names (a repository re-created after the loss has a new id).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sendense.catalog.db import Database
from sendense.catalog.models import Backup, BackupJob, Repository, Vm, VmDisk
from sendense.catalog.stores import RepositoryStore, VmStore, disk_of
from sendense.core.errors import Error, NotFound
from sendense.engine.lifecycle import JobContext
from sendense.storage import immutability
from sendense.storage import rescan as files

if TYPE_CHECKING:
    from sendense.hub.state import HubState

log = logging.getLogger(__name__)

KIND = "rescan"
MAX_PROBLEMS = 200


class _DryRun(Exception):
    """Rolls back a planned VM's transaction."""


@dataclass
class Outcome:
    imported: int = 0
    already_known: int = 0
    jobs_created: int = 0
    disks_created: int = 0
    locked: int = 0
    unknown_vms: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)
    imported_ids: list[str] = field(default_factory=list)

    def problem(self, path: Path | str, text: str) -> None:
        self.problems.append({"path": str(path), "problem": text})

    def as_result(self, scanned: int, dry_run: bool) -> dict[str, Any]:
        return {
            "dry_run": dry_run,
            "restore_points_found": scanned,
            "imported": self.imported,
            "already_known": self.already_known,
            "skipped": self.skipped,
            "jobs_created": self.jobs_created,
            "disks_created": self.disks_created,
            "locked": self.locked,
            "unknown_vms": self.unknown_vms,
            "problem_count": len(self.problems),
            "problems": self.problems[:MAX_PROBLEMS],
        }


def lock_until(repo: Repository, point: files.Point) -> datetime | None:
    """The later of the sidecar's lock and the repository's rule for new backups."""
    ends = [files.parse_time(point.sidecar.get("immutable_until"))]
    if repo.immutable and repo.retention_days > 0:
        ends.append(point.created_at + timedelta(days=repo.retention_days))
    found = [t for t in ends if t is not None]
    return max(found) if found else None


def _find_vm(s: Session, sidecar: dict[str, Any]) -> Vm | None:
    vm = VmStore(s).get(str(sidecar.get("vm_context_id") or ""))
    if vm is not None and vm.name == sidecar["vm_name"]:
        return vm
    return VmStore(s).by_name(str(sidecar["vm_name"]))


def _disk(s: Session, vm: Vm, p: files.Point, out: Outcome) -> VmDisk | None:
    disk = disk_of(vm, p.disk_id)
    if disk is not None:
        if disk.disk_key != p.disk_key:
            out.problem(
                p.path,
                f"disk_id {p.disk_id} of VM {vm.name} is now disk_key {disk.disk_key}, the "
                f"restore point was of disk_key {p.disk_key}; skipped",
            )
            return None
        return disk
    capacity = int(p.sidecar.get("capacity_bytes") or p.sidecar.get("total_bytes") or 0)
    disk = VmDisk(
        disk_index=p.disk_id,
        disk_key=p.disk_key,
        label=f"disk {p.disk_id} (from rescan; no longer in the VM)",
        capacity_bytes=capacity,
        size_gb=round(capacity / 2**30, 3),
        path="",
    )
    vm.disks.append(disk)
    s.flush()
    out.disks_created += 1
    return disk


def _job(
    s: Session, vm: Vm, repo: Repository, p: files.Point, rescan_id: str, out: Outcome
) -> BackupJob:
    job = s.get(BackupJob, p.job_id)
    if job is not None:
        return job
    job = BackupJob(
        id=p.job_id,
        kind="backup",
        vm_id=vm.id,
        repository_id=repo.id,
        node_id=vm.source.node_id if vm.source else None,
        status="completed",
        step="completed",
        requested_type=p.sidecar["backup_type"],
        tags=dict(p.sidecar.get("tags") or {}),
        messages={"node": [f"record rebuilt from {repo.name} by rescan job {rescan_id}"]},
        created_by="rescan",
        created_at=p.created_at,
        started_at=p.created_at,
        finished_at=p.finished_at or p.created_at,
        params={"rescanned_by": rescan_id},
    )
    s.add(job)
    s.flush()
    out.jobs_created += 1
    return job


def import_vm(
    s: Session,
    repo: Repository,
    vm: Vm,
    pairs: list[tuple[files.Point, files.Point | None]],
    rescan_id: str,
    out: Outcome,
) -> list[tuple[str, datetime]]:
    """Import one VM's restore points (parents first); (file, lock end) to lock."""
    to_lock = []
    known_files = set(s.scalars(select(Backup.file_path).where(Backup.vm_id == vm.id)).all())
    in_catalog: dict[str, Backup] = {}
    for p, parent in pairs:
        existing = s.get(Backup, p.backup_id)
        if existing is not None or str(p.path) in known_files:
            out.already_known += 1
            if existing is not None:
                in_catalog[p.backup_id] = existing
            continue
        parent_row = None
        if parent is not None:
            parent_row = in_catalog.get(parent.backup_id) or s.get(Backup, parent.backup_id)
            if parent_row is None or parent_row.status != "completed":
                out.skipped += 1
                out.problem(p.path, f"its parent {parent.path.name} is not in the catalog; skipped")
                continue
        disk = _disk(s, vm, p, out)
        if disk is None:
            out.skipped += 1
            continue
        job = _job(s, vm, repo, p, rescan_id, out)
        sc = p.sidecar
        until = lock_until(repo, p)
        b = Backup(
            id=p.backup_id,
            job_id=job.id,
            vm_id=vm.id,
            vm_disk_id=disk.id,
            disk_index=disk.disk_index,
            disk_key=disk.disk_key,
            repository_id=repo.id,
            parent_id=parent_row.id if parent_row else None,
            # The image decides: a backing file makes it an incremental.
            backup_type="incremental" if parent_row else "full",
            status="completed",
            file_path=str(p.path),
            nbd_export_name="",
            total_bytes=int(sc.get("total_bytes") or sc.get("capacity_bytes") or 0),
            bytes_transferred=int(sc.get("bytes_transferred") or 0),
            size_on_disk=p.size_on_disk,
            change_id=sc.get("change_id"),
            previous_change_id=parent_row.change_id if parent_row else None,
            digest=sc.get("digest"),
            tags=dict(sc.get("tags") or {}),
            created_at=p.created_at,
            started_at=p.created_at,
            finished_at=p.finished_at or p.created_at,
            immutable_until=until,
            synthetic=bool(sc.get("synthetic")),
        )
        s.add(b)
        s.flush()
        in_catalog[b.id] = b
        out.imported += 1
        out.imported_ids.append(b.id)
        if until is not None:
            to_lock.append((b.file_path, until))
    return to_lock


class RescanJob:
    """`LocalJob` of kind ``rescan`` (params: ``repository_id``, ``dry_run``)."""

    kind = KIND

    def __init__(self, st: HubState) -> None:
        self.db: Database = st.db

    def execute(self, job_id: str, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        dry_run = bool(params.get("dry_run"))
        with self.db.session() as s:
            repo = RepositoryStore(s).get(params["repository_id"])
            if repo is None:
                raise NotFound(f"repository {params['repository_id']} not found")
            root = Path(repo.path)
            encrypted = bool(repo.encrypted)
        if not root.is_dir():
            raise Error(f"repository folder {root} is not reachable", code="repository_offline")
        ctx.progress("scanning files", force=True)
        found = files.scan(root)
        # An encrypted image in a plain repository (or the reverse) cannot be
        # read with this repository's key: not imported, reported.
        mismatched = [p for p in found.points if p.encrypted != encrypted]
        usable = [p for p in found.points if p.encrypted == encrypted]
        pairs, problems = files.order_by_parent(usable)
        out = Outcome(problems=[*found.problems, *problems])
        for p in mismatched:
            out.problem(
                p.path,
                "encrypted image in a repository that is not encrypted"
                if p.encrypted
                else "unencrypted image in an encrypted repository",
            )
        out.skipped = len(found.points) - len(pairs)
        by_vm: dict[str, list[tuple[files.Point, files.Point | None]]] = defaultdict(list)
        for p, parent in pairs:
            by_vm[p.vm_name].append((p, parent))
        total = len(pairs)
        done = 0
        log.info("job=%s rescan path=%s points=%d vms=%d", job_id, root, total, len(by_vm))
        for vm_name, vm_pairs in sorted(by_vm.items()):
            ctx.check_cancel()
            ctx.progress(f"importing {vm_name}", done=done, total=total)
            to_lock: list[tuple[str, datetime]] = []
            try:
                with self.db.session() as s:
                    repo_row = RepositoryStore(s).get(params["repository_id"])
                    assert repo_row is not None
                    vm = _find_vm(s, vm_pairs[0][0].sidecar)
                    if vm is None:
                        out.unknown_vms[vm_name] = len(vm_pairs)
                        out.skipped += len(vm_pairs)
                    else:
                        to_lock = import_vm(s, repo_row, vm, vm_pairs, job_id, out)
                    if dry_run:
                        raise _DryRun
            except _DryRun:
                to_lock = []
            done += len(vm_pairs)
            now = datetime.now(UTC)
            for path, until in to_lock:
                if until > now and immutability.lock_point(path):
                    out.locked += 1
        ctx.progress("done", done=total, total=total, force=True)
        result = out.as_result(len(found.points), dry_run)
        log.info(
            "job=%s rescan imported=%d known=%d skipped=%d unknown_vms=%s",
            job_id,
            out.imported,
            out.already_known,
            out.skipped,
            sorted(out.unknown_vms),
        )
        return result

    def recover(self, job_id: str, params: dict[str, Any]) -> None:
        """Nothing to repair: each VM is one transaction, and a rerun is idempotent."""

    def on_end(self, job_id: str, params: dict[str, Any], status: str) -> None:
        pass
