"""Catalog schema and Database handle, on SQLite and PostgreSQL alike."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from sendense.catalog.db import Database, sqlite_url
from sendense.catalog.models import (
    Backup,
    BackupJob,
    Base,
    Node,
    Repository,
    Source,
    Vm,
    VmDisk,
)


def current_revision(database: Database) -> str | None:
    with database.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def add_vm_with_job(database: Database) -> tuple[str, str]:
    """A node, source, VM with two disks, repository and job; returns (vm id, job id)."""
    with database.session() as s:
        node = Node(name="node1", url="http://127.0.0.1:9001", token_encrypted="x")
        source = Source(name="qemu1", node=node, type="qemu", config={"host": "local"})
        vm = Vm(name="vm1", source=source, path="/run/vm1/qmp.sock")
        vm.disks = [
            VmDisk(disk_index=i, disk_key=2000 + i, label=f"disk{i}", capacity_bytes=1 << 30,
                   size_gb=1.0, node_name=f"drive{i}")
            for i in range(2)
        ]  # fmt: skip
        repo = Repository(name="repo1", path="/srv/backups")
        s.add_all([vm, repo])
        s.flush()
        job = BackupJob(vm_id=vm.id, repository_id=repo.id, node_id=node.id, requested_type="full")
        s.add(job)
        s.flush()
        return vm.id, job.id


def new_backup(job: BackupJob, disk: VmDisk, **fields: Any) -> Backup:
    """A backup row of ``disk`` in ``job``; ``fields`` override the defaults."""
    defaults: dict[str, Any] = {
        "backup_type": "full",
        "file_path": f"/srv/backups/{disk.label}.qcow2",
        "nbd_export_name": disk.label,
    }
    return Backup(job_id=job.id, vm_id=job.vm_id, vm_disk_id=disk.id, disk_index=disk.disk_index,
                  disk_key=disk.disk_key, repository_id=job.repository_id,
                  **(defaults | fields))  # fmt: skip


def test_upgrade_creates_all_tables(database: Database) -> None:
    tables = set(inspect(database.engine).get_table_names()) - {"alembic_version"}
    assert tables == set(Base.metadata.tables)


def test_migration_matches_models(database: Database) -> None:
    with database.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_chain_roundtrip(database: Database) -> None:
    vm_id, job_id = add_vm_with_job(database)
    until = datetime(2030, 1, 1, tzinfo=UTC)
    with database.session() as s:
        job = s.get_one(BackupJob, job_id)
        disk = job.vm.disks[0]
        full = new_backup(job, disk, total_bytes=1 << 30, change_id="c1", tags={"why": "test"},
                          immutable_until=until)  # fmt: skip
        s.add(full)
        s.flush()
        incr = new_backup(job, disk, backup_type="incremental", parent_id=full.id,
                          previous_change_id="c1", change_id="c2")  # fmt: skip
        s.add(incr)
        s.flush()
        full_id, incr_id = full.id, incr.id

    with database.session() as s:
        vm = s.get_one(Vm, vm_id)
        assert [(d.disk_index, d.label) for d in vm.disks] == [(0, "disk0"), (1, "disk1")]
        assert vm.source.node.name == "node1"
        assert vm.source.config == {"host": "local"}
        child = s.get_one(Backup, incr_id)
        assert child.parent_id == full_id
        parent = s.get_one(Backup, full_id)
        assert (parent.backup_type, parent.parent_id, parent.change_id) == ("full", None, "c1")
        assert (parent.tags, parent.total_bytes) == ({"why": "test"}, 1 << 30)
        assert parent.immutable_until is not None and parent.immutable_until.year == 2030
        assert child.job.status == "pending"
        assert {b.id for b in child.job.backups} == {full_id, incr_id}
        assert s.scalars(select(Backup.id).where(Backup.parent_id == full_id)).all() == [incr_id]


def test_foreign_keys_enforced(database: Database) -> None:
    _vm_id, job_id = add_vm_with_job(database)
    with pytest.raises(IntegrityError), database.session() as s:
        job = s.get_one(BackupJob, job_id)
        orphan = new_backup(job, job.vm.disks[0])
        orphan.job_id = "no-such-job"
        s.add(orphan)
    with database.session() as s:
        assert s.scalars(select(Backup)).all() == []


def test_session_rolls_back_on_error(database: Database) -> None:
    with pytest.raises(RuntimeError), database.session() as s:
        s.add(Node(name="ghost", url="http://x", token_encrypted="x"))
        s.flush()
        raise RuntimeError("boom")
    with database.session() as s:
        assert s.scalars(select(Node)).all() == []


def test_upgrade_is_idempotent(database: Database) -> None:
    head = current_revision(database)
    assert head == ScriptDirectory.from_config(database.alembic_config()).get_current_head()
    database.upgrade()
    database.upgrade()
    assert current_revision(database) == head
    assert set(inspect(database.engine).get_table_names()) - {"alembic_version"} == set(
        Base.metadata.tables
    )


def test_sqlite_pragmas_and_directory(tmp_path: Path) -> None:
    db = Database(sqlite_url(f"{tmp_path}/new/dir/catalog.db"))
    try:
        with db.engine.connect() as conn:
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    finally:
        db.dispose()


def test_postgresql_url_uses_psycopg3() -> None:
    db = Database("postgresql://sendense:secret@db.example:5432/catalog")
    assert db.url.drivername == "postgresql+psycopg"
    assert db.engine.url.database == "catalog"
    db.dispose()


def test_upgrade_keeps_rows_of_a_0001_catalog(db_url: str) -> None:
    """A catalog made by the first release upgrades in place, rows intact."""
    db = Database(db_url)
    try:
        db.upgrade("0001")
        with db.engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO repositories (id, name, type, path, immutable, retention_days, "
                "created_at) VALUES ('r1', 'r1', 'local', '/tmp/r1', false, 0, "
                "'2026-01-01 00:00:00')"
            )
        db.upgrade()
        with db.session() as s:
            repo = s.get(Repository, "r1")
            assert repo is not None and repo.config == {} and repo.path == "/tmp/r1"
    finally:
        db.dispose()
