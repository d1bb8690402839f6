"""Restores and exports: rules (plans in restore/disk.py, jobs in restore/)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sendense.catalog.models import BackupHold, BackupJob
from sendense.catalog.stores import BackupStore, JobStore
from sendense.core.access import Principal
from sendense.core.errors import ExportExists, InvalidRequest, NotFound, Unavailable
from sendense.engine import delete
from sendense.engine.lifecycle import ACTIVE
from sendense.hub.backups.service import visible_backup
from sendense.hub.jobs.service import visible_job
from sendense.hub.state import HubState
from sendense.hub.views import job_view
from sendense.nbd import psk
from sendense.restore import disk, export, sessions
from sendense.restore.fs.client import FsPool
from sendense.restore.fs.paths import shown

END_WAIT = 15.0


def start_restore(st: HubState, who: Principal, body: Any) -> dict[str, Any]:
    """Plan a whole-disk restore (every refusal before anything is written)
    and start it as a job."""
    with st.db.session() as s:
        vm_id = visible_backup(s, who, body.backup_id).vm_id
        delete.lock_vm(s, vm_id)  # not while a delete or merge of the chain is planned
        b = BackupStore(s).get(body.backup_id)
        if b is None:
            raise NotFound(f"backup {body.backup_id} not found", backup_id=body.backup_id)
        params = disk.plan_restore(
            s, b, body.destination.model_dump(), st.settings.restore_directories
        )
        job = st.lifecycle.new_local_job(
            s,
            disk.KIND,
            params,
            vm_id=b.vm_id,
            repository_id=b.repository_id,
            created_by=who.name,
            holds=params["backup_ids"],
        )
        job_id = job.id
    st.lifecycle.launch(job_id)
    with st.db.session() as s:
        started = JobStore(s).get(job_id)
        assert started is not None
        view = job_view(started)
    return {"job_id": job_id, "status": view["status"], "job": view, "backups": []}


# ----------------------------------------------------------------- exports


def export_view(job: BackupJob) -> dict[str, Any]:
    params, result = job.params or {}, job.result or {}
    if job.status in ("pending", "running"):
        status = "serving" if job.step == "serving" else "starting"
    else:
        status = "closed" if job.status in ("completed", "cancelled") else "failed"
    return {
        "export_id": job.id,
        "job_id": job.id,
        "backup_id": params.get("backup_id"),
        "vm_name": job.vm_name,
        "writable": bool(params.get("writable")),
        "url": result.get("url") if status == "serving" else None,
        # TLS-PSK beyond loopback (restore/export.py); the key itself only in
        # the answer to the POST (start_export).
        "tls": bool(params.get("tls")),
        "tls_username": psk.USERNAME if params.get("tls") else None,
        "tls_psk": None,
        "status": status,
        "error": job.error_message,
        "created_by": job.created_by,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
    }


def live_export(s: Session, backup_id: str) -> BackupJob | None:
    """The export of this restore point that is starting or serving, if any."""
    jobs = s.scalars(
        select(BackupJob)
        .join(BackupHold, BackupHold.holder_id == BackupJob.id)
        .where(
            BackupHold.backup_id == backup_id,
            BackupJob.kind == export.KIND,
            BackupJob.status.in_(ACTIVE),
        )
    ).all()
    return next((j for j in jobs if (j.params or {}).get("backup_id") == backup_id), None)


def start_export(st: HubState, who: Principal, backup_id: str, writable: bool) -> dict[str, Any]:
    with st.db.session() as s:
        b = visible_backup(s, who, backup_id)
        delete.lock_vm(s, b.vm_id)  # one export per restore point, even racing
        found = live_export(s, backup_id)
        if found is not None:
            raise ExportExists(
                f"backup {backup_id} is already exported (export {found.id}); "
                "DELETE it first or use it",
                backup_id=backup_id,
                export_id=found.id,
            )
        members = disk.chain_of(s, b)
        holds = [m.id for m in members]
        params: dict[str, Any] = {
            "backup_id": b.id,
            "backup_ids": holds,
            "source": b.file_path,
            "writable": writable,
            "export_name": f"backup-{b.id}",
            "tls": export.needs_tls(st.settings),
        }
        job = st.lifecycle.new_local_job(
            s,
            export.KIND,
            params,
            vm_id=b.vm_id,
            repository_id=b.repository_id,
            created_by=who.name,
            holds=holds,
        )
        job_id = job.id
    kind = st.lifecycle.kinds[export.KIND]
    assert isinstance(kind, export.ExportJob)
    ready = kind.ready_event(job_id)
    st.lifecycle.launch(job_id)
    ready.wait(export.READY_TIMEOUT)
    key = kind.take_key(job_id)
    with st.db.session() as s:
        started = JobStore(s).get(job_id)
        assert started is not None
        view = export_view(started)
    view["tls_psk"] = key  # shown once: the hub keeps no copy it could show again
    return view


def get_export(st: HubState, who: Principal, backup_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        visible_backup(s, who, backup_id)
        found = live_export(s, backup_id)
        if found is None:
            raise NotFound(f"backup {backup_id} is not exported", backup_id=backup_id)
        return export_view(found)


def list_exports(st: HubState, who: Principal) -> list[dict[str, Any]]:
    with st.db.session() as s:
        jobs = s.scalars(
            select(BackupJob)
            .where(BackupJob.kind == export.KIND, BackupJob.status.in_(ACTIVE))
            .order_by(BackupJob.created_at.desc(), BackupJob.id.desc())
        ).all()
        out = []
        for j in jobs:
            try:
                visible_job(s, who, j.id)
            except NotFound:
                continue
            out.append(export_view(j))
        return out


def close_export(st: HubState, who: Principal, backup_id: str) -> dict[str, Any]:
    """Stop serving (asked through the catalog: the owner may be another hub
    process) and wait for the export to be gone."""
    with st.db.session() as s:
        visible_backup(s, who, backup_id)
        found = live_export(s, backup_id)
        if found is None:
            raise NotFound(f"backup {backup_id} is not exported", backup_id=backup_id)
        job_id = found.id
    st.lifecycle.request_cancel(job_id)
    deadline = time.monotonic() + END_WAIT
    while True:
        with st.db.session() as s:
            job = JobStore(s).get(job_id)
            assert job is not None
            if job.status not in ACTIVE or time.monotonic() > deadline:
                return export_view(job)
        time.sleep(0.1)


# ------------------------------------------------------- restore sessions


def mount_view(job: BackupJob) -> dict[str, Any]:
    params, result = job.params or {}, job.result or {}
    if job.status in ("pending", "running"):
        status = "open" if job.step == "open" else "opening"
    else:
        status = "closed" if job.status in ("completed", "cancelled") else "failed"
    seen = sessions.last_access(job)
    return {
        "mount_id": job.id,
        "job_id": job.id,
        "backup_id": params.get("backup_id"),
        "vm_name": job.vm_name,
        "disk_id": params.get("disk_id"),
        "status": status,
        "partitions": [
            {
                "index": p["index"],
                "filesystem": p["filesystem"],
                # a label is guest data: shown escaped if it cannot be UTF-8
                "label": None if p["label"] is None else shown(p["label"]),
                "size": p["size"],
                "offset": p["offset"],
                "table": p["table"],
                "type": shown(p["type"]),
                "warnings": [shown(w) for w in p["warnings"]],
            }
            for p in result.get("partitions") or []
        ],
        "closed": result.get("closed"),
        "error": job.error_message,
        "created_by": job.created_by,
        "created_at": job.created_at,
        "last_access": seen,
        "expires_at": seen + timedelta(seconds=_idle(job)) if seen and status == "open" else None,
    }


def _idle(job: BackupJob) -> float:
    return float((job.params or {}).get("idle_timeout") or 3600)


def open_mount(st: HubState, who: Principal, backup_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        vm_id = visible_backup(s, who, backup_id).vm_id
        delete.lock_vm(s, vm_id)
        b = BackupStore(s).get(backup_id)
        if b is None:
            raise NotFound(f"backup {backup_id} not found", backup_id=backup_id)
        members = disk.chain_of(s, b)
        holds = [m.id for m in members]
        params: dict[str, Any] = {
            "backup_id": b.id,
            "backup_ids": holds,
            "source": b.file_path,
            "disk_id": b.disk_index,
            "idle_timeout": st.settings.restore_idle_timeout,
        }
        job = st.lifecycle.new_local_job(
            s,
            sessions.KIND,
            params,
            vm_id=b.vm_id,
            repository_id=b.repository_id,
            created_by=who.name,
            holds=holds,
        )
        job_id = job.id
    kind = st.lifecycle.kinds[sessions.KIND]
    assert isinstance(kind, sessions.MountJob)
    ready = kind.ready_event(job_id)
    st.lifecycle.launch(job_id)
    ready.wait(sessions.READY_TIMEOUT)
    deadline = time.monotonic() + 10  # a job that failed to open writes its end just after
    while True:
        with st.db.session() as s:
            started = JobStore(s).get(job_id)
            assert started is not None
            view = mount_view(started)
        if view["status"] != "opening" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if view["status"] == "failed":
        raise Unavailable(f"the restore session could not open: {view['error']}", mount_id=job_id)
    return view


def _sees_mount(who: Principal, job: BackupJob) -> bool:
    """A scoped principal sees a session only when it sees both its VM and
    its repository; a session whose VM row is gone is nobody's tenant's."""
    if who.scope is None:
        return True
    vm = job.vm
    return (
        vm is not None
        and who.can_see_vm(vm.name, vm.tags)
        and who.can_see_repository(job.repository_id)
    )


def _mount(s: Session, who: Principal, mount_id: str) -> BackupJob:
    """The session, or NotFound, word for word the same for an id that does
    not exist and for another tenant's session."""
    job = JobStore(s).get(mount_id)
    if job is None or job.kind != sessions.KIND or not _sees_mount(who, job):
        raise NotFound(f"restore session {mount_id} not found", mount_id=mount_id)
    return job


def get_mount(st: HubState, who: Principal, mount_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        return mount_view(_mount(s, who, mount_id))


def list_mounts(st: HubState, who: Principal, *, include_closed: bool) -> list[dict[str, Any]]:
    with st.db.session() as s:
        q = select(BackupJob).where(BackupJob.kind == sessions.KIND)
        if not include_closed:
            q = q.where(BackupJob.status.in_(ACTIVE))
        out = []
        for j in s.scalars(q.order_by(BackupJob.created_at.desc(), BackupJob.id.desc())).all():
            if _sees_mount(who, j):
                out.append(mount_view(j))
        return out


def close_mount(st: HubState, who: Principal, mount_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        found = _mount(s, who, mount_id)
        if found.status not in ACTIVE:
            return mount_view(found)
    st.lifecycle.request_cancel(mount_id)
    deadline = time.monotonic() + END_WAIT
    while True:
        with st.db.session() as s:
            job = JobStore(s).get(mount_id)
            assert job is not None
            if job.status not in ACTIVE or time.monotonic() > deadline:
                st.restore_pools.close(mount_id)
                return mount_view(job)
        time.sleep(0.1)


def session_fs(
    st: HubState, who: Principal, mount_id: str, partition: int | None
) -> tuple[FsPool, int]:
    """The filesystem workers of an open session in this process, and the
    partition a request reads (``partition`` given, or the only filesystem)."""
    with st.db.session() as s:
        job = _mount(s, who, mount_id)
        view = mount_view(job)
        url = (job.result or {}).get("url")
    if view["status"] != "open" or not url:
        raise NotFound(f"restore session {mount_id} is {view['status']}", mount_id=mount_id)
    readable = [p["index"] for p in view["partitions"] if p["filesystem"]]
    if partition is None:
        if len(readable) != 1:
            raise InvalidRequest(
                f"partition is required: this disk has filesystems on partitions {readable}",
                field="partition",
                partitions=readable,
            )
        partition = readable[0]
    keep_alive(st, mount_id)
    return st.restore_pools.pool(mount_id, url), partition


def keep_alive(st: HubState, mount_id: str) -> None:
    """Record an access to the session (it is not idle)."""
    st.restore_pools.touch(mount_id, every=sessions.touch_every(st.settings.restore_idle_timeout))


def streaming(st: HubState, mount_id: str, pieces: Iterator[bytes]) -> Iterator[bytes]:
    """``pieces``, recording an access as they go: a download or archive
    longer than the idle timeout keeps its session open."""
    for piece in pieces:
        keep_alive(st, mount_id)
        yield piece
