"""Nodes: what the API takes and answers."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, StrictInt, field_validator

from sendense.hub.validation import check_token_text, check_url
from sendense.tls import normalize_fingerprint


def check_fingerprint(value: str | None) -> str | None:
    """SHA-256 of the node's certificate: 64 hex digits, colons allowed."""
    return None if value is None else normalize_fingerprint(value)


MAX_JOBS_LIMIT = 1000
MAX_JOBS_HELP = (
    "Backup jobs that may run on this node at once (1 to 1000); null: the hub's default "
    "(SENDENSE_NODE_JOB_LIMIT, 4 unless set). Further backups wait queued (step "
    '"queued") and start in turn, fairly across VMs, when a job ends.'
)

FINGERPRINT_HELP = (
    "SHA-256 of the node's TLS certificate (DER), hex, colons allowed: printed by the node "
    "at start and by `sendense node fingerprint`. Required for an https:// URL: without it "
    "the answer is 400 fingerprint_required with details.fingerprint = what the node "
    "presented, to check and send back (trust on first use, made explicit)."
)


class NodeCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    url: str = Field(min_length=1, max_length=500)
    token: str = Field(min_length=1, max_length=500)
    fingerprint: str | None = Field(default=None, max_length=200, description=FINGERPRINT_HELP)
    verify: bool = True
    max_jobs: StrictInt | None = Field(
        default=None, ge=1, le=MAX_JOBS_LIMIT, description=MAX_JOBS_HELP
    )

    _url = field_validator("url")(check_url)
    _token = field_validator("token")(check_token_text)
    _fingerprint = field_validator("fingerprint")(check_fingerprint)

    def __repr__(self) -> str:
        return f"NodeCreate(name={self.name!r}, url={self.url!r})"


class NodeUpdate(BaseModel):
    """Fix a node's URL or token, or re-pin its certificate (``fingerprint``);
    checked against the node unless ``verify`` is false. ``max_jobs`` alone
    (null: back to the hub's default) changes the limit without contacting
    the node."""

    url: str | None = Field(default=None, min_length=1, max_length=500)
    token: str | None = Field(default=None, min_length=1, max_length=500)
    fingerprint: str | None = Field(
        default=None,
        max_length=200,
        description="Pin the certificate the node presents now, if its SHA-256 is this "
        "(a node whose certificate was replaced). Without it the pinned one stays.",
    )
    verify: bool = True
    max_jobs: StrictInt | None = Field(
        default=None, ge=1, le=MAX_JOBS_LIMIT, description=MAX_JOBS_HELP
    )

    _url = field_validator("url")(check_url)
    _token = field_validator("token")(check_token_text)
    _fingerprint = field_validator("fingerprint")(check_fingerprint)

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
    tls: bool = Field(description="The hub talks to the node over HTTPS (https:// URL)")
    fingerprint: str | None = Field(
        default=None,
        description="SHA-256 (hex) of the node's pinned certificate; null for plain HTTP",
    )
    created_at: datetime | None
    health: NodeHealth | None = None
    max_jobs: int | None = Field(
        default=None, description="The node's own limit; null: the hub's default"
    )
    job_limit: int = Field(
        default=0,
        description="The limit in force: max_jobs, or the hub's SENDENSE_NODE_JOB_LIMIT "
        "(0: no limit)",
    )
    jobs_running: int = Field(
        default=0, description="Backup jobs using a slot of the node now (any hub)"
    )
    jobs_queued: int = Field(default=0, description="Backup jobs waiting for a slot")


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
