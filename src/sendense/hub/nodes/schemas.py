"""Nodes: what the API takes and answers."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from sendense.hub.validation import check_token_text, check_url


class NodeCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    url: str = Field(min_length=1, max_length=500)
    token: str = Field(min_length=1, max_length=500)
    verify: bool = True

    _url = field_validator("url")(check_url)
    _token = field_validator("token")(check_token_text)

    def __repr__(self) -> str:
        return f"NodeCreate(name={self.name!r}, url={self.url!r})"


class NodeUpdate(BaseModel):
    """Fix a node's URL or token; checked against the node unless ``verify`` is false."""

    url: str | None = Field(default=None, min_length=1, max_length=500)
    token: str | None = Field(default=None, min_length=1, max_length=500)
    verify: bool = True

    _url = field_validator("url")(check_url)
    _token = field_validator("token")(check_token_text)

    def __repr__(self) -> str:
        return f"NodeUpdate(url={self.url!r})"


class NodeHealth(BaseModel):
    """The last background probe of the node (every SENDENSE_NODE_HEALTH_INTERVAL
    seconds); ``unknown`` before the first one."""

    status: Literal["online", "unreachable", "unknown"]
    version: str | None = None
    error: str | None = None
    checked_at: datetime | None = None
    age_seconds: float | None = Field(default=None, description="Seconds since checked_at")


class NodeRead(BaseModel):
    node_id: str
    name: str
    url: str
    created_at: datetime | None
    health: NodeHealth | None = None


class NodeList(BaseModel):
    nodes: list[NodeRead]


class NodeRemoved(BaseModel):
    node_id: str
    name: str
    sources: list[str] = Field(description="Ids of the sources removed with the node (cascade)")
    vms: list[str] = Field(description="Names of the VMs removed with them")
    backup_records: int = Field(
        description="Records of failed or cancelled backups (no files) removed with the VMs"
    )
