"""Repositories: what the API takes and answers."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_RETENTION_DAYS = 36500


class RepositoryCreate(BaseModel):
    """A repository. ``config`` by type (storage/backends.py):

    - ``local``: none.
    - ``nfs``: empty when the share is already mounted at ``path``; else
      ``{"server", "export", "options"?}`` and the hub mounts it (as root).
    - ``cifs``: empty when mounted at ``path``; else ``{"server", "share",
      "username"?, "password"?, "domain"?, "options"?}``. The password is
      stored encrypted and never returned.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    type: Literal["local", "nfs", "cifs"] = "local"
    path: str = Field(min_length=1, max_length=1000, description="Absolute path on the hub")
    immutable: bool = False
    retention_days: int = Field(
        default=0,
        ge=0,
        le=MAX_RETENTION_DAYS,
        description="Immutable repositories lock each new backup until created_at + this",
    )
    encrypted: bool = Field(
        default=False,
        description="Every backup is a LUKS-encrypted QCOW2 (AES-256-XTS) with this "
        "repository's key, kept wrapped by the hub's master key; fixed at creation",
    )
    encryption_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Disaster recovery: the key exported from the repository's previous "
        "hub (`sendense repo export-key`), so that a rescan finds backups this hub can "
        "read. Needs encrypted: true; never returned",
    )
    config: dict[str, Any] = Field(default_factory=dict)

    def __repr__(self) -> str:  # never show the password in config
        return f"RepositoryCreate(name={self.name!r}, type={self.type!r}, path={self.path!r})"


class RepositoryUpdate(BaseModel):
    """Fields to change. ``path`` only while the repository holds no backups;
    ``config`` replaces the whole config (a cifs password given as ``null``
    is removed, an omitted one kept); the server, export or share only while
    empty. Raising ``retention_days`` extends the live locks; lowering it
    applies to new backups (a lock is never shortened)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    path: str | None = Field(default=None, min_length=1, max_length=1000)
    immutable: bool | None = None
    retention_days: int | None = Field(default=None, ge=0, le=MAX_RETENTION_DAYS)
    config: dict[str, Any] | None = None
    encrypted: bool | None = Field(
        default=None,
        description="Fixed at creation: only its current value is accepted (409 otherwise)",
    )

    def __repr__(self) -> str:
        return f"RepositoryUpdate(fields={sorted(self.model_fields_set)})"


class RepositoryRead(BaseModel):
    repository_id: str
    name: str
    type: str
    path: str
    immutable: bool
    retention_days: int
    encrypted: bool = Field(description="Backups here are LUKS-encrypted QCOW2")
    config: dict[str, Any] = Field(description="The config without its password")
    has_credentials: bool
    mounted_by_hub: bool = Field(description="The hub mounts this share itself (config.server)")
    online: bool = Field(description="The folder is reachable (and, for a share, mounted)")
    status_message: str | None
    created_at: datetime | None
    updated_at: datetime | None
    total_bytes: int | None
    used_bytes: int | None
    available_bytes: int | None
    backup_count: int = Field(description="Completed restore points in the repository")
    backup_bytes: int = Field(description="Bytes on disk of those restore points")
    immutable_attribute: bool | None = Field(
        description="Files here can carry the immutable attribute (chattr +i); null if offline"
    )
    locks_live: int = Field(description="Restore points whose immutable lock has not expired")
    locked_until: datetime | None = Field(description="The latest end of those locks")


class RepositoryList(BaseModel):
    repositories: list[RepositoryRead]


class RescanCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(default=False, description="Plan only: report, write nothing")


class RepositoryDeleted(BaseModel):
    repository_id: str
    deleted: Literal[True] = True
    unmounted: bool


class RepositoryKeyExport(BaseModel):
    """A recovery copy of an encrypted repository's key: the LUKS passphrase
    of every image in it. Answered to an admin who asks; audited."""

    repository_id: str
    key_id: str = Field(description="Id of the master key that wraps it in the catalog")
    passphrase: str = Field(
        description="The LUKS passphrase (base64 text of the 256-bit data key): write it to a "
        "file without a newline and open an image with qemu-img --object "
        "secret,id=sec0,file=<file>,format=raw --image-opts "
        "driver=qcow2,file.filename=<image>,encrypt.key-secret=sec0"
    )
    format: Literal["luks-passphrase"] = "luks-passphrase"
