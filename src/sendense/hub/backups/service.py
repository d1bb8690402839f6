"""Backups: start, list, details, chains; what a caller may see of them."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sendense.catalog.cache import CatalogCache
from sendense.catalog.models import Backup, Vm
from sendense.catalog.stores import BackupStore, JobStore, VmStore
from sendense.catalog.stores.backups import BackupFilter as StoreFilter
from sendense.catalog.topics import topic_version
from sendense.core.access import Principal
from sendense.core.errors import InvalidRequest, NotFound
from sendense.engine import consolidate as consolidation
from sendense.engine import delete
from sendense.engine import verify as verification
from sendense.engine.backup import BackupRequest
from sendense.hub.state import HubState
from sendense.hub.views import backup_view, job_view
from sendense.hub.vms.service import visible_vm


@dataclass
class BackupFilter:
    vm_name: str | None = None
    vm_id: str | None = None
    repository_id: str | None = None
    backup_type: str | None = None
    status: str | None = None
    verify_status: str | None = None
    disk_index: int | None = None
    since: datetime | None = None
    until: datetime | None = None


def visible_vm_ids(
    s: Session, who: Principal, cache: CatalogCache | None = None
) -> AbstractSet[str] | None:
    """Ids of the VMs a scoped caller may see; None: all of them.

    It reads every VM's name and tags (5,000 rows for a tenant's every list
    request): with ``cache``, the set is kept per scope while the catalog
    topic ``vms`` (any change to a VM's name or tags bumps it;
    catalog/topics.py) has not moved, its version read first."""
    if who.scope is None:
        return None

    def compute() -> frozenset[str]:
        rows = s.execute(select(Vm.id, Vm.name, Vm.tags)).all()
        return frozenset(who.visible_vm_ids((r[0], r[1], r[2]) for r in rows))

    if cache is None:
        return compute()
    return cache.get(("visible_vm_ids", who.scope), compute, topic_version(s, "vms"))


def visible_backup(s: Session, who: Principal, backup_id: str) -> Backup:
    """The backup, or NotFound (also when the caller's scope hides its VM)."""
    b = BackupStore(s).get(backup_id)
    if b is None or (
        who.scope is not None
        and not (who.can_see_vm(b.vm.name, b.vm.tags) and who.can_see_repository(b.repository_id))
    ):
        raise NotFound(f"backup {backup_id} not found", backup_id=backup_id)
    return b


def start_backup(st: HubState, who: Principal, body: Any) -> dict[str, Any]:
    with st.db.session() as s:
        visible_vm(s, who, body.vm_name)
        if not who.can_see_repository(body.repository_id):
            raise InvalidRequest(
                f"repository_id {body.repository_id} does not exist",
                repository_id=body.repository_id,
            )
    job_id = st.engine.start(
        BackupRequest(
            vm_name=body.vm_name,
            repository_id=body.repository_id,
            backup_type=body.backup_type,
            disk_id=body.disk_id,
            tags=body.tags,
            created_by=who.name,
            queue=body.queue,
        )
    )
    with st.db.session() as s:
        job = JobStore(s).get(job_id)
        assert job is not None
        view = job_view(job)
        return {
            "job_id": job_id,
            "status": view["status"],
            "job": view,
            "backups": [backup_view(b) for b in job.backups],
        }


def list_backups(
    st: HubState, who: Principal, f: BackupFilter, *, limit: int, offset: int
) -> dict[str, Any]:
    with st.db.read() as s:
        # A deep page keeps positions with the catalog's generation, read
        # before this session reads anything (catalog/cache.py).
        generation = st.db.generation(s) if offset + limit >= SEEK_FROM else None
        vm_ids = visible_vm_ids(s, who, st.cache)
        where = StoreFilter(
            vm_id=f.vm_id,
            vm_name=f.vm_name or None,  # in the statement: no lookup of its own
            vm_ids=None if vm_ids is None else frozenset(vm_ids),
            repository_id=f.repository_id,
            repository_ids=None if who.scope is None else tuple(sorted(who.scope.repositories)),
            backup_type=f.backup_type,
            status=f.status,
            verify_status=f.verify_status,
            disk_index=f.disk_index,
            since=f.since,
            until=f.until,
        )
        store = BackupStore(s)
        rows, more = _page_and_more(st, store, where, limit, offset, generation)
        if (rows and not more) or (not rows and offset == 0):
            # The last page: it tells the total (the restore points of one
            # VM, the running jobs...) without counting.
            total = offset + len(rows)
        else:
            # The exact total counts every matching row (4 ms for 90,000 on
            # SQLite): reused while the catalog has not changed.
            if generation is None:
                generation = st.db.generation(s)
            total = st.cache.get(("backups.total", where), lambda: store.count(where), generation)
    return {"backups": [backup_view(r) for r in rows], "total": total}


# Offsets from here on skip rows in the index (O(offset)): their position is
# looked up once and kept while the catalog is unchanged.
SEEK_FROM = 1000


def _page(
    st: HubState, store: BackupStore, where: StoreFilter, limit: int, offset: int, generation: str
) -> list[Any]:
    """One page (`_page_and_more`)."""
    return _page_and_more(st, store, where, limit, offset, generation)[0]


def _page_and_more(
    st: HubState,
    store: BackupStore,
    where: StoreFilter,
    limit: int,
    offset: int,
    generation: str | None,
) -> tuple[list[Any], bool]:
    """One page, and whether more rows follow it. A deep ``offset`` becomes
    a seek: the position of its first row (``created_at``, ``id``) is kept
    with the catalog's generation (catalog/cache.py; given when
    ``offset + limit`` reaches `SEEK_FROM`), and each deep page also keeps
    where the next one starts, so paging through a long list in order costs
    a seek per page (offset 50,000: 1.5 ms of SQL skipping rows, 0.5 ms
    seeking)."""
    if offset < SEEK_FROM:
        rows = list(store.page(where, limit=limit + 1, offset=offset))
    else:
        assert generation is not None
        start = st.cache.get(
            ("backups.at", where, offset), lambda: store.key_at(where, offset), generation
        )
        if start is None:
            return [], False
        rows = list(store.page(where, limit=limit + 1, start=start))
    more = len(rows) > limit
    if more:
        nxt = rows.pop()
        if offset + limit >= SEEK_FROM:
            assert generation is not None
            st.cache.put(
                ("backups.at", where, offset + limit), (nxt.created_at, nxt.id), generation
            )
    return rows, more


def get_backup(st: HubState, who: Principal, backup_id: str) -> dict[str, Any]:
    with st.db.read() as s:
        row = BackupStore(s).row(backup_id)
    if row is None or (
        who.scope is not None
        and not (
            who.can_see_vm(row.vm_name, row.vm_tags) and who.can_see_repository(row.repository_id)
        )
    ):
        raise NotFound(f"backup {backup_id} not found", backup_id=backup_id)
    return backup_view(row)


def chain(
    st: HubState,
    who: Principal,
    *,
    vm_name: str | None = None,
    vm_id: str | None = None,
    disk_id: int | None = None,
    repository_id: str | None = None,
) -> dict[str, Any]:
    """Per disk, the chain of the VM (by name or context id). Two statements
    (the VM with its disks, then the restore points of all of them) of Core
    rows: it was an ORM VM, its disks and a query of ORM backups per disk."""
    with st.db.read() as s:
        store = BackupStore(s)
        disks = store.chain_vm(name=vm_name) if vm_name is not None else store.chain_vm(vm_id=vm_id)
        vm = disks[0] if disks else None
        if vm is None or not who.can_see_vm(vm.name, vm.tags):
            if vm_name is not None:
                raise NotFound(f"VM {vm_name} not found", vm_name=vm_name)
            raise NotFound(f"VM context {vm_id} not found", vm_context_id=vm_id)
        if repository_id is not None and not who.can_see_repository(repository_id):
            raise NotFound(f"repository {repository_id} not found")
        disks = [d for d in disks if d.disk_index is not None]
        shown = [d for d in disks if disk_id is None or d.disk_index == disk_id]
        if disk_id is not None and not shown:
            raise NotFound(
                f"disk_id {disk_id} is out of range for VM {vm.name} (disks 0..{len(disks) - 1})",
                disk_id=disk_id,
            )
        rows = store.chain_rows(vm.id, disk_id, repository_id) if shown else []
    by_disk: dict[int, list[Any]] = {}
    for b in rows:
        if who.can_see_repository(b.repository_id):
            by_disk.setdefault(b.disk_index, []).append(b)
    return {
        "vm_name": vm.name,
        "vm_context_id": vm.id,
        "disks": [_disk_chain(d, by_disk.get(d.disk_index, [])) for d in shown],
    }


def _disk_chain(disk: Any, backups: list[Any]) -> dict[str, Any]:
    # The current chain: from the newest restore point back through parents.
    by_id = {b.id: b for b in backups}
    links = []
    cur = backups[-1] if backups else None
    while cur is not None:
        links.append(cur)
        cur = by_id.get(cur.parent_id) if cur.parent_id else None
    links.reverse()
    return {
        "disk_id": disk.disk_index,
        "disk_key": disk.disk_key,
        "chain": [
            {
                "backup_id": b.id,
                "backup_type": b.backup_type,
                "parent_backup_id": b.parent_id,
                "file_path": b.file_path,
                "size_on_disk": b.size_on_disk,
                "bytes_transferred": b.bytes_transferred,
                "change_id": b.change_id,
                "synthetic": b.synthetic,
                "verify_status": b.verify_status,
                "immutable_until": b.immutable_until,
                "created_at": b.created_at,
            }
            for b in links
        ],
        "chain_length": len(links),
        "total_size_bytes": sum(b.size_on_disk for b in links),
        "restore_points": len(backups),
    }


# ------------------------------------------------- delete, consolidate, verify


def delete_backup(st: HubState, who: Principal, backup_id: str, *, cascade: bool) -> dict[str, Any]:
    """Delete a restore point (engine/delete.py: check, mark, files, rows)."""
    with st.db.session() as s:
        visible_backup(s, who, backup_id)
    return delete.delete_backup(st.db, backup_id, cascade=cascade)


def _started(st: HubState, job_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        job = JobStore(s).get(job_id)
        assert job is not None
        view = job_view(job)
        return {"job_id": job_id, "status": view["status"], "job": view, "backups": []}


def consolidate(st: HubState, who: Principal, body: Any, *, dry_run: bool) -> dict[str, Any]:
    """Plan a consolidation and start it as a job (or only answer the plan)."""
    with st.db.session() as s:
        if body.chain_id is not None:
            vm_id = visible_backup(s, who, body.chain_id).vm_id
        else:
            vm_id = visible_vm(s, who, body.vm_name).id
    with st.db.session() as s:
        delete.lock_vm(s, vm_id)
        vm = VmStore(s).get(vm_id)
        member = BackupStore(s).get(body.chain_id) if body.chain_id else None
        if vm is None or (body.chain_id and member is None):
            raise NotFound("the VM or backup went away", vm_name=body.vm_name)
        plan = consolidation.plan_consolidation(
            s,
            vm,
            body.keep,
            disk_index=body.disk_id,
            member=member,
            repository_visible=None if who.scope is None else who.can_see_repository,
        )
        if dry_run:
            return {"dry_run": True, **plan}
        consolidation.mark_merging(s, plan)
        job = st.lifecycle.new_local_job(
            s,
            consolidation.KIND,
            plan,
            vm_id=vm.id,
            repository_id=plan["disks"][0]["repository_id"] if plan["disks"] else None,
            created_by=who.name,
            holds=plan["backup_ids"],
        )
        job_id = job.id
    st.lifecycle.launch(job_id)
    return _started(st, job_id)


def verify_backup(st: HubState, who: Principal, backup_id: str) -> dict[str, Any]:
    """Start a verify job of a restore point (engine/verify.py)."""
    with st.db.session() as s:
        vm_id = visible_backup(s, who, backup_id).vm_id
    with st.db.session() as s:
        delete.lock_vm(s, vm_id)  # not while a delete or merge of the chain is being planned
        b = BackupStore(s).get(backup_id)
        if b is None:
            raise NotFound(f"backup {backup_id} not found", backup_id=backup_id)
        params = verification.plan_verify(s, b)
        job = st.lifecycle.new_local_job(
            s,
            verification.KIND,
            params,
            vm_id=b.vm_id,
            repository_id=b.repository_id,
            created_by=who.name,
            holds=params["backup_ids"],
        )
        job_id = job.id
    st.lifecycle.launch(job_id)
    return _started(st, job_id)
