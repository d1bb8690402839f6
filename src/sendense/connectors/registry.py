"""Picks the connector for a source type."""

from __future__ import annotations

from typing import Any

from sendense.connectors.base import Connector
from sendense.core.errors import InvalidRequest

SOURCE_TYPES = ("qemu", "vmware", "file")


def make_connector(source: dict[str, Any], *, workdir: str) -> Connector:
    kind = source.get("type")
    config = source.get("config") or {}
    if kind == "qemu":
        from sendense.connectors.qemu.connector import QemuConnector

        return QemuConnector(config, workdir=workdir)
    if kind == "vmware":
        from sendense.connectors.vmware.connector import VmwareConnector

        return VmwareConnector(config, workdir=workdir)
    if kind == "file":  # plain images and block devices (connectors/file)
        from sendense.connectors.file.connector import FileConnector

        return FileConnector(config, workdir=workdir)
    raise InvalidRequest(
        f"source.type {kind!r} is not supported by this node (supported: {', '.join(SOURCE_TYPES)})"
    )
