"""The API's read paths on SQLite and PostgreSQL (issue 12, CPU per request):
reads in autocommit that never leak it to writers, a pooled connection whose
server side went away replaced after a ping, JSON columns read back as
written, a job's details in one statement, and list totals taken from the
last page or counted."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

from sendense.catalog.cache import CatalogCache
from sendense.catalog.db import PING_IDLE, Database
from sendense.catalog.models import Backup, BackupJob, Node, Repository, Source, Vm, VmDisk
from sendense.core.access import ADMIN, Principal, Role, Scope
from sendense.core.errors import NotFound
from sendense.hub.backups import service as backups
from sendense.hub.jobs import service as jobs

pytestmark = pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def fill(db: Database, runs: int) -> dict[str, Any]:
    """Two VMs of two disks; ``runs`` backup jobs of vm-a (one restore point
    per disk each, every third job failed), one of vm-b, one verify job."""
    with db.session() as s:
        node = Node(name="n", url="http://127.0.0.1:1", token_encrypted="t")
        s.add(node)
        s.flush()
        src = Source(name="s", node_id=node.id, type="qemu")
        repo = Repository(name="r", path="/r")
        s.add_all([src, repo])
        s.flush()
        vms = {name: Vm(name=name, source_id=src.id, path=f"/{name}") for name in ("vm-a", "vm-b")}
        s.add_all(vms.values())
        s.flush()
        disks = {
            (name, i): VmDisk(
                vm_id=vm.id, disk_index=i, disk_key=2000 + i, label="d", capacity_bytes=1, size_gb=0
            )
            for name, vm in vms.items()
            for i in (1, 0)  # inserted out of order: answers are by disk
        }
        s.add_all(disks.values())
        s.flush()
        job_ids: list[str] = []
        for r in range(runs + 1):
            name = "vm-a" if r < runs else "vm-b"
            status = "failed" if r % 3 == 2 else "completed"
            job = BackupJob(
                requested_type="full",
                vm_id=vms[name].id,
                repository_id=repo.id,
                status=status,
                created_at=T0 + timedelta(minutes=r),
            )
            s.add(job)
            s.flush()
            job_ids.append(job.id)
            for i in (1, 0):
                s.add(
                    Backup(
                        job_id=job.id,
                        vm_id=vms[name].id,
                        vm_disk_id=disks[(name, i)].id,
                        disk_index=i,
                        disk_key=2000 + i,
                        repository_id=repo.id,
                        backup_type="full",
                        status=status,
                        file_path=f"/r/{r}-{i}",
                        nbd_export_name=f"e{r}-{i}",
                        created_at=T0 + timedelta(minutes=r),
                    )
                )
        verify = BackupJob(
            kind="verify",
            requested_type="full",
            vm_id=vms["vm-a"].id,
            status="running",
            params={"backup_ids": ["x"]},
            created_at=T0 + timedelta(hours=1),
        )
        s.add(verify)
        s.flush()
        return {"jobs": job_ids, "verify": verify.id, "vm_a": vms["vm-a"].id}


def hub(db: Database) -> Any:
    return SimpleNamespace(db=db, cache=CatalogCache(db))


def count(db: Database, model: Any, *where: Any) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where)) or 0


def test_list_totals_from_the_last_page_or_counted(database: Database) -> None:
    fill(database, runs=7)
    st = hub(database)
    f = backups.BackupFilter
    all_a = count(database, Backup, Backup.vm_id.in_(select(Vm.id).where(Vm.name == "vm-a")))
    assert all_a == 14
    for limit, offset, rows in ((100, 0, 14), (5, 0, 5), (5, 10, 4), (5, 14, 0), (5, 200, 0)):
        got = backups.list_backups(st, ADMIN, f(vm_name="vm-a"), limit=limit, offset=offset)
        assert (len(got["backups"]), got["total"]) == (rows, all_a), (limit, offset)
        assert {b["vm_name"] for b in got["backups"]} <= {"vm-a"}
    for vm_name, vm_id in (("nope", None), ("vm-a", "not-its-id")):
        for offset in (0, 3):
            got = backups.list_backups(
                st, ADMIN, f(vm_name=vm_name, vm_id=vm_id), limit=10, offset=offset
            )
            assert got == {"backups": [], "total": 0}
    failed = count(database, Backup, Backup.status == "failed")
    got = backups.list_backups(st, ADMIN, f(status="failed"), limit=3, offset=0)
    assert (len(got["backups"]), got["total"]) == (3, failed)

    total_jobs = count(database, BackupJob)
    for limit, offset, rows in ((50, 0, total_jobs), (4, 0, 4), (4, 8, 1), (4, 9, 0), (4, 90, 0)):
        got = jobs.list_jobs(st, ADMIN, status=None, kind=None, limit=limit, offset=offset)
        assert (len(got["jobs"]), got["total"]) == (rows, total_jobs), (limit, offset)
    running = jobs.list_jobs(st, ADMIN, status="running", kind=None, limit=50, offset=0)
    assert running["total"] == 1 and running["jobs"][0]["kind"] == "verify"
    assert jobs.list_jobs(st, ADMIN, status="pending", kind=None, limit=50, offset=0) == {
        "jobs": [],
        "total": 0,
    }


def test_job_details_carry_their_restore_points_by_disk(database: Database) -> None:
    ids = fill(database, runs=2)
    st = hub(database)
    view = jobs.get_job(st, ADMIN, ids["jobs"][0])
    assert [d["disk_id"] for d in view["disks"]] == [0, 1]
    with database.session() as s:
        by_disk = dict(
            s.execute(
                select(Backup.disk_index, Backup.id).where(Backup.job_id == ids["jobs"][0])
            ).all()
        )
    assert view["backups"] == [by_disk[0], by_disk[1]]
    assert [d["backup_id"] for d in view["disks"]] == view["backups"]
    assert view["vm_name"] == "vm-a"
    verify = jobs.get_job(st, ADMIN, ids["verify"])  # not a backup: its params name them
    assert (verify["backups"], verify["disks"], verify["kind"]) == (["x"], [], "verify")
    with pytest.raises(NotFound):
        jobs.get_job(st, ADMIN, "no-such-job")


def test_chain_by_name_and_by_context_id(database: Database) -> None:
    ids = fill(database, runs=5)
    st = hub(database)
    by_name = backups.chain(st, ADMIN, vm_name="vm-a")
    assert by_name == backups.chain(st, ADMIN, vm_id=ids["vm_a"])
    assert [d["disk_id"] for d in by_name["disks"]] == [0, 1]
    # completed runs 0, 1, 3, 4 (2 failed): four restore points per disk
    assert [d["restore_points"] for d in by_name["disks"]] == [4, 4]
    one = backups.chain(st, ADMIN, vm_name="vm-a", disk_id=1)
    assert [d["disk_id"] for d in one["disks"]] == [1]
    with pytest.raises(NotFound, match=r"disks 0\.\.1"):
        backups.chain(st, ADMIN, vm_name="vm-a", disk_id=2)
    with pytest.raises(NotFound, match="VM nope not found"):
        backups.chain(st, ADMIN, vm_name="nope")
    with pytest.raises(NotFound, match="VM context nope not found"):
        backups.chain(st, ADMIN, vm_id="nope")


def test_json_columns_read_back_as_written(database: Database) -> None:
    ids = fill(database, runs=1)
    value = {
        "big": 2**64 + 5,
        "negative": -(2**40),
        "float": 0.1,
        "text": 'é ü 日本 \u2028 "quoted" \\ back',
        "nested": [{"a": [1, 2, {"b": None}]}, True, False],
        "empty": {},
    }
    with database.session() as s:
        job = s.get(BackupJob, ids["verify"])
        assert job is not None
        job.params = value
        job.result = {"list": list(range(100))}
    with database.read() as s:
        row = s.execute(
            select(BackupJob.params, BackupJob.result).where(BackupJob.id == ids["verify"])
        ).one()
    assert row.params == value
    assert row.result == {"list": list(range(100))}
    assert jobs.get_job(hub(database), ADMIN, ids["verify"])["params"] == value


def test_reads_leave_writers_transactional(database: Database) -> None:
    """A read runs in autocommit on PostgreSQL; the pooled connection it used
    must be transactional again for the next writer (a failed write leaves
    nothing)."""
    for _ in range(3):
        with database.read() as s:
            assert s.execute(text("SELECT 1")).scalar() == 1
        with pytest.raises(RuntimeError), database.session() as s:
            s.add(Node(name="half-done", url="http://127.0.0.1:1", token_encrypted="t"))
            s.flush()
            raise RuntimeError("the write fails after its insert")
        assert count(database, Node, Node.name == "half-done") == 0


def test_a_pooled_connection_the_server_dropped_is_replaced(database: Database) -> None:
    """The ping is skipped for a connection used within PING_IDLE; one idle
    longer is pinged, and replaced when its server side is gone."""
    if database.url.get_backend_name() != "postgresql":
        pytest.skip("SQLite has no server to lose")
    with database.read() as s:
        s.execute(text("SELECT 1"))
    admin = create_engine(database.url, poolclass=NullPool)
    try:
        with admin.connect() as c:
            killed = c.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar()
        assert killed and killed >= 1
    finally:
        admin.dispose()
    time.sleep(PING_IDLE + 0.2)
    with database.read() as s:
        assert s.execute(text("SELECT 2")).scalar() == 2
    with database.session() as s:
        assert s.execute(text("SELECT 3")).scalar() == 3


def test_a_tenants_lists_follow_the_vms_tags_at_once(database: Database) -> None:
    """The VMs a scoped token sees are kept per scope while no VM's name or
    tags changed (catalog topic ``vms``): a tag written by anybody, even
    with plain SQL, shows in the very next list."""
    fill(database, runs=4)
    st = hub(database)
    with database.session() as s:
        repo_id = s.scalar(select(Repository.id))
    tenant = Principal(
        name="acme",
        role=Role.viewer,
        scope=Scope.parse({"vms": ["tag:customer=acme"], "repositories": [repo_id]}),
    )

    def seen() -> tuple[int, int]:
        b = backups.list_backups(st, tenant, backups.BackupFilter(), limit=100, offset=0)
        j = jobs.list_jobs(st, tenant, status=None, kind=None, limit=50, offset=0)
        return b["total"], j["total"]

    assert seen() == (0, 0)
    hits = st.cache.hits
    assert seen() == (0, 0)
    assert st.cache.hits >= hits + 2, "nothing changed: both lists reuse the set"
    with database.session() as s:
        s.execute(
            text("UPDATE vms SET tags = :t WHERE name = 'vm-b'"), {"t": '{"customer": "acme"}'}
        )
    assert seen() == (2, 1)
    with database.session() as s:
        vm = s.scalar(select(Vm).where(Vm.name == "vm-a"))
        assert vm is not None
        vm.tags = {"customer": "acme"}
    # vm-a: 4 backup jobs of 2 restore points each (failed ones listed too);
    # its verify job has no repository: outside the tenant's scope
    assert seen() == (2 + 8, 1 + 4)
    with database.session() as s:
        s.execute(text("UPDATE vms SET name = 'vm-b2', tags = '{}' WHERE name = 'vm-b'"))
    assert seen() == (8, 4)
