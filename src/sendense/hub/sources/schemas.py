"""Sources: what the API takes and answers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class SourceCreate(BaseModel):
    """A source; credentials anywhere in ``config`` (``password``, ``token``,
    ``secret``, ``api_key``, ``*_password``, ... at any depth, e.g.
    ``vms[].password``) are stored encrypted and never shown again."""

    name: str = Field(min_length=1, max_length=200)
    node_id: str = Field(min_length=1, max_length=36)
    type: str = Field(min_length=1, max_length=20)
    config: dict[str, Any]

    def __repr__(self) -> str:  # never show the credentials in config
        return f"SourceCreate(name={self.name!r}, type={self.type!r})"


class SourceRead(BaseModel):
    source_id: str
    name: str
    node_id: str
    type: str
    config: dict[str, Any] = Field(
        description="The config without its credentials: every key named like a credential "
        "(password, token, secret, api_key, ..., at any depth) is left out"
    )
    has_credentials: bool
    created_at: datetime | None


class SourceList(BaseModel):
    sources: list[SourceRead]


class SourceRemoved(BaseModel):
    source_id: str
    name: str
    vms: list[str] = Field(description="Names of the VMs removed with the source")
    backup_records: int = Field(
        description="Records of failed or cancelled backups (no files) removed with the VMs"
    )
