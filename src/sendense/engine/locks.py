"""Immutable locks: the catalog decides, the files follow.

A restore point of an immutable repository is locked until
``immutable_until`` (``created_at + retention_days``, set when the backup
completes, engine/backup.py). The API refuses to delete or merge it until
then. Where the filesystem allows, its files also carry the immutable
attribute (storage/immutability.py), set when the backup completes.

`LockSweeper` is a thread of the hub that makes the files agree with the
catalog, once at start and then every ``SENDENSE_LOCK_SWEEP_INTERVAL``
seconds (default 10 minutes):

- a lock that has expired: the attribute is lifted (``chattr -i``), so the
  restore point can be deleted or merged like any other;
- a live lock whose files lack the attribute (a crash between the catalog
  write and the ``chattr``, a rescan, a restore of the repository from
  tape): the attribute is put back.

Several hubs on one catalog may all sweep: both actions are idempotent.
A lock is never shortened: nothing here writes ``immutable_until``; raising
a repository's ``retention_days`` extends the live locks of its restore
points (engine/inventory.py), lowering it only applies to new backups.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from sqlalchemy import select

from sendense.catalog.db import Database
from sendense.catalog.models import Backup
from sendense.storage import immutability

log = logging.getLogger(__name__)


def sweep(db: Database, now: datetime | None = None) -> dict[str, int]:
    """One pass: lift expired locks' attributes, restore live ones'. Counts."""
    now = now or datetime.now(UTC)
    with db.session() as s:
        rows = s.execute(
            select(Backup.id, Backup.file_path, Backup.immutable_until, Backup.status).where(
                Backup.immutable_until.is_not(None)
            )
        ).all()
    lifted = restored = 0
    # File work with no session open: an ioctl per file (a round trip on NFS).
    for backup_id, path, until, status in rows:
        if until is None or until <= now:
            if immutability.unlock_point(path):
                lifted += 1
                log.info("lock expired backup=%s until=%s: attribute lifted", backup_id, until)
        elif (
            status == "completed"
            and not immutability.is_locked(path)
            and immutability.lock_point(path)
        ):
            restored += 1
            log.warning("backup=%s locked until %s had no attribute: set", backup_id, until)
    return {"lifted": lifted, "restored": restored, "checked": len(rows)}


class LockSweeper:
    def __init__(self, db: Database, interval: float) -> None:
        self.db = db
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lock-sweeper", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                sweep(self.db)
            except Exception:
                log.exception("lock sweep failed")
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
