"""Restores and exports: what the API takes and answers."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class RestoreDestination(BaseModel):
    type: Literal["file", "nbd"]
    path: str | None = Field(
        default=None,
        max_length=4096,
        description="file: absolute path of the new image, inside SENDENSE_RESTORE_DIRS",
    )
    format: Literal["qcow2", "raw"] | None = Field(default=None, description="file: default qcow2")
    url: str | None = Field(
        default=None,
        max_length=2048,
        description="nbd: nbd://host[:port]/export or nbd+unix:///export?socket=PATH",
    )


class RestoreCreate(BaseModel):
    backup_id: str = Field(min_length=1, max_length=36)
    destination: RestoreDestination


class ExportCreate(BaseModel):
    writable: bool = Field(
        default=False,
        description="writes go to a throw-away overlay; the backup never changes",
    )


class ExportRead(BaseModel):
    export_id: str = Field(description="also the id of the export's job")
    job_id: str
    backup_id: str
    vm_name: str | None
    writable: bool
    url: str | None = Field(
        description="nbd://host:port/export while serving; nbds://... when it requires TLS"
    )
    tls: bool = Field(
        default=False,
        description="the export requires TLS with its pre-shared key (served beyond loopback; "
        "docs/security.md)",
    )
    tls_username: str | None = Field(default=None, description="the TLS-PSK identity")
    tls_psk: str | None = Field(
        default=None,
        description="the export's TLS pre-shared key (hex, psktool format: "
        "<tls_username>:<tls_psk>); only in the answer to the POST that started the export, "
        "never again: keep it",
    )
    status: Literal["starting", "serving", "closed", "failed"]
    error: str | None
    created_by: str
    created_at: datetime | None
    finished_at: datetime | None


class ExportList(BaseModel):
    exports: list[ExportRead]


class MountCreate(BaseModel):
    backup_id: str = Field(min_length=1, max_length=36)


class PartitionRead(BaseModel):
    index: int = Field(description="what partition= takes: 1-based in table order; 0 = whole disk")
    filesystem: str | None = Field(description="ext, xfs, fat, ntfs, or null (nothing readable)")
    label: str | None
    size: int
    offset: int
    table: str
    type: str
    warnings: list[str]


class MountRead(BaseModel):
    mount_id: str
    job_id: str
    backup_id: str | None
    vm_name: str | None
    disk_id: int | None
    status: Literal["opening", "open", "closed", "failed"]
    partitions: list[PartitionRead]
    closed: str | None = Field(description="why it closed: closed, idle, hub stopped")
    error: str | None
    created_by: str
    created_at: datetime | None
    last_access: datetime | None
    expires_at: datetime | None = Field(description="closes when idle until then")


class MountList(BaseModel):
    mounts: list[MountRead]


class FileEntry(BaseModel):
    name: str = Field(description="as stored; escaped when ``escaped``")
    path: str = Field(description="from the filesystem's root; escaped when ``escaped``")
    escaped: bool = Field(
        description="the name (or a directory above it, or the link target) is not UTF-8: "
        "name, path and target are written with each such byte as %XX and '%' as %25; "
        "pass path back with escaped=true"
    )
    type: str = Field(description="file, dir, symlink, or a special file type")
    size: int
    mode: int | None
    uid: int | None
    gid: int | None
    mtime: datetime | None
    target: str | None = Field(
        description="a symlink's target, as stored (escaped when ``escaped``)"
    )


class FileListing(BaseModel):
    path: str
    escaped: bool = Field(description="path is escaped (see FileEntry.escaped)")
    partition: int
    entries: list[FileEntry]
    total: int
    offset: int
    limit: int
