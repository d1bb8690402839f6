"""Queries of the policies tables: policies, their runs and per-VM queue.

Selectors are matched by `sendense.scheduler.selector.selector_matches`,
the one rule the API and the scheduler share.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Row, delete, func, select
from sqlalchemy.orm import Session

from sendense.catalog.models import (
    Backup,
    BackupJob,
    Policy,
    PolicyRun,
    PolicyRunVm,
    Vm,
    Webhook,
    WebhookDelivery,
)
from sendense.scheduler.selector import selector_matches


class PolicyStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, policy_id: str) -> Policy | None:
        return self.s.get(Policy, policy_id)

    def by_name(self, name: str) -> Policy | None:
        return self.s.scalar(select(Policy).where(Policy.name == name))

    def page(
        self, *, repository_ids: Iterable[str] | None, limit: int, offset: int
    ) -> tuple[Sequence[Policy], int]:
        """Policies by name (only in ``repository_ids`` unless None), and how many in all."""
        q = select(Policy)
        count = select(func.count()).select_from(Policy)
        if repository_ids is not None:
            ids = sorted(repository_ids)
            q = q.where(Policy.repository_id.in_(ids))
            count = count.where(Policy.repository_id.in_(ids))
        rows = self.s.scalars(q.order_by(Policy.name, Policy.id).limit(limit).offset(offset)).all()
        return rows, int(self.s.scalar(count) or 0)

    def vm_rows(self) -> Sequence[Row[Any]]:
        """(id, name, tags) of every VM, by name: what selectors are matched against."""
        return self.s.execute(select(Vm.id, Vm.name, Vm.tags).order_by(Vm.name)).all()

    def matched_vms(self, selector: Mapping[str, Any] | None) -> list[Row[Any]]:
        """(id, name, tags) of the VMs the selector matches now, by name."""
        return [r for r in self.vm_rows() if selector_matches(selector, r.name, r.tags or {})]

    def last_run_vms(self, policy_id: str) -> list[Row[Any]]:
        """Per VM, the newest queue entry of the policy with its run and job.

        Columns: ``entry`` (PolicyRunVm), ``run`` (PolicyRun), ``vm_name``,
        ``job_status``, ``job_error_code``, ``job_error_message``,
        ``job_finished_at``, ``job_result``.
        """
        newest = (
            select(
                PolicyRunVm.vm_id,
                func.max(PolicyRunVm.created_at).label("created_at"),
            )
            .where(PolicyRunVm.policy_id == policy_id)
            .group_by(PolicyRunVm.vm_id)
            .subquery()
        )
        q = (
            select(
                PolicyRunVm,
                PolicyRun,
                Vm.name.label("vm_name"),
                Vm.tags.label("vm_tags"),
                BackupJob.status.label("job_status"),
                BackupJob.error_code.label("job_error_code"),
                BackupJob.error_message.label("job_error_message"),
                BackupJob.finished_at.label("job_finished_at"),
            )
            .join(
                newest,
                (newest.c.vm_id == PolicyRunVm.vm_id)
                & (newest.c.created_at == PolicyRunVm.created_at),
            )
            .join(PolicyRun, PolicyRun.id == PolicyRunVm.run_id)
            .join(Vm, Vm.id == PolicyRunVm.vm_id)
            .outerjoin(BackupJob, BackupJob.id == PolicyRunVm.job_id)
            .where(PolicyRunVm.policy_id == policy_id)
            .order_by(Vm.name, PolicyRunVm.id)
        )
        out: list[Row[Any]] = []
        seen: set[str] = set()
        for row in self.s.execute(q).all():
            # Two entries of one VM with the same created_at: the first wins.
            if row.PolicyRunVm.vm_id not in seen:
                seen.add(row.PolicyRunVm.vm_id)
                out.append(row)
        return out

    def backups_of_jobs(self, job_ids: Iterable[str]) -> dict[str, list[str]]:
        """Per job, the ids of the restore points it made (by disk)."""
        ids = sorted(set(job_ids))
        out: dict[str, list[str]] = {}
        if not ids:
            return out
        rows = self.s.execute(
            select(Backup.job_id, Backup.id)
            .where(Backup.job_id.in_(ids))
            .order_by(Backup.job_id, Backup.disk_index)
        ).all()
        for job_id, backup_id in rows:
            out.setdefault(job_id, []).append(backup_id)
        return out

    def remove(self, policy: Policy) -> dict[str, int]:
        """Delete a policy with its runs, its queue, its webhooks and their
        outbox. Jobs it started are not touched (they reference no policy).
        Answers how many rows of each went."""
        queued = self.s.scalar(
            select(func.count())
            .select_from(PolicyRunVm)
            .where(PolicyRunVm.policy_id == policy.id, PolicyRunVm.status == "queued")
        )
        hooks = select(Webhook.id).where(Webhook.policy_id == policy.id)
        counts = {
            "queued": int(queued or 0),
            "run_vms": self._delete(delete(PolicyRunVm).where(PolicyRunVm.policy_id == policy.id)),
            "runs": self._delete(delete(PolicyRun).where(PolicyRun.policy_id == policy.id)),
        }
        self._delete(delete(WebhookDelivery).where(WebhookDelivery.webhook_id.in_(hooks)))
        counts["webhooks"] = self._delete(delete(Webhook).where(Webhook.policy_id == policy.id))
        self.s.delete(policy)
        self.s.flush()
        return counts

    def _delete(self, statement: Any) -> int:
        return int(getattr(self.s.execute(statement), "rowcount", 0) or 0)
