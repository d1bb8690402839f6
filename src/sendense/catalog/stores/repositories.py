"""Queries of the repositories table(s)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from sendense.catalog.models import Repository


class RepositoryStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, repo_id: str) -> Repository | None:
        return self.s.get(Repository, repo_id)

    def all(self) -> Sequence[Repository]:
        return self.s.scalars(select(Repository).order_by(Repository.name)).all()
