"""Repositories: create, change, delete, rescan; capacity and locks shown.

Rules (engine/inventory.py has the pieces):

- A scoped caller sees only its repositories: any other id answers 404.
- Slow I/O (mount, umount, the write probe) runs between two short
  sessions, never inside one.
- ``DELETE`` refuses while the repository holds any backup record
  (409 ``not_empty`` with the count) or a job runs on it (409 ``in_use``);
  it removes the record (and unmounts a share the hub mounted), never the
  folder or its files. ``default`` is no exception; it is re-created only
  on a catalog without any repository.
- ``immutable`` cannot be switched off while locks are live (409
  ``locks_live`` with the count and the latest end).
- ``encrypted`` is chosen at creation and never changes (409
  ``encryption_fixed``): images are written encrypted or not from the first
  backup on. Creating an encrypted repository makes its data key (and the
  master key, the first time: keystore.py) in the same transaction as the
  record. ``POST .../key/export`` answers the key to an admin, once per call
  (the audit log records the call; the key is never logged).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from sendense import keystore
from sendense.catalog.models import BackupJob, Repository, RepositoryKey
from sendense.catalog.stores import JobStore, RepositoryStore
from sendense.core.access import Principal
from sendense.core.errors import (
    Conflict,
    EncryptionFixed,
    InvalidRequest,
    LocksLive,
    NotEncrypted,
    NotFound,
    RepositoryInUse,
    RepositoryNotEmpty,
    Unavailable,
)
from sendense.engine import inventory
from sendense.engine.inventory import RepositorySpec
from sendense.engine.rescan import KIND as RESCAN
from sendense.hub.repositories.schemas import RepositoryCreate, RepositoryUpdate, RescanCreate
from sendense.hub.state import HubState
from sendense.hub.views import job_view, repository_view
from sendense.storage import backends

log = logging.getLogger(__name__)


def _view(
    st: HubState, repo: Repository, usage: tuple[int, int], locks: tuple[int, datetime | None]
) -> dict[str, Any]:
    online, why = inventory.repository_status(repo)
    capacity = (
        inventory.repository_capacity(repo)
        if online
        else {
            "total_bytes": None,
            "used_bytes": None,
            "available_bytes": None,
        }
    )
    return repository_view(
        repo,
        {
            **capacity,
            "encrypted": bool(repo.encrypted),
            "has_credentials": bool(repo.secret_encrypted),
            "mounted_by_hub": backends.hub_mounted(repo.type, repo.config or {}),
            "online": online,
            "status_message": why,
            "updated_at": repo.updated_at,
            "backup_count": usage[0],
            "backup_bytes": usage[1],
            "immutable_attribute": inventory.immutable_attribute(repo) if online else None,
            "locks_live": locks[0],
            "locked_until": locks[1],
        },
    )


def _visible(st: HubState, s: Any, who: Principal, repository_id: str) -> Repository:
    repo = RepositoryStore(s).get(repository_id)
    if repo is None or not who.can_see_repository(repo.id):
        raise NotFound(f"repository {repository_id} not found", repository_id=repository_id)
    return repo


def list_repositories(st: HubState, who: Principal) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    with st.db.session() as s:
        store = RepositoryStore(s)
        usage = store.usage()
        rows = [
            (r, usage.get(r.id, (0, 0)), store.live_locks(r.id, now))
            for r in store.all()
            if who.can_see_repository(r.id)
        ]
    # statvfs and the attribute probe with no session open (a share may be slow).
    return [_view(st, r, u, locks) for r, u, locks in rows]


def get_repository(st: HubState, who: Principal, repository_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        repo = _visible(st, s, who, repository_id)
        store = RepositoryStore(s)
        usage = store.usage().get(repo.id, (0, 0))
        locks = store.live_locks(repo.id, datetime.now(UTC))
    return _view(st, repo, usage, locks)


def _run_dir(st: HubState) -> Path:
    return st.settings.data_dir / "run"


def create_repository(st: HubState, who: Principal, body: RepositoryCreate) -> dict[str, Any]:
    config, password = backends.validate_config(body.type, body.config)
    spec = RepositorySpec(
        name=inventory.check_name(body.name),
        kind=body.type,
        path=backends.check_path(body.path),
        immutable=body.immutable,
        retention_days=body.retention_days,
        config=config,
        password=password,
    )
    inventory.check_retention(spec.immutable, spec.retention_days)
    data_key = None
    if body.encryption_key is not None:
        if not body.encrypted:
            raise InvalidRequest(
                "encryption_key is given only with encrypted: true", field="encryption_key"
            )
        data_key = keystore.data_key_of_passphrase(body.encryption_key)
    with st.db.session() as s:
        _check_name_free(s, spec.name)
        inventory.check_path_free(s, spec.path, st.settings.data_dir)
    mounted = inventory.prepare_folder(spec, _run_dir(st))
    try:
        with st.db.session() as s:
            _check_name_free(s, spec.name)
            inventory.check_path_free(s, spec.path, st.settings.data_dir)
            repo = Repository(
                name=spec.name,
                type=spec.kind,
                path=str(spec.path),
                immutable=spec.immutable,
                retention_days=spec.retention_days,
                config=spec.config,
                secret_encrypted=st.secrets.encrypt({"password": password}) if password else None,
                encrypted=body.encrypted,
            )
            s.add(repo)
            s.flush()
            if body.encrypted:
                keystore.from_settings(st.settings).add_key(s, repo.id, data_key=data_key)
                s.flush()
    except IntegrityError as e:  # a concurrent create took the name
        if mounted:
            backends.unmount(spec.path)
        raise Conflict(f"a repository named {spec.name} already exists") from e
    except Exception:
        if mounted:
            backends.unmount(spec.path)
        raise
    # Shown even to a scoped admin, whose scope cannot name the new id yet.
    return _view(st, repo, (0, 0), (0, None))


def _check_name_free(s: Any, name: str, exclude: str | None = None) -> None:
    other = RepositoryStore(s).by_name(name)
    if other is not None and other.id != exclude:
        raise Conflict(f"a repository named {name} already exists", repository_id=other.id)


def update_repository(
    st: HubState, who: Principal, repository_id: str, body: RepositoryUpdate
) -> dict[str, Any]:
    given = body.model_fields_set
    now = datetime.now(UTC)
    with st.db.session() as s:
        repo = _visible(st, s, who, repository_id)
        store = RepositoryStore(s)
        backups = store.backup_rows(repo.id)
        old_path = Path(repo.path)
        old_config = dict(repo.config or {})
        password = inventory.repository_password(repo, st.secrets)
        if body.encrypted is not None and body.encrypted != bool(repo.encrypted):
            raise EncryptionFixed(
                f"repository {repo.name} is {'' if repo.encrypted else 'not '}encrypted and "
                "stays so: encryption is chosen when a repository is created (create another "
                "repository to change it)",
                encrypted=bool(repo.encrypted),
            )
        immutable = repo.immutable if body.immutable is None else body.immutable
        retention = repo.retention_days if body.retention_days is None else body.retention_days
        if "name" in given and body.name is not None:
            _check_name_free(s, inventory.check_name(body.name), exclude=repo.id)
        inventory.check_retention(immutable, retention)
        if repo.immutable and not immutable:
            count, latest = store.live_locks(repo.id, now)
            if count:
                raise LocksLive(
                    f"immutable cannot be switched off: {count} restore point(s) are locked, "
                    f"the last until {latest.isoformat() if latest else '?'}",
                    count=count,
                    latest=latest.isoformat() if latest else None,
                )
        new_path = old_path
        if "path" in given and body.path is not None:
            new_path = backends.check_path(body.path)
        new_config, new_password = old_config, password
        if "config" in given and body.config is not None:
            raw = dict(body.config)
            keep_password = "password" not in raw
            if raw.get("password", "") is None:
                raw.pop("password")
            new_config, given_password = backends.validate_config(repo.type, raw)
            new_password = password if keep_password else given_password
        identity = ("server", "export", "share")
        moves = new_path != old_path or any(
            new_config.get(k) != old_config.get(k) for k in identity
        )
        if moves and backups:
            raise RepositoryNotEmpty(
                f"repository {repo.name} holds {backups} backup record(s): its path, server, "
                "export or share can change only while it is empty",
                backups=backups,
            )
        remount = backends.hub_mounted(repo.type, new_config) and (
            moves or new_config != old_config or new_password != password
        )
        if (remount or moves) and store.active_jobs(repo.id):
            raise RepositoryInUse(f"a job runs on repository {repo.name}; try when it ends")
        if new_path != old_path:
            inventory.check_path_free(s, new_path, st.settings.data_dir, exclude=repo.id)
        kind = repo.type
    unmounted = False
    if (
        remount
        or moves
        or (backends.hub_mounted(kind, old_config) and not backends.hub_mounted(kind, new_config))
    ):
        if backends.hub_mounted(kind, old_config):
            backends.unmount(old_path)
            unmounted = True
        spec = RepositorySpec(
            name=body.name or "",
            kind=kind,
            path=new_path,
            immutable=immutable,
            retention_days=retention,
            config=new_config,
            password=new_password,
        )
        try:
            inventory.prepare_folder(spec, _run_dir(st))
        except Exception:
            if unmounted:  # put the old mount back: the repository stays as it was
                old = RepositorySpec("", kind, old_path, False, 0, old_config, password)
                try:
                    inventory.prepare_folder(old, _run_dir(st))
                except Exception:
                    pass
            raise
    with st.db.session() as s:
        repo = _visible(st, s, who, repository_id)
        if "name" in given and body.name is not None:
            repo.name = body.name
        if retention > repo.retention_days and immutable:
            inventory.extend_locks(s, repo, retention, now)
        repo.retention_days = retention
        repo.immutable = immutable
        repo.path = str(new_path)
        repo.config = new_config
        repo.secret_encrypted = (
            st.secrets.encrypt({"password": new_password}) if new_password else None
        )
        repo.updated_at = now
    return get_repository(st, who, repository_id)


def delete_repository(st: HubState, who: Principal, repository_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        repo = _visible(st, s, who, repository_id)
        store = RepositoryStore(s)
        backups = store.backup_rows(repo.id)
        if backups:
            raise RepositoryNotEmpty(
                f"repository {repo.name} holds {backups} backup record(s); delete them first "
                "(DELETE /api/v1/backups/{backup_id})",
                backups=backups,
            )
        if store.active_jobs(repo.id):
            raise RepositoryInUse(f"a job runs on repository {repo.name}; try when it ends")
        # Ended jobs keep their history without the repository.
        s.execute(
            update(BackupJob).where(BackupJob.repository_id == repo.id).values(repository_id=None)
        )
        s.delete(repo)
        s.flush()
        kind, path, config = repo.type, Path(repo.path), dict(repo.config or {})
    unmounted = False
    if backends.hub_mounted(kind, config):
        backends.unmount(path)
        unmounted = True
    return {"repository_id": repository_id, "deleted": True, "unmounted": unmounted}


def start_rescan(
    st: HubState, who: Principal, repository_id: str, body: RescanCreate
) -> dict[str, Any]:
    with st.db.session() as s:
        repo = _visible(st, s, who, repository_id)
        online, why = inventory.repository_status(repo)
        if not online:
            raise Unavailable(
                f"repository {repo.name} is offline: {why}", code="repository_offline"
            )
        running = RepositoryStore(s).active_jobs(repo.id, kind=RESCAN)
        if running:
            raise RepositoryInUse(
                f"a rescan of repository {repo.name} is already running (job {running[0].id})",
                job_id=running[0].id,
            )
        job = st.lifecycle.new_local_job(
            s,
            RESCAN,
            {"repository_id": repo.id, "dry_run": body.dry_run},
            repository_id=repo.id,
            created_by=who.name,
            step="scanning",
        )
        job_id = job.id
    st.lifecycle.launch(job_id)
    with st.db.session() as s:
        started = JobStore(s).get(job_id)
        assert started is not None
        view = job_view(started)
    return {"job_id": job_id, "status": view["status"], "job": view, "backups": []}


def export_key(st: HubState, who: Principal, repository_id: str) -> dict[str, Any]:
    """The LUKS passphrase of an encrypted repository's images (a recovery copy)."""
    with st.db.session() as s:
        repo = _visible(st, s, who, repository_id)
        if not repo.encrypted:
            raise NotEncrypted(
                f"repository {repo.name} is not encrypted: it has no key", repository_id=repo.id
            )
        keys = keystore.from_settings(st.settings)
        passphrase = keystore.passphrase_of(keys.data_key(s, repo.id))
        row = s.get(RepositoryKey, repo.id)
        assert row is not None  # data_key found it
        key_id = row.key_id
    log.info("repository=%s key exported by=%s", repository_id, who.name)
    return {
        "repository_id": repository_id,
        "key_id": key_id,
        "passphrase": passphrase.decode(),
        "format": "luks-passphrase",
    }
