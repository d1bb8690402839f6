"""Queries of the audit_log table."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from sendense.catalog.models import AuditEntry


class AuditStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def add(self, entry: AuditEntry) -> None:
        self.s.add(entry)

    def prune(self, before: datetime) -> int:
        """Remove the entries written before ``before``; how many went."""
        result = self.s.execute(delete(AuditEntry).where(AuditEntry.at < before))
        return int(getattr(result, "rowcount", 0) or 0)

    def list(
        self,
        *,
        token: str | None = None,
        route: str | None = None,
        method: str | None = None,
        status: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[Sequence[AuditEntry], int]:
        conds: list[Any] = []
        if token:
            conds.append(AuditEntry.token_name == token)
        if route:
            conds.append(AuditEntry.route == route)
        if method:
            conds.append(AuditEntry.method == method.upper())
        if status is not None:
            conds.append(AuditEntry.status == status)
        if since:
            conds.append(AuditEntry.at >= since)
        if until:
            conds.append(AuditEntry.at <= until)
        q = select(AuditEntry).where(*conds)
        total = self.s.scalar(select(func.count()).select_from(q.subquery())) or 0
        rows = self.s.scalars(
            q.order_by(AuditEntry.at.desc(), AuditEntry.id.desc()).limit(limit).offset(offset)
        ).all()
        return rows, total
