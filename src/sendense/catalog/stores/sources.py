"""Queries of the sources table(s)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from sendense.catalog.models import Source


class SourceStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, source_id: str) -> Source | None:
        return self.s.get(Source, source_id)

    def by_name(self, name: str) -> Source | None:
        return self.s.scalar(select(Source).where(Source.name == name))

    def all(self) -> Sequence[Source]:
        return self.s.scalars(select(Source).order_by(Source.name)).all()
