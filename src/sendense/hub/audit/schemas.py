"""The audit log: what the API answers."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class AuditRead(BaseModel):
    entry_id: str
    at: datetime
    token_id: str | None
    token_name: str | None
    method: str
    route: str
    path: str
    target: dict[str, str]
    status: int
    client: str | None


class AuditList(BaseModel):
    entries: list[AuditRead]
    total: int
