"""Nodes, sources, VMs and repositories: the hub's inventory rules."""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from sendense.catalog.models import Node, Repository, Source, Vm, VmDisk
from sendense.catalog.stores import NodeStore, RepositoryStore, SourceStore, VmStore
from sendense.core.errors import Conflict, Error, InvalidRequest, NotFound
from sendense.engine.backup import node_client, source_spec
from sendense.engine.node_client import NodeClient
from sendense.secretbox import SecretBox, split_secrets

log = logging.getLogger(__name__)

SOURCE_TYPES = ("qemu", "vmware", "file")
SUPPORTED_SOURCE_TYPES = ("qemu",)
DEFAULT_REPOSITORY_ID = "default"


def register_node(
    s: Session, secrets: SecretBox, name: str, url: str, token: str, *, verify: bool = True
) -> Node:
    if NodeStore(s).by_name(name) is not None:
        raise Conflict(f"a node named {name} already exists")
    if not url.startswith(("http://", "https://")):
        raise InvalidRequest("url must start with http:// or https://")
    if verify:
        client = NodeClient(url, token)
        try:
            client.health()
            client.check_token()
        except Error as e:
            raise InvalidRequest(f"cannot register node {name}: {e.message}", code=e.code) from e
        finally:
            client.close()
    node = Node(name=name, url=url.rstrip("/"), token_encrypted=secrets.encrypt(token))
    node.last_seen_at = datetime.now(UTC) if verify else None
    s.add(node)
    s.flush()
    return node


def node_health(node: Node, secrets: SecretBox) -> dict[str, Any]:
    try:
        h = node_client(node, secrets).health()
        return {"status": "online", "version": h.get("version"), "error": None}
    except Error as e:
        return {"status": "unreachable", "version": None, "error": e.message}


def register_source(
    s: Session, secrets: SecretBox, name: str, node_id: str, kind: str, config: dict[str, Any]
) -> Source:
    if SourceStore(s).by_name(name) is not None:
        raise Conflict(f"a source named {name} already exists")
    if NodeStore(s).get(node_id) is None:
        raise InvalidRequest(f"node_id {node_id} does not exist", node_id=node_id)
    if kind not in SOURCE_TYPES:
        raise InvalidRequest(f"type must be one of {', '.join(SOURCE_TYPES)}")
    if kind not in SUPPORTED_SOURCE_TYPES:
        raise InvalidRequest(f"type {kind} is not supported yet (supported: qemu)")
    if kind == "qemu":
        vms = config.get("vms")
        if not isinstance(vms, list) or not vms:
            raise InvalidRequest("config.vms must be a non-empty list of {name, qmp_socket}")
        for i, vm in enumerate(vms):
            if not isinstance(vm, dict) or not vm.get("name") or not vm.get("qmp_socket"):
                raise InvalidRequest(f"config.vms[{i}] needs name and qmp_socket")
    public, secret = split_secrets(config)
    source = Source(
        name=name,
        node_id=node_id,
        type=kind,
        config=public,
        secret_encrypted=secrets.encrypt(secret) if secret else None,
    )
    s.add(source)
    s.flush()
    return source


def discover(s: Session, secrets: SecretBox, source_id: str) -> list[Vm]:
    source = SourceStore(s).get(source_id)
    if source is None:
        raise NotFound(f"source {source_id} not found", source_id=source_id)
    answer = node_client(source.node, secrets).discover(source_spec(source, secrets))
    found = []
    for item in answer.get("vms", []):
        vm = VmStore(s).by_name(item["name"])
        if vm is None:
            vm = Vm(name=item["name"], source_id=source.id, path=item.get("path", ""))
            s.add(vm)
        elif vm.source_id != source.id:
            raise Conflict(f"VM {vm.name} already belongs to another source")
        vm.path = item.get("path", "")
        vm.discovered_at = datetime.now(UTC)
        existing = {d.disk_index: d for d in vm.disks}
        seen = set()
        for d in item.get("disks", []):
            idx = int(d["disk_index"])
            seen.add(idx)
            disk = existing.get(idx)
            if disk is None:
                disk = VmDisk(disk_index=idx)
                vm.disks.append(disk)
            disk.disk_key = int(d["disk_key"])
            disk.label = d.get("label", "")
            disk.capacity_bytes = int(d["capacity_bytes"])
            disk.size_gb = float(d.get("size_gb") or round(disk.capacity_bytes / 2**30, 3))
            disk.path = d.get("path", "")
            disk.node_name = d.get("node_name", "")
        for idx in existing:
            # A disk that went away keeps its row while backups refer to it.
            if idx not in seen:
                log.info("vm=%s disk=%d no longer present", vm.name, idx)
        s.flush()
        found.append(vm)
    return found


def ensure_default_repository(s: Session, path: Path) -> Repository:
    repo = RepositoryStore(s).get(DEFAULT_REPOSITORY_ID)
    if repo is None:
        path.mkdir(parents=True, exist_ok=True)
        repo = Repository(id=DEFAULT_REPOSITORY_ID, name="default", type="local", path=str(path))
        s.add(repo)
        s.flush()
    return repo


def repository_capacity(repo: Repository) -> dict[str, int | None]:
    try:
        usage = shutil.disk_usage(repo.path)
    except OSError:
        return {"total_bytes": None, "used_bytes": None, "available_bytes": None}
    return {
        "total_bytes": usage.total,
        "used_bytes": usage.used,
        "available_bytes": usage.free,
    }
