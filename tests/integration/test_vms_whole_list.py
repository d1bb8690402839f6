"""The whole ``GET /vms`` list rebuilt from the VMs that changed
(hub/vms/service.WholeList over catalog/topics.py's triggers) answers exactly
what a build from scratch answers, on SQLite and PostgreSQL, through random
changes: restore points completing (several in one transaction, ties of
``created_at`` included), deleted, verified; VMs added, renamed, deleted,
their disks changed; and writes GET /vms does not show (jobs, running
restore points), which must not move the topic's version.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic_core import from_json
from sqlalchemy import delete, func, select, text, update

from sendense.catalog.db import Database
from sendense.catalog.models import Backup, BackupJob, Node, Repository, Source, Vm, VmDisk
from sendense.catalog.topics import topic_counter
from sendense.hub.vms.service import WholeList


def version(db: Database) -> int:
    with db.read() as s:
        counter = topic_counter(s, "vms")
    assert counter is not None
    return counter


def answer(db: Database, whole: WholeList) -> Any:
    with db.read() as s:
        counter = topic_counter(s, "vms")
        assert counter is not None
        return from_json(whole.answer(s, counter))


def add_vm(s: Any, source: Source, name: str) -> Vm:
    vm = Vm(name=name, source=source, path=f"/run/{name}.sock", tags={"n": name})
    vm.disks = [
        VmDisk(disk_index=i, disk_key=2000 + i, label=f"disk{i}", capacity_bytes=1 << 30,
               size_gb=1.0, node_name=f"drive{i}")
        for i in range(2)
    ]  # fmt: skip
    s.add(vm)
    s.flush()
    return vm


def add_run(s: Any, vm: Vm, repo: Repository, node: Node, at: datetime, status: str) -> None:
    """A backup run of both disks, one ``created_at`` for both (a tie)."""
    job = BackupJob(vm_id=vm.id, repository_id=repo.id, node_id=node.id, requested_type="full")
    s.add(job)
    s.flush()
    for d in vm.disks:
        s.add(
            Backup(job_id=job.id, vm_id=vm.id, vm_disk_id=d.id, disk_index=d.disk_index,
                   disk_key=d.disk_key, repository_id=repo.id, backup_type="full",
                   file_path=f"/srv/{job.id}-{d.disk_index}.qcow2",
                   nbd_export_name=f"{job.id}-{d.disk_index}", status=status, created_at=at)
        )  # fmt: skip


def test_rebuilt_from_changes_equals_from_scratch(database: Database) -> None:
    rng = random.Random(12)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with database.session() as s:
        node = Node(name="node1", url="http://127.0.0.1:9001", token_encrypted="x")
        source = Source(name="src", node=node, type="qemu", config={})
        repo = Repository(name="repo1", path="/srv/backups")
        s.add_all([source, repo])
        s.flush()
        vms = [add_vm(s, source, f"vm-{i:02d}") for i in range(12)]
        for i, vm in enumerate(vms[:8]):
            add_run(s, vm, repo, node, start + timedelta(minutes=i), "completed")
        ids = (node.id, source.id, repo.id)
    whole = WholeList()
    first = answer(database, whole)
    assert [v["name"] for v in first["vms"]] == sorted(v.name for v in vms)
    assert first["total"] == 12 and whole.rebuilds == 1

    step = 0
    for step in range(40):
        before = version(database)
        action = rng.choice(
            ["complete", "complete", "two", "running", "verify", "delete_backup", "rename",
             "add_vm", "delete_vm", "disk", "job"]
        )  # fmt: skip
        quiet = action in ("running", "job")
        with database.session() as s:
            node, source, repo = (
                s.get_one(Node, ids[0]),
                s.get_one(Source, ids[1]),
                s.get_one(Repository, ids[2]),
            )
            every = list(s.scalars(select(Vm).order_by(Vm.name)))
            vm = rng.choice(every)
            at = start + timedelta(hours=step + 1)
            if action in ("complete", "running"):
                add_run(s, vm, repo, node, at, "completed" if action == "complete" else "running")
            elif action == "two":  # two VMs in one transaction
                for other in rng.sample(every, 2):
                    add_run(s, other, repo, node, at, "completed")
            elif action == "verify":
                completed = select(func.count()).where(
                    Backup.vm_id == vm.id, Backup.status == "completed"
                )
                quiet = not s.scalar(completed)
                s.execute(update(Backup).where(Backup.vm_id == vm.id).values(verify_status="ok"))
            elif action == "delete_backup":
                newest = s.scalars(
                    select(Backup).where(Backup.vm_id == vm.id, Backup.status == "completed")
                ).all()
                quiet = not newest
                for b in newest[-2:]:
                    s.delete(b)
            elif action == "rename":
                vm.name = f"{rng.choice('abz')}-{step:02d}"
            elif action == "add_vm":
                add_vm(s, source, f"new-{step:02d}")
            elif action == "delete_vm":
                s.execute(delete(Backup).where(Backup.vm_id == vm.id))
                s.execute(delete(BackupJob).where(BackupJob.vm_id == vm.id))
                s.execute(delete(VmDisk).where(VmDisk.vm_id == vm.id))
                s.execute(delete(Vm).where(Vm.id == vm.id))
            elif action == "disk":
                vm.disks[0].label = f"relabelled-{step}"
            else:  # job progress, leases: nothing GET /vms shows
                s.execute(text("UPDATE backup_jobs SET step = 'copying'"))
        if quiet:
            assert version(database) == before, action
        else:
            assert version(database) > before, action
        if rng.random() < 0.3:
            continue  # several changes between two requests
        incremental = answer(database, whole)
        assert incremental == answer(database, WholeList()), (step, action)
    assert whole.updates > 10 and whole.rebuilds == 1
