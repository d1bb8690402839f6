"""Webhooks: what the API takes and answers. The secret is taken, never
answered (``has_secret`` says whether there is one)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

Event = Literal["job.failed", "job.completed", "run.missed", "run.finished"]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        min_length=8,
        max_length=2000,
        description="http:// or https:// URL the events are POSTed to",
        examples=["https://alerts.example.com/sendense"],
    )
    events: list[Event] = Field(min_length=1, max_length=4)
    secret: str | None = Field(
        default=None,
        min_length=16,
        max_length=500,
        description="Key of the X-Sendense-Signature HMAC-SHA256; stored encrypted, never answered",
    )
    policy_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=36,
        description="Only this policy's jobs and runs; null: every event",
    )
    enabled: StrictBool = True

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value)

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        return check_events(value)

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        return check_secret(value)


def check_url(value: str) -> str:
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ValueError(f"is not a URL ({e})") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.fragment:
        raise ValueError("must not have a #fragment")
    return value


def check_events(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError("lists an event twice")
    return value


def check_secret(value: str | None) -> str | None:
    if value is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("must not contain control characters")
    return value


class WebhookUpdate(BaseModel):
    """Fields to change; ``"secret": null`` removes the secret, ``"policy_id":
    null`` makes the webhook global."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(default=None, min_length=8, max_length=2000)
    events: list[Event] | None = Field(default=None, min_length=1, max_length=4)
    secret: str | None = Field(default=None, min_length=16, max_length=500)
    policy_id: str | None = Field(default=None, min_length=1, max_length=36)
    enabled: StrictBool | None = None

    @field_validator("url", "events", "enabled", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("cannot be null")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value)

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_events(value)

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        return check_secret(value)


class WebhookRead(BaseModel):
    webhook_id: str
    url: str = Field(description="The URL, a password in it shown as ***")
    events: list[str]
    policy_id: str | None
    enabled: bool
    has_secret: bool
    created_at: datetime | None
    created_by: str
    pending: int = Field(description="Deliveries waiting to be sent or retried")
    failed: int = Field(description="Deliveries given up after every attempt")
    last_delivered_at: datetime | None


class WebhookList(BaseModel):
    webhooks: list[WebhookRead]


class WebhookDeleted(BaseModel):
    webhook_id: str
    deleted: Literal[True] = True
    deliveries_removed: int


class DeliveryRead(BaseModel):
    delivery_id: str
    webhook_id: str
    event: str
    event_key: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime | None = Field(description="When a pending delivery is tried next")
    last_error: str | None
    created_at: datetime | None
    delivered_at: datetime | None
    payload: dict[str, Any] = Field(description="The JSON body POSTed")


class DeliveryList(BaseModel):
    deliveries: list[DeliveryRead]
