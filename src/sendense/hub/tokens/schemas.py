"""API tokens: what the API takes and answers. The secret is answered once,
at creation (`TokenCreated`), and never again."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, Field, field_validator, model_validator

_TAG = re.compile(r"^tag:[^=\s]+=[^\s]*$")


class TokenScope(BaseModel):
    vms: list[str] = Field(
        default_factory=list,
        max_length=1000,
        description='VM names, or "tag:key=value" for every VM with that tag',
    )
    repositories: list[str] = Field(default_factory=list, max_length=1000)

    @field_validator("vms")
    @classmethod
    def _vms(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item or len(item) > 400:
                raise ValueError("entries must be 1-400 characters")
            if item.startswith("tag:") and not _TAG.match(item):
                raise ValueError(f"{item!r} is not tag:key=value")
        return value

    @field_validator("repositories")
    @classmethod
    def _repositories(cls, value: list[str]) -> list[str]:
        if any(not item or len(item) > 36 for item in value):
            raise ValueError("entries must be repository ids (1-36 characters)")
        return value


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    role: Literal["viewer", "operator", "admin"]
    expires_at: AwareDatetime | None = Field(
        default=None, description="With a time zone; in the future"
    )
    scope: TokenScope | None = Field(
        default=None, description="Limit the token to some VMs and repositories (a tenant)"
    )

    @field_validator("expires_at")
    @classmethod
    def _future(cls, value: datetime | None) -> datetime | None:
        if value is not None and value <= datetime.now(UTC):
            raise ValueError("must be in the future")
        return value

    @model_validator(mode="after")
    def _scoped_admin(self) -> TokenCreate:
        if self.scope is not None and self.role == "admin":
            raise ValueError(
                "role: a scoped token can be viewer or operator; admin sees everything"
            )
        return self


class TokenRead(BaseModel):
    token_id: str
    name: str
    role: str
    scope: TokenScope | None
    expires_at: datetime | None
    created_at: datetime | None
    created_by: str
    revoked_at: datetime | None
    last_used_at: datetime | None


class TokenCreated(TokenRead):
    token: str = Field(description="The secret: shown once, stored only as its SHA-256")


class TokenList(BaseModel):
    tokens: list[TokenRead]
