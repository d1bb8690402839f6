"""Repositories: what the API takes and answers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class RepositoryRead(BaseModel):
    repository_id: str
    name: str
    type: str
    path: str
    immutable: bool
    retention_days: int
    config: dict[str, Any]
    created_at: datetime | None
    total_bytes: int | None
    used_bytes: int | None
    available_bytes: int | None


class RepositoryList(BaseModel):
    repositories: list[RepositoryRead]
