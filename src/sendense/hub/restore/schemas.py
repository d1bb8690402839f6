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
    url: str | None = Field(description="nbd://host:port/export while serving")
    status: Literal["starting", "serving", "closed", "failed"]
    error: str | None
    created_by: str
    created_at: datetime | None
    finished_at: datetime | None


class ExportList(BaseModel):
    exports: list[ExportRead]
