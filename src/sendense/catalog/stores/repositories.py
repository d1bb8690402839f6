"""Queries of the repositories table(s)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sendense.catalog.models import Backup, BackupJob, Repository
from sendense.catalog.stores.common import ACTIVE


class RepositoryStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, repo_id: str) -> Repository | None:
        return self.s.get(Repository, repo_id)

    def by_name(self, name: str) -> Repository | None:
        return self.s.scalar(select(Repository).where(Repository.name == name))

    def all(self) -> Sequence[Repository]:
        return self.s.scalars(select(Repository).order_by(Repository.name)).all()

    def usage(self) -> dict[str, tuple[int, int]]:
        """Per repository: (completed restore points, their bytes on disk)."""
        rows = self.s.execute(
            select(
                Backup.repository_id,
                func.count(),
                func.coalesce(func.sum(Backup.size_on_disk), 0),
            )
            .where(Backup.status == "completed")
            .group_by(Backup.repository_id)
        ).all()
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def backup_rows(self, repo_id: str) -> int:
        """Backup records of any status in the repository."""
        return int(
            self.s.scalar(
                select(func.count()).select_from(Backup).where(Backup.repository_id == repo_id)
            )
            or 0
        )

    def live_locks(self, repo_id: str, now: datetime) -> tuple[int, datetime | None]:
        """(restore points whose immutable lock has not expired, the latest end)."""
        count, latest = self.s.execute(
            select(func.count(), func.max(Backup.immutable_until)).where(
                Backup.repository_id == repo_id, Backup.immutable_until > now
            )
        ).one()
        return int(count or 0), latest

    def active_jobs(self, repo_id: str, kind: str | None = None) -> Sequence[BackupJob]:
        q = select(BackupJob).where(
            BackupJob.repository_id == repo_id, BackupJob.status.in_(ACTIVE)
        )
        if kind is not None:
            q = q.where(BackupJob.kind == kind)
        return self.s.scalars(q.order_by(BackupJob.created_at)).all()
