"""Deleting restore points: check, mark, remove the files, drop the records.

A restore point is a QCOW2 image, its sidecar (and the block hash list of
its last good verify), and its catalog row. They go together, even across a
crash of the hub::

    check     one transaction, the VM's row locked (as a backup start does):
              refuse 409 ``in_use`` (a job or a restore session holds one of
              them, or a job still writes one), ``has_dependents`` (newer
              restore points read through it; ``cascade`` takes them along),
              ``immutable`` (a lock that has not expired, or a file with the
              immutable attribute) -- every backup of a cascade is checked
              before anything is touched
    mark      same transaction: status ``deleting`` (from the status read, so
              a racing delete or job loses); nothing reads a ``deleting``
              point any more: not the chain, not the next incremental
    remove    the files, newest first, with no session open
    drop      one transaction: the rows go; failed or cancelled backups that
              named one as parent forget it

A kill -9 between mark and drop leaves rows ``deleting``: `recover_deletes`
(run at hub start) finishes them, files then rows. A completed row never
points at a removed file, and a removed row never leaves its files behind.

A file that cannot be removed because it carries the immutable attribute
(``chattr +i``, immutable repositories) is refused up front as ``immutable``;
should the attribute appear between the check and the removal, what was
removed is dropped and the rest goes back to ``completed`` (still whole
chains: only newer points were removed), answered 409 ``immutable``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from sendense.catalog.db import Database
from sendense.catalog.models import Backup, BackupHold, Vm
from sendense.core.errors import BackupInUse, BackupLocked, Conflict, HasDependents, NotFound
from sendense.storage import chain, immutability

log = logging.getLogger(__name__)

# Backups that are restore points, or becoming one (their files exist).
LIVE = ("pending", "running", "completed")
# Backups without files: a record of what went wrong.
DEAD = ("failed", "cancelled")


def lock_vm(s: Session, vm_id: str) -> None:
    """Serialize with backup starts and other deletes/merges of this VM.

    PostgreSQL: the VM's row lock (the backup engine takes it too). SQLite:
    a write first, so this transaction holds the database's write lock from
    here on and reads what every earlier writer committed.
    """
    if s.get_bind().dialect.name == "sqlite":
        s.execute(update(Vm).where(Vm.id == vm_id).values(id=Vm.id))
    else:
        s.execute(select(Vm.id).where(Vm.id == vm_id).with_for_update())


def descendants(s: Session, backup_id: str) -> list[Backup]:
    """Every backup whose parent chain goes through ``backup_id``, oldest first."""
    found: list[Backup] = []
    frontier = [backup_id]
    while frontier:
        kids = s.scalars(select(Backup).where(Backup.parent_id.in_(frontier))).all()
        found.extend(kids)
        frontier = [k.id for k in kids]
    return sorted(found, key=lambda b: (b.created_at, b.id))


def holds_on(s: Session, backup_ids: Iterable[str]) -> list[BackupHold]:
    ids = list(dict.fromkeys(backup_ids))
    if not ids:
        return []
    return list(s.scalars(select(BackupHold).where(BackupHold.backup_id.in_(ids))).all())


def refuse_held(s: Session, backups: Sequence[Backup], what: str) -> None:
    """409 ``in_use`` when a job or restore session holds one of ``backups``."""
    holds = holds_on(s, (b.id for b in backups))
    if holds:
        h = holds[0]
        raise BackupInUse(
            f"backup {h.backup_id} is in use by {h.holder_type} {h.holder_id}; "
            f"it cannot be {what} until that ends",
            backup_id=h.backup_id,
            holders=[
                {"backup_id": x.backup_id, "holder_type": x.holder_type, "holder_id": x.holder_id}
                for x in holds
            ],
        )


def refuse_locked(backups: Sequence[Backup], what: str, now: datetime | None = None) -> None:
    """409 ``immutable`` naming the first backup whose lock has not expired."""
    now = now or datetime.now(UTC)
    for b in backups:
        if b.immutable_until is not None and b.immutable_until > now:
            raise BackupLocked(
                f"backup {b.id} is immutable until {b.immutable_until.isoformat()}; "
                f"it cannot be {what} before then",
                backup_id=b.id,
                immutable_until=b.immutable_until.isoformat(),
            )


def refuse_immutable_files(paths: Iterable[tuple[str, str, datetime | None]], what: str) -> None:
    """409 ``immutable`` for a file with the immutable attribute
    ((id, path, immutable_until) triples).

    A file whose catalog lock has already expired is unlocked here, as the
    sweeper would do on its next round: the lock ended, the delete may go on.
    """
    now = datetime.now(UTC)
    for backup_id, path, until in paths:
        locked = chain.immutable_files(path)
        if locked and until is not None and until <= now:
            immutability.unlock_point(path)
            locked = chain.immutable_files(path)
        if locked:
            raise BackupLocked(
                f"backup {backup_id}: file {locked[0]} has the immutable attribute; "
                f"it cannot be {what} until the lock is lifted",
                backup_id=backup_id,
                immutable_until=until.isoformat() if until is not None else None,
                file=str(locked[0]),
            )


@dataclass
class DeletePlan:
    """What a delete removes: backups newest first, with their files."""

    backup_ids: list[str]
    files: dict[str, str]
    statuses: dict[str, str] = field(default_factory=dict)


def plan_delete(s: Session, backup_id: str, *, cascade: bool) -> DeletePlan:
    """The checks, in the caller's transaction (VM row locked); raises a 409."""
    b = s.get(Backup, backup_id)
    if b is None:
        raise NotFound(f"backup {backup_id} not found", backup_id=backup_id)
    if b.status in ("pending", "running"):
        raise BackupInUse(
            f"backup {b.id} is being written by job {b.job_id}; cancel the job instead",
            backup_id=b.id,
            job_id=b.job_id,
        )
    if b.status in ("deleting", "merging"):
        raise BackupInUse(
            f"backup {b.id} is already being {'deleted' if b.status == 'deleting' else 'merged'}",
            backup_id=b.id,
        )
    later = [d for d in descendants(s, b.id) if d.status not in DEAD]
    targets = [b, *later] if cascade else [b]
    refuse_held(s, targets, "deleted")
    if later and not cascade:
        raise HasDependents(
            f"backup {b.id} has {len(later)} newer restore point(s) that depend on it; "
            "delete them first or use ?cascade=true",
            backup_id=b.id,
            dependents=[d.id for d in later],
        )
    busy = [d for d in later if d.status not in ("completed",)]
    if busy:
        raise BackupInUse(
            f"backup {busy[0].id} depends on {b.id} and is {busy[0].status}",
            backup_id=busy[0].id,
        )
    refuse_locked(targets, "deleted")
    newest_first = sorted(targets, key=lambda x: (x.created_at, x.id), reverse=True)
    return DeletePlan(
        [x.id for x in newest_first],
        {x.id: x.file_path for x in newest_first},
        {x.id: x.status for x in newest_first},
    )


def mark(s: Session, plan: DeletePlan) -> None:
    """Status ``deleting``, conditional on the status just checked."""
    result = s.execute(
        update(Backup)
        .where(Backup.id.in_(plan.backup_ids), Backup.status.in_(("completed", *DEAD)))
        .values(status="deleting")
    )
    if int(getattr(result, "rowcount", 0) or 0) != len(plan.backup_ids):
        raise Conflict("the backups changed while being deleted; try again")


def drop_rows(s: Session, backup_ids: Sequence[str]) -> None:
    """Drop ``deleting`` rows; children that are records only forget their parent."""
    if not backup_ids:
        return
    s.execute(update(Backup).where(Backup.parent_id.in_(backup_ids)).values(parent_id=None))
    s.execute(delete(BackupHold).where(BackupHold.backup_id.in_(backup_ids)))
    s.execute(delete(Backup).where(Backup.id.in_(backup_ids), Backup.status == "deleting"))


def delete_backup(db: Database, backup_id: str, *, cascade: bool = False) -> dict[str, Any]:
    """Delete a restore point (and, with ``cascade``, all that depend on it)."""
    with db.session() as s:
        b = s.get(Backup, backup_id)
        if b is None:
            raise NotFound(f"backup {backup_id} not found", backup_id=backup_id)
        vm_id = b.vm_id
        # The immutable attribute is read with no transaction open (a stat
        # per file; on NFS a round trip). The catalog's locks are checked
        # below, inside the transaction that marks.
        targets = [b, *descendants(s, b.id)] if cascade else [b]
        files = [(x.id, x.file_path, x.immutable_until) for x in targets]
    refuse_immutable_files(files, "deleted")
    with db.session() as s:
        lock_vm(s, vm_id)
        plan = plan_delete(s, backup_id, cascade=cascade)
        mark(s, plan)
    log.info("delete backups=%s", plan.backup_ids)
    removed, freed, blocked = remove_files(plan)
    with db.session() as s:
        drop_rows(s, removed)
        for blocked_id in blocked:
            s.execute(
                update(Backup)
                .where(Backup.id == blocked_id, Backup.status == "deleting")
                .values(status=plan.statuses[blocked_id])
            )
    if blocked:
        raise BackupLocked(
            f"backup {blocked[0]}: a file has the immutable attribute; "
            f"deleted {len(removed)} newer restore point(s), kept {len(blocked)}",
            backup_id=blocked[0],
            immutable_until=None,
            deleted=removed,
        )
    return {"deleted": removed, "freed_bytes": freed}


def remove_files(plan: DeletePlan) -> tuple[list[str], int, list[str]]:
    """Remove files newest first: (removed ids, bytes freed, ids left as they were)."""
    removed: list[str] = []
    freed = 0
    for i, backup_id in enumerate(plan.backup_ids):
        try:
            freed += chain.remove_point(plan.files[backup_id])
        except PermissionError:
            log.warning("backup=%s file is immutable; delete stopped", backup_id)
            return removed, freed, plan.backup_ids[i:]
        removed.append(backup_id)
    return removed, freed, []


def recover_deletes(db: Database) -> list[str]:
    """At hub start: finish deletes a dead hub left half done (files, then rows)."""
    with db.session() as s:
        rows = s.execute(
            select(Backup.id, Backup.file_path)
            .where(Backup.status == "deleting")
            .order_by(Backup.created_at.desc(), Backup.id.desc())
        ).all()
    if not rows:
        return []
    plan = DeletePlan([r[0] for r in rows], {r[0]: r[1] for r in rows})
    removed, _, blocked = remove_files(plan)
    with db.session() as s:
        drop_rows(s, removed)
        for backup_id in blocked:
            # Stopped at an immutable image: what is left stays as it was
            # (older points only, so their chains are whole).
            whole = Path(plan.files[backup_id]).exists()
            s.execute(
                update(Backup)
                .where(Backup.id == backup_id, Backup.status == "deleting")
                .values(status="completed" if whole else "failed")
            )
    log.warning("finished deletes left by a previous hub: %s (kept: %s)", removed, blocked)
    return removed
