"""How catalog rows are shown by the API (the ``XRead`` shapes)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from sendense.catalog.models import Backup, BackupJob, Node, Repository, Source, Vm


def _t(value: datetime | None) -> str | None:
    """ISO 8601 in UTC as pydantic writes it (``...Z``): answers that skip the
    response model (web/responses.py) look like those that do not."""
    return value.isoformat().replace("+00:00", "Z") if value else None


def node_view(node: Node, health: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "node_id": node.id,
        "name": node.name,
        "url": node.url,
        "created_at": _t(node.created_at),
    }
    if health is not None:
        out["health"] = health
    return out


def source_view(source: Source) -> dict[str, Any]:
    return {
        "source_id": source.id,
        "name": source.name,
        "node_id": source.node_id,
        "type": source.type,
        # Secret fields are stored apart, encrypted, and never shown.
        "config": source.config,
        "has_credentials": bool(source.secret_encrypted),
        "created_at": _t(source.created_at),
    }


def vm_view(
    vm: Vm | Row[Any],
    last_backup: Backup | Row[Any] | None = None,
    disks: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """A VM with its disks (``vm.disks`` of an ORM object unless given) and
    its last completed backup."""
    if disks is None:
        assert isinstance(vm, Vm), "a Core row comes with its disks"
        disks = vm.disks
    return {
        "vm_id": vm.id,
        "vm_context_id": vm.id,
        "name": vm.name,
        "source_id": vm.source_id,
        "path": vm.path,
        "tags": vm.tags or {},
        "discovered_at": _t(vm.discovered_at),
        "disks": [
            {
                "disk_id": d.disk_index,
                "disk_key": d.disk_key,
                "label": d.label,
                "capacity_bytes": d.capacity_bytes,
                "size_gb": d.size_gb,
                "path": d.path,
            }
            for d in disks
        ],
        "last_backup": backup_view(last_backup) if last_backup else None,
    }


def repository_view(repo: Repository, capacity: dict[str, Any]) -> dict[str, Any]:
    return {
        "repository_id": repo.id,
        "name": repo.name,
        "type": repo.type,
        "path": repo.path,
        "immutable": repo.immutable,
        "retention_days": repo.retention_days,
        "config": repo.config or {},
        "created_at": _t(repo.created_at),
        **capacity,
    }


def backup_view(b: Backup | Row[Any]) -> dict[str, Any]:
    """A restore point, from its ORM object or a Core row of `BackupStore`."""
    return {
        "backup_id": b.id,
        "job_id": b.job_id,
        "vm_name": b.vm_name,
        "vm_context_id": b.vm_id,
        "disk_id": b.disk_index,
        "disk_key": b.disk_key,
        "repository_id": b.repository_id,
        "backup_type": b.backup_type,
        "status": b.status,
        "parent_backup_id": b.parent_id,
        "file_path": b.file_path,
        "nbd_export_name": b.nbd_export_name,
        "total_bytes": b.total_bytes,
        "bytes_transferred": b.bytes_transferred,
        "size_on_disk": b.size_on_disk,
        "change_id": b.change_id,
        "previous_change_id": b.previous_change_id,
        "digest": b.digest,
        "error": b.error,
        "tags": b.tags,
        "synthetic": b.synthetic,
        "verify_status": b.verify_status,
        "verified_at": _t(b.verified_at),
        "verify_error": b.verify_error,
        "created_at": _t(b.created_at),
        "started_at": _t(b.started_at),
        "finished_at": _t(b.finished_at),
        "immutable_until": _t(b.immutable_until),
    }


def job_view(job: BackupJob | Row[Any], backups: Sequence[Any] | None = None) -> dict[str, Any]:
    """A job as the API shows it: its disks' progress for a backup, one
    progress for a job the hub runs itself (consolidate, verify, rescan).

    ``job`` is an ORM object or a Core row of `JobStore`; ``backups`` its
    restore points (``id``, ``disk_index``, ``disk_key``, ``backup_type``,
    ``status``), by default ``job.backups`` of the ORM object."""
    progress = job.progress or {}
    if backups is None:
        assert isinstance(job, BackupJob), "a Core row comes with its backups"
        backups = job.backups
    if job.kind != "backup":
        p = progress.get("job") or {}
        done, total = int(p.get("bytes_done") or 0), int(p.get("bytes_total") or 0)
        backups = list((job.params or {}).get("backup_ids") or [])
        return _job_fields(job, backups, [], done, total, None, None)
    disks = []
    done_total = 0
    bytes_total = 0
    rate_total = 0
    for b in backups:
        p = progress.get(str(b.disk_key), {})
        done = int(p.get("bytes_done") or 0)
        total = int(p.get("bytes_total") or 0)
        if b.status == "completed":
            done = total = max(total, int(p.get("data_bytes") or done))
        done_total += done
        bytes_total += total
        rate_total += int(p.get("rate") or 0)
        disks.append(
            {
                "disk_id": b.disk_index,
                "disk_key": b.disk_key,
                "backup_id": b.id,
                "backup_type": b.backup_type,
                "status": b.status,
                "mode": p.get("mode"),
                "bytes_done": done,
                "bytes_total": total,
                "percent": _percent(done, total, b.status),
                "rate": p.get("rate"),
                "eta": p.get("eta"),
                "fallback_reason": p.get("fallback_reason"),
                # Its mover reconnecting (issue 11), while the job runs.
                "retry": p.get("retry") if job.status == "running" else None,
            }
        )
    running = job.status == "running"
    eta = None
    if running and rate_total > 0:
        eta = round((bytes_total - done_total) / rate_total, 1)
    rate = rate_total if running else None
    fields = _job_fields(job, [b.id for b in backups], disks, done_total, bytes_total, rate, eta)
    if running:
        fields["retry"] = progress.get("retry")
    return fields


def _job_fields(
    job: BackupJob | Row[Any],
    backups: list[str],
    disks: list[dict[str, Any]],
    done: int,
    total: int,
    rate: int | None,
    eta: float | None,
) -> dict[str, Any]:
    elapsed = None
    if job.started_at and job.finished_at:
        elapsed = round((job.finished_at - job.started_at).total_seconds(), 3)
    return {
        "job_id": job.id,
        "kind": job.kind,
        "status": job.status,
        "step": job.step,
        "vm_name": job.vm_name,
        "vm_context_id": job.vm_id,
        "repository_id": job.repository_id,
        "node_id": job.node_id,
        "backup_type": job.requested_type,
        "backups": backups,
        "disks": disks,
        "bytes_done": done,
        "bytes_total": total,
        "percent": _percent(done, total, job.status),
        "rate": rate,
        "eta": eta,
        "messages": (job.messages or {}).get("node", []) + (job.messages or {}).get("hub", []),
        "error": {"code": job.error_code, "message": job.error_message}
        if job.error_message
        else None,
        "params": job.params or {},
        "result": job.result or {},
        "created_by": job.created_by,
        "created_at": _t(job.created_at),
        "started_at": _t(job.started_at),
        "finished_at": _t(job.finished_at),
        "elapsed_seconds": elapsed,
        "tags": job.tags,
        "retry": None,
    }


def _percent(done: int, total: int, status: str) -> float:
    if status == "completed":
        return 100.0
    if total <= 0:
        return 0.0
    return round(100.0 * done / total, 1)
