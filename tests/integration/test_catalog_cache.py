"""The catalog's generation and the cache that relies on it, on SQLite and
PostgreSQL: an answer is reused only while nobody, in any process, committed
anything; a commit by another process is seen at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from sendense.catalog.cache import CatalogCache
from sendense.catalog.db import Database
from sendense.catalog.models import Node

pytestmark = pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)


def commit_in_another_process(url: str, name: str) -> None:
    """Insert a node from a separate Python process (as another hub would)."""
    code = textwrap.dedent(
        f"""
        from sendense.catalog.db import Database
        from sendense.catalog.models import Node
        db = Database({url!r})
        with db.session() as s:
            s.add(Node(name={name!r}, url="http://127.0.0.1:1", token_encrypted="t"))
        db.dispose()
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def nodes(db: Database) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Node)) or 0


def test_generation_moves_with_every_commit_and_only_then(database: Database) -> None:
    g0 = database.generation()
    assert database.generation() == g0  # nothing happened
    nodes(database)  # a read commits nothing
    assert database.generation() == g0
    with database.session() as s:  # a commit through this process's pool
        s.add(Node(name="here", url="http://127.0.0.1:1", token_encrypted="t"))
    g1 = database.generation()
    assert g1 != g0
    commit_in_another_process(str(database.url.render_as_string(hide_password=False)), "there")
    assert database.generation() != g1


def test_cache_reuses_an_answer_until_another_process_commits(database: Database) -> None:
    cache = CatalogCache(database)
    calls: list[int] = []

    def count() -> int:
        calls.append(1)
        return nodes(database)

    assert cache.get("nodes", count) == 0
    assert cache.get("nodes", count) == 0
    assert len(calls) == 1, "the catalog did not change: the answer is reused"

    commit_in_another_process(str(database.url.render_as_string(hide_password=False)), "n1")
    assert cache.get("nodes", count) == 1, "a commit elsewhere is seen at once"
    assert len(calls) == 2
    assert cache.get("nodes", count) == 1
    assert len(calls) == 2


def test_cache_keeps_at_most_its_size(database: Database) -> None:
    cache = CatalogCache(database, max_entries=3)
    for i in range(10):
        assert cache.get(("k", i), lambda i=i: i) == i  # type: ignore[misc]
    calls: list[int] = []
    cache.get(("k", 0), lambda: calls.append(1) or 0)  # evicted: computed again
    cache.get(("k", 9), lambda: calls.append(1) or 9)  # kept
    assert len(calls) == 1


def fill_backups(db: Database, n: int) -> list[str]:
    """One VM disk with ``n`` restore points, many sharing a ``created_at``
    (the id breaks ties); ids newest first, as lists order them."""
    from datetime import UTC, datetime, timedelta

    from sendense.catalog.models import Backup, BackupJob, Repository, Source, Vm, VmDisk

    with db.session() as s:
        node = Node(name="n", url="http://127.0.0.1:1", token_encrypted="t")
        s.add(node)
        s.flush()
        src = Source(name="s", node_id=node.id, type="qemu")
        s.add(src)
        s.flush()
        vm = Vm(name="vm", source_id=src.id, path="/x")
        s.add(vm)
        s.flush()
        disk = VmDisk(
            vm_id=vm.id, disk_index=0, disk_key=2000, label="d", capacity_bytes=1, size_gb=0
        )
        repo = Repository(name="r", path="/r")
        job = BackupJob(requested_type="full", vm_id=vm.id)
        s.add_all([disk, repo, job])
        s.flush()
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        for i in range(n):
            s.add(
                Backup(
                    job_id=job.id,
                    vm_id=vm.id,
                    vm_disk_id=disk.id,
                    disk_index=0,
                    disk_key=2000,
                    repository_id=repo.id,
                    backup_type="incremental" if i % 5 else "full",
                    status="completed",
                    file_path=f"/r/{i}",
                    nbd_export_name=f"e{i}",
                    created_at=t0 + timedelta(seconds=i // 3),  # three per second
                )
            )
    return fill_order(db)


def test_deep_pages_seek_and_stay_exact_when_the_catalog_changes(database: Database) -> None:
    """Offsets past SEEK_FROM become seeks from a kept position; paging in
    order, jumping, and paging after a new restore point all answer exactly
    what OFFSET would."""
    from types import SimpleNamespace

    from sendense.catalog.models import Backup
    from sendense.catalog.stores import BackupStore
    from sendense.catalog.stores.backups import BackupFilter
    from sendense.hub.backups.service import SEEK_FROM, _page

    order = fill_backups(database, SEEK_FROM + 700)
    st = SimpleNamespace(cache=CatalogCache(database))

    def page(offset: int, limit: int = 100, f: BackupFilter = BackupFilter()) -> list[str]:
        with database.session() as s:
            generation = database.generation(s)
            return [r.id for r in _page(st, BackupStore(s), f, limit, offset, generation)]  # type: ignore[arg-type]

    offsets = [*range(SEEK_FROM - 200, SEEK_FROM + 800, 100), SEEK_FROM + 37, SEEK_FROM + 650]
    for offset in offsets:
        assert page(offset) == order[offset : offset + 100], offset
    assert page(SEEK_FROM + 5000) == []
    incr = BackupFilter(backup_type="incremental")
    with database.session() as s:
        incr_order = [
            r[0]
            for r in s.execute(
                select(Backup.id)
                .where(Backup.backup_type == "incremental")
                .order_by(Backup.created_at.desc(), Backup.id.desc())
            )
        ]
    assert page(SEEK_FROM + 100, f=incr) == incr_order[SEEK_FROM + 100 : SEEK_FROM + 200]

    # a newer restore point shifts every page by one: kept positions must not be used
    with database.session() as s:
        b = s.get(Backup, order[0])
        assert b is not None
        s.add(
            Backup(
                job_id=b.job_id,
                vm_id=b.vm_id,
                vm_disk_id=b.vm_disk_id,
                disk_index=0,
                disk_key=2000,
                repository_id=b.repository_id,
                backup_type="full",
                status="completed",
                file_path="/r/new",
                nbd_export_name="new",
                created_at=b.created_at + timedelta(days=1),
            )
        )
    order = fill_order(database)
    for offset in (SEEK_FROM, SEEK_FROM + 100, SEEK_FROM + 37):
        assert page(offset) == order[offset : offset + 100], offset


def fill_order(db: Database) -> list[str]:
    from sendense.catalog.models import Backup

    with db.session() as s:
        return [
            r[0]
            for r in s.execute(
                select(Backup.id).order_by(Backup.created_at.desc(), Backup.id.desc())
            )
        ]
