"""Nodes, sources, VMs and repositories: the hub's inventory rules."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sendense.catalog.db import Database
from sendense.catalog.models import Backup, Node, Repository, Source, Vm, VmDisk
from sendense.catalog.stores import NodeStore, RepositoryStore, SourceStore, VmStore
from sendense.core.errors import (
    Conflict,
    Error,
    HasBackups,
    HasSources,
    InvalidRequest,
    InventoryInUse,
    NotFound,
    PathInUse,
)
from sendense.engine.backup import node_client, source_spec
from sendense.engine.delete import lock_vm
from sendense.engine.node_client import NodeClient
from sendense.secretbox import SecretBox, merge_secrets, redact, split_secrets
from sendense.storage import backends, immutability

log = logging.getLogger(__name__)

SOURCE_TYPES = ("qemu", "vmware", "file")
SUPPORTED_SOURCE_TYPES = ("qemu", "vmware", "file")
DEFAULT_REPOSITORY_ID = "default"


# ------------------------------------------------------------------ nodes
#
# Slow I/O (talking to a node) runs with no session open: the services in
# hub/nodes/ call `check_node` first, then the writes below in a short session.


def check_node(url: str, token: str, certificate: str | None = None) -> str | None:
    """Reach the node (an https one through its pinned ``certificate``) and
    check its token; its version. Messages never hold the token (NodeClient
    scrubs it)."""
    client = NodeClient(url, token, certificate=certificate)
    try:
        version = client.health().get("version")
        client.check_token()
    except Error as e:
        raise InvalidRequest(f"cannot use node at {url}: {e.message}", code=e.code) from None
    finally:
        client.close()
    return str(version) if version else None


def register_node(
    s: Session,
    secrets: SecretBox,
    name: str,
    url: str,
    token: str,
    *,
    verified: bool,
    pin: tuple[str, str] | None = None,
) -> Node:
    """``pin``: (fingerprint, PEM certificate) of an https node (hub/nodes/)."""
    if NodeStore(s).by_name(name) is not None:
        raise Conflict(f"a node named {name} already exists", name=name)
    node = Node(name=name, url=url.rstrip("/"), token_encrypted=secrets.encrypt(token))
    if pin is not None:
        node.fingerprint, node.certificate = pin
    node.last_seen_at = datetime.now(UTC) if verified else None
    s.add(node)
    s.flush()
    return node


def node_secret(s: Session, secrets: SecretBox, node_id: str) -> tuple[str, str]:
    """(url, token) of a node; NotFound when absent."""
    node = NodeStore(s).get(node_id)
    if node is None:
        raise NotFound(f"node {node_id} not found", node_id=node_id)
    return node.url, str(secrets.decrypt(node.token_encrypted))


def node_certificate(s: Session, node_id: str) -> str | None:
    """The PEM certificate pinned for a node (None: plain HTTP or none yet)."""
    node = NodeStore(s).get(node_id)
    if node is None:
        raise NotFound(f"node {node_id} not found", node_id=node_id)
    return node.certificate


def update_node(
    s: Session,
    secrets: SecretBox,
    node_id: str,
    *,
    url: str | None,
    token: str | None,
    verified: bool,
    pin: tuple[str | None, str | None] | None = None,
) -> Node:
    """``pin``: a new (fingerprint, PEM certificate), (None, None) to drop it
    (plain HTTP), None to keep it."""
    node = NodeStore(s).get(node_id)
    if node is None:
        raise NotFound(f"node {node_id} not found", node_id=node_id)
    if pin is not None:
        node.fingerprint, node.certificate = pin
    if url is not None:
        node.url = url.rstrip("/")
    if token is not None:
        node.token_encrypted = secrets.encrypt(token)
    if verified:
        node.last_seen_at = datetime.now(UTC)
        node.last_error = None
    s.flush()
    return node


def _vm_usage(s: Session, vms: Sequence[Vm], node_id: str | None = None) -> None:
    """409 while a VM has restore points or a job runs (on the VMs or the node)."""
    vm_ids = [vm.id for vm in vms]
    store = SourceStore(s)
    jobs = store.active_jobs(vm_ids, node_id)
    if jobs:
        raise InventoryInUse(
            f"{len(jobs)} job(s) are running: {', '.join(j.id for j in jobs[:10])}; "
            "wait for them or cancel them",
            jobs=[j.id for j in jobs],
        )
    points = store.restore_points_per_vm(vm_ids)
    if points:
        names = {vm.id: vm.name for vm in vms}
        listed = [
            {"vm_name": names[vm_id], "backups": n}
            for vm_id, n in sorted(points.items(), key=lambda x: names[x[0]])
        ]
        shown = ", ".join(f"{x['vm_name']} ({x['backups']})" for x in listed[:10])
        raise HasBackups(
            f"{len(listed)} VM(s) have restore points: {shown}; delete them first "
            "(DELETE /api/v1/backups/{backup_id}), the catalog keeps a restore point's VM",
            vms=listed,
        )


def remove_sources(
    s: Session, sources: Sequence[Source], node_id: str | None = None
) -> dict[str, Any]:
    """Remove sources and their VMs, all or nothing (see `_vm_usage`)."""
    vms = SourceStore(s).vms([x.id for x in sources])
    for vm in vms:
        lock_vm(s, vm.id)  # serialize with a backup being planned for it
    _vm_usage(s, vms, node_id)
    records = SourceStore(s).drop_vms([vm.id for vm in vms])
    for source in sources:
        SourceStore(s).drop(source)
    s.flush()
    return {
        "sources": [x.id for x in sources],
        "vms": [vm.name for vm in vms],
        "backup_records": records,
    }


def remove_source(s: Session, source_id: str) -> dict[str, Any]:
    source = SourceStore(s).get(source_id)
    if source is None:
        raise NotFound(f"source {source_id} not found", source_id=source_id)
    removed = remove_sources(s, [source])
    return {"source_id": source_id, "name": source.name, **removed}


def remove_node(s: Session, node_id: str, *, cascade: bool) -> dict[str, Any]:
    node = NodeStore(s).get(node_id)
    if node is None:
        raise NotFound(f"node {node_id} not found", node_id=node_id)
    sources = SourceStore(s).of_node(node_id)
    if sources and not cascade:
        raise HasSources(
            f"node {node.name} serves {len(sources)} source(s): "
            f"{', '.join(x.name for x in sources[:10])}; remove them first "
            "(DELETE /api/v1/sources/{source_id}) or pass ?cascade=true",
            sources=[{"source_id": x.id, "name": x.name} for x in sources],
        )
    removed = remove_sources(s, sources, node_id)
    NodeStore(s).drop(node)
    s.flush()
    return {"node_id": node_id, "name": node.name, **removed}


def register_source(
    s: Session, secrets: SecretBox, name: str, node_id: str, kind: str, config: dict[str, Any]
) -> Source:
    if SourceStore(s).by_name(name) is not None:
        raise Conflict(f"a source named {name} already exists", name=name)
    if NodeStore(s).get(node_id) is None:
        raise InvalidRequest(f"node_id {node_id} does not exist", node_id=node_id)
    if kind not in SOURCE_TYPES:
        raise InvalidRequest(f"type must be one of {', '.join(SOURCE_TYPES)}")
    if kind not in SUPPORTED_SOURCE_TYPES:
        raise InvalidRequest(
            f"type {kind} is not supported yet (supported: {', '.join(SUPPORTED_SOURCE_TYPES)})"
        )
    if kind == "qemu":
        vms = config.get("vms")
        if not isinstance(vms, list) or not vms:
            raise InvalidRequest("config.vms must be a non-empty list of {name, qmp_socket}")
        for i, vm in enumerate(vms):
            if not isinstance(vm, dict) or not vm.get("name") or not vm.get("qmp_socket"):
                raise InvalidRequest(f"config.vms[{i}] needs name and qmp_socket")
    if kind == "vmware":  # the shape only: discovery logs in
        from sendense.connectors.vmware.config import VmwareConfig

        VmwareConfig.parse(config, where="config")
    if kind == "file":  # the shape only: the node checks the paths when it reads them
        from sendense.connectors.file.config import parse_config

        parse_config(config)
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


def seal_source_secrets(db: Database, secrets: SecretBox) -> int:
    """At hub start: move credentials a source's stored config still holds in
    clear (sources registered when only top-level keys were recognised, e.g.
    ``vms[].password``) into its encrypted part. Returns how many changed."""
    changed = 0
    with db.session() as s:
        for src in SourceStore(s).all():
            config = dict(src.config or {})
            if redact(config) == config:
                continue
            given = merge_secrets(
                config, secrets.decrypt(src.secret_encrypted) if src.secret_encrypted else None
            )
            public, secret = split_secrets(given)
            src.config = public
            src.secret_encrypted = secrets.encrypt(secret) if secret else None
            changed += 1
    if changed:
        log.warning("moved credentials of %d source(s) out of their stored config", changed)
    return changed


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


def ensure_default_repository(s: Session, path: Path) -> Repository | None:
    """The ``default`` local repository, created on a catalog that has none at all.

    Only then: an administrator who deleted ``default`` (it was empty, and
    other repositories exist) does not get it back at the next start.
    """
    repo = RepositoryStore(s).get(DEFAULT_REPOSITORY_ID)
    if repo is None and not RepositoryStore(s).all():
        backends.prepare_local(path)
        repo = Repository(id=DEFAULT_REPOSITORY_ID, name="default", type="local", path=str(path))
        s.add(repo)
        s.flush()
    return repo


# ------------------------------------------------------------ repositories
#
# Rules of repositories (SPEC 5). Slow I/O (mount, umount, the write probe,
# statvfs of a share) runs with no session open: the callers in
# hub/repositories/service.py read in one short session, call these, then
# write in another.


@dataclass
class RepositorySpec:
    """A repository as asked for, checked: what gets stored."""

    name: str
    kind: str
    path: Path
    immutable: bool
    retention_days: int
    config: dict[str, Any]  # no secrets
    password: str | None  # cifs only; stored encrypted


def check_name(name: str) -> str:
    if not name.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidRequest("name must be printable and not blank", fields=["name"])
    return name


def check_retention(immutable: bool, retention_days: int) -> None:
    if immutable and retention_days < 1:
        raise InvalidRequest(
            "retention_days must be at least 1 for an immutable repository (a restore point "
            "is locked until created_at + retention_days)",
            fields=["retention_days"],
        )


def check_path_free(s: Session, path: Path, data_dir: Path, *, exclude: str | None = None) -> None:
    """No two repositories share a folder or nest; never the hub's own data."""
    real = Path(os.path.realpath(path))
    data = Path(os.path.realpath(data_dir))
    if real == data or data.is_relative_to(real):
        raise InvalidRequest(
            f"path {path} would hold the hub's data directory {data_dir}", fields=["path"]
        )
    if real.is_relative_to(data) and not real.is_relative_to(data / "repositories"):
        raise InvalidRequest(
            f"path {path} is inside the hub's data directory; use {data / 'repositories'}/<name>",
            fields=["path"],
        )
    for other in RepositoryStore(s).all():
        if other.id == exclude:
            continue
        theirs = Path(os.path.realpath(other.path))
        if real == theirs or real.is_relative_to(theirs) or theirs.is_relative_to(real):
            raise PathInUse(
                f"path {path} overlaps repository {other.name} ({other.path})",
                repository_id=other.id,
            )


def prepare_folder(spec: RepositorySpec, run_dir: Path) -> bool:
    """Make ``spec.path`` usable now; True when the hub mounted a share for it.

    local: created (0700) if missing. nfs/cifs with a server in config: the
    hub mounts the share (unmounted again if the folder then fails the write
    probe). nfs/cifs without: must already be a mount of that type.
    """
    mounted = False
    if backends.hub_mounted(spec.kind, spec.config):
        was = backends.mount_at(spec.path)
        backends.mount(spec.kind, spec.path, spec.config, spec.password, run_dir=run_dir)
        mounted = was is None
    try:
        backends.check(spec.kind, spec.path, spec.config)
    except Error:
        if mounted:
            backends.unmount(spec.path)
        raise
    return mounted


def release_folder(repo: Repository) -> None:
    """Unmount a share the hub mounted for ``repo`` (the folder stays)."""
    if backends.hub_mounted(repo.type, repo.config or {}):
        backends.unmount(Path(repo.path))


def repository_password(repo: Repository, secrets: SecretBox) -> str | None:
    if not repo.secret_encrypted:
        return None
    value = secrets.decrypt(repo.secret_encrypted).get("password")
    return str(value) if value is not None else None


def mount_repositories(db: Database, secrets: SecretBox, run_dir: Path) -> None:
    """At hub start: mount the shares the hub manages (failures are logged;
    such a repository shows ``online: false`` and backups into it fail)."""
    with db.session() as s:
        todo = [
            (r.name, r.type, Path(r.path), dict(r.config or {}), repository_password(r, secrets))
            for r in RepositoryStore(s).all()
            if backends.hub_mounted(r.type, r.config or {})
        ]
    for name, kind, path, config, password in todo:
        try:
            backends.mount(kind, path, config, password, run_dir=run_dir)
        except Error as e:
            log.error("repository=%s mount failed: %s", name, e.message)


def extend_locks(s: Session, repo: Repository, retention_days: int, now: datetime) -> int:
    """Live locks of ``repo`` end no earlier than created_at + retention_days.

    Locks are only ever extended: a smaller retention applies to new backups.
    """
    extended = 0
    rows = s.scalars(
        select(Backup).where(Backup.repository_id == repo.id, Backup.immutable_until > now)
    ).all()
    for b in rows:
        until = b.created_at + timedelta(days=retention_days)
        if b.immutable_until is not None and until > b.immutable_until:
            b.immutable_until = until
            extended += 1
    return extended


def repository_capacity(repo: Repository) -> dict[str, int | None]:
    cap = backends.capacity(repo.path)
    if cap is None:
        return {"total_bytes": None, "used_bytes": None, "available_bytes": None}
    return {
        "total_bytes": cap.total_bytes,
        "used_bytes": cap.used_bytes,
        "available_bytes": cap.available_bytes,
    }


def repository_status(repo: Repository) -> tuple[bool, str | None]:
    """(online, why not): the folder is there and, for a share, mounted."""
    path = Path(repo.path)
    if repo.type in backends.FSTYPES:
        entry = backends.mount_at(path)
        if entry is None or entry.fstype not in backends.FSTYPES[repo.type]:
            return False, f"{path} is not an {repo.type} mount"
    if not path.is_dir():
        return False, f"{path} is not a directory"
    return True, None


_PROBES: dict[tuple[str, str], tuple[float, bool]] = {}
_PROBE_TTL = 600.0


def immutable_attribute(repo: Repository) -> bool | None:
    """Whether files in ``repo`` can carry the immutable attribute (probed,
    cached ten minutes); None when the folder cannot be reached."""
    key = (repo.id, repo.path)
    hit = _PROBES.get(key)
    if hit is not None and time.monotonic() - hit[0] < _PROBE_TTL:
        return hit[1]
    if not Path(repo.path).is_dir():
        return None
    supported = immutability.probe(repo.path).supported
    _PROBES[key] = (time.monotonic(), supported)
    return supported
