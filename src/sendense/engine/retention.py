"""Retention of a VM's restore points: plan from the catalog, execute as a job.

Plan (`plan_for_vm`, no files touched, a dry run): per disk, the VM's
completed restore points in the policy's repository, each with its parent,
lock and holds, go through the pure planner (`policy.retention`), which
decides keep / remove (``delete`` | ``consolidate``) / locked.

Execute (the ``retention`` job kind, `RetentionJob`): the plan is the job's
params; its steps run in order, each through the engine code that exists
for it, which checks everything again at that moment (the catalog may have
changed since the plan):

- ``delete`` of a leaf: `engine.delete.delete_backup` (check, mark, files,
  rows; refuses ``in_use``, ``has_dependents``, ``immutable``);
- ``consolidate`` of the oldest run of a chain into the next point:
  `engine.consolidate.plan_disk` on the chain as it is now (refused unless
  the chain still starts with exactly the planned run), ``mark_merging``,
  then `ConsolidateJob.execute` for that one chain, under this job's id.

Every step's outcome is recorded per restore point in the job's result
(``points``: done / failed with the error's code and message / not
attempted). A failed step does not stop the others (they are other chains,
or the engine refuses them by itself), and is never skipped silently: the
job ends ``failed`` (``retention_incomplete``) with the per-point results
when any point that should have gone is still there. The job writes its own
final status with its result (``JobLifecycle.transition``): the lifecycle's
own transition afterwards finds the job ended and changes nothing.

Crash recovery: deletes are finished by ``recover_deletes`` at hub start;
a merge in flight is named in the job's result (``current_merge``, written in
the transaction that marks its points ``merging``) and handed to
`ConsolidateJob.recover`, which rolls it forward if it started and back if
not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sendense.catalog.models import Backup, BackupHold, BackupJob, Vm
from sendense.core.errors import Cancelled, Conflict, Error, NotFound
from sendense.engine import consolidate, delete
from sendense.engine.consolidate import ConsolidateJob
from sendense.engine.lifecycle import JobContext
from sendense.policy.retention import (
    RestorePoint,
    RetentionPlan,
    RetentionRules,
    plan_retention,
    zone,
)

if TYPE_CHECKING:
    from sendense.hub.state import HubState

log = logging.getLogger(__name__)

KIND = "retention"


# ------------------------------------------------------------------- plan


def points_of_vm(
    s: Session, vm_id: str, repository_id: str | None = None
) -> dict[int, list[RestorePoint]]:
    """The VM's completed restore points per disk, with locks and holds."""
    q = select(
        Backup.id,
        Backup.disk_index,
        Backup.created_at,
        Backup.parent_id,
        Backup.immutable_until,
    ).where(Backup.vm_id == vm_id, Backup.status == "completed")
    if repository_id is not None:
        q = q.where(Backup.repository_id == repository_id)
    rows = s.execute(q).all()
    holds: dict[str, list[str]] = {}
    ids = [r.id for r in rows]
    for i in range(0, len(ids), 500):
        for backup_id, holder_type, holder_id in s.execute(
            select(BackupHold.backup_id, BackupHold.holder_type, BackupHold.holder_id).where(
                BackupHold.backup_id.in_(ids[i : i + 500])
            )
        ):
            holds.setdefault(backup_id, []).append(f"{holder_type} {holder_id}")
    per_disk: dict[int, list[RestorePoint]] = {}
    for r in rows:
        per_disk.setdefault(r.disk_index, []).append(
            RestorePoint(
                r.id,
                r.created_at,
                r.parent_id,
                immutable_until=r.immutable_until,
                holds=tuple(holds.get(r.id, ())),
            )
        )
    return per_disk


def plan_for_vm(
    s: Session,
    vm_id: str,
    rules: RetentionRules | dict[str, Any],
    now: datetime | None = None,
    timezone: str | None = None,
    *,
    repository_id: str | None = None,
) -> dict[str, Any]:
    """What retention keeps and removes of a VM's restore points (a dry run).

    ``rules``: a policy's ``retention`` object (or `RetentionRules`);
    ``timezone``: the policy's (buckets are local days, weeks, ...);
    ``repository_id``: only the restore points in that repository (a
    policy's), None for all. Answers
    ``{"vm_name", "vm_id", "repository_id", "rules", "timezone", "planned_at",
    "disks": [{"disk_id", "keep", "remove", "locked"}]}``; raises `NotFound`
    for an unknown VM and `InvalidRequest` for bad rules or time zone.
    """
    if not isinstance(rules, RetentionRules):
        rules = RetentionRules.from_dict(rules)
    tz = zone(timezone)
    now = now or datetime.now(UTC)
    vm = s.get(Vm, vm_id)
    if vm is None:
        raise NotFound(f"VM {vm_id} not found", vm_id=vm_id)
    disks = [
        plan_retention(points, rules, now, tz, disk_id=disk).to_dict()
        for disk, points in sorted(points_of_vm(s, vm_id, repository_id).items())
    ]
    return {
        "vm_name": vm.name,
        "vm_id": vm.id,
        "repository_id": repository_id,
        "rules": {k: v for k, v in vars(rules).items() if v},
        "timezone": tz.key,
        "planned_at": now.isoformat(),
        "disks": disks,
    }


def plan_for_vms(
    s: Session,
    vm_ids: Sequence[str],
    rules: RetentionRules | dict[str, Any],
    now: datetime | None = None,
    timezone: str | None = None,
    *,
    repository_id: str | None = None,
) -> dict[str, Any]:
    """`plan_for_vm` for each VM a policy matches: ``{"vms": [plan, ...]}``
    (the answer of ``POST /api/v1/policies/{id}/retention/plan``)."""
    if not isinstance(rules, RetentionRules):
        rules = RetentionRules.from_dict(rules)
    now = now or datetime.now(UTC)
    return {
        "vms": [
            plan_for_vm(s, vm_id, rules, now, timezone, repository_id=repository_id)
            for vm_id in vm_ids
        ]
    }


def steps_of(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The execution order of a VM's plan: per disk, deletes newest first,
    then one merge per chain."""
    out = []
    for d in plan.get("disks") or []:
        for step in RetentionPlan.from_dict(d).steps():
            out.append(
                {
                    "disk_id": d.get("disk_id"),
                    "action": step.action,
                    "backup_ids": list(step.backup_ids),
                    "into": step.into,
                }
            )
    return out


def new_retention_job(
    st: HubState,
    s: Session,
    plan: dict[str, Any],
    *,
    created_by: str,
    tags: dict[str, Any] | None = None,
) -> BackupJob:
    """Insert the ``retention`` job of ``plan`` in the caller's transaction
    (start it with ``st.lifecycle.launch(job.id)`` after the commit).

    No holds: the deletes and merges it runs refuse held restore points,
    its own included.
    """
    return st.lifecycle.new_local_job(
        s,
        KIND,
        {**plan, "steps": steps_of(plan), "backup_ids": list(removed_ids(plan))},
        vm_id=plan["vm_id"],
        repository_id=plan.get("repository_id"),
        created_by=created_by,
        tags=tags,
    )


def apply_for_vm(
    st: HubState,
    vm_id: str,
    rules: RetentionRules | dict[str, Any],
    timezone: str | None = None,
    *,
    repository_id: str | None = None,
    created_by: str = "scheduler",
    now: datetime | None = None,
    always: bool = False,
) -> str | None:
    """Plan and start retention of one VM as a job; its id, or None when the
    plan removes nothing (unless ``always``: a job that records "nothing to
    do"). The plan is made with the VM's row locked (no delete, merge or
    backup start of the VM interleaves with the reads)."""
    with st.db.session() as s:
        delete.lock_vm(s, vm_id)
        plan = plan_for_vm(s, vm_id, rules, now, timezone, repository_id=repository_id)
        if not always and not removed_ids(plan):
            return None
        job_id = new_retention_job(st, s, plan, created_by=created_by).id
    st.lifecycle.launch(job_id)
    return job_id


# -------------------------------------------------------------------- job


class RetentionJob:
    """The ``retention`` job kind (a `LocalJob`): params are a VM's plan plus
    its ``steps``."""

    kind = KIND

    def __init__(self, st: HubState) -> None:
        self.db = st.db
        self.lifecycle = st.lifecycle
        self.merger = ConsolidateJob(st)

    def execute(self, job_id: str, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        t0 = time.monotonic()
        steps = params.get("steps")
        if steps is None:
            steps = steps_of(params)
        vm_id = params["vm_id"]
        points: list[list[dict[str, Any]]] = []
        freed = 0
        status, error = "completed", None
        for i, step in enumerate(steps):
            try:
                ctx.check_cancel()
            except Cancelled as e:
                status, error = "cancelled", e
                points.extend(_outcomes(rest, "not_attempted", "cancelled") for rest in steps[i:])
                break
            ctx.progress(
                f"step {i + 1}/{len(steps)}: {step['action']} "
                f"{len(step['backup_ids'])} point(s) of disk {step['disk_id']}",
                force=True,
            )
            try:
                if step["action"] == "delete":
                    freed += self._delete(step)
                else:
                    freed += self._merge(job_id, vm_id, step, ctx)
                points.append(_outcomes(step, "done"))
            except Cancelled as e:  # the merge stopped before it started
                status, error = "cancelled", e
                points.append(_outcomes(step, "not_attempted", "cancelled"))
                points.extend(
                    _outcomes(rest, "not_attempted", "cancelled") for rest in steps[i + 1 :]
                )
                break
            except Error as e:
                log.warning(
                    "job=%s step=%s backups=%s failed: %s",
                    job_id,
                    step["action"],
                    step["backup_ids"],
                    e.message,
                )
                points.append(_outcomes(step, "failed", e.code, e.message))
        flat = [p for group in points for p in group]
        failed = [p for p in flat if p["status"] == "failed"]
        result = {
            "vm_name": params.get("vm_name"),
            "points": flat,
            "removed": sum(1 for p in flat if p["status"] == "done"),
            "failed": len(failed),
            "freed_bytes": freed,
            "seconds": round(time.monotonic() - t0, 3),
        }
        if error is not None:
            self.lifecycle.transition(
                job_id, status, result=result, error_code=error.code, error_message=error.message
            )
        elif failed:
            # Written with the result in one update (see the module docstring).
            listed = "; ".join(
                f"{p['backup_id']} ({p['action']}: {p['error']}: {p['message']})"
                for p in failed[:5]
            )
            self.lifecycle.transition(
                job_id,
                "failed",
                result=result,
                error_code="retention_incomplete",
                error_message=f"{len(failed)} of {len(flat)} restore point(s) could not "
                f"be removed: {listed}"[:2000],
            )
        return result

    def recover(self, job_id: str, params: dict[str, Any]) -> None:
        """A merge in flight is rolled forward (started) or back (not)."""
        with self.db.session() as s:
            result = s.scalar(select(BackupJob.result).where(BackupJob.id == job_id)) or {}
        current = result.get("current_merge")
        if not current:
            return
        # Only a merge whose points are still marked: one that failed (not
        # crashed) was already settled by the merge itself.
        ids = [r["backup_id"] for r in current["remove"]]
        with self.db.session() as s:
            marked = s.scalar(
                select(Backup.id).where(Backup.id.in_(ids), Backup.status == "merging").limit(1)
            )
        if marked is not None:
            self.merger.recover(job_id, {"disks": [current]})

    def on_end(self, job_id: str, params: dict[str, Any], status: str) -> None:
        pass

    # ---------------------------------------------------------------- steps

    def _delete(self, step: dict[str, Any]) -> int:
        (backup_id,) = step["backup_ids"]
        try:
            return int(delete.delete_backup(self.db, backup_id)["freed_bytes"])
        except NotFound:
            # Gone since the plan (another delete, a merge): what the plan wanted.
            log.info("backup=%s already gone", backup_id)
            return 0

    def _merge(self, job_id: str, vm_id: str, step: dict[str, Any], ctx: JobContext) -> int:
        run, into = list(step["backup_ids"]), step["into"]
        with self.db.session() as s:
            delete.lock_vm(s, vm_id)
            new_base = s.get(Backup, into)
            if new_base is None or new_base.status != "completed":
                raise Conflict(
                    f"restore point {into} that the run merges into is gone or "
                    f"{getattr(new_base, 'status', 'missing')}; plan again",
                    backup_id=into,
                )
            links = consolidate.chain_of(s, new_base)
            cut = next(i for i, b in enumerate(links) if b.id == into)
            below = [b.id for b in links[:cut] if b.status == "completed"]
            if below != run:
                raise Conflict(
                    f"the chain under {into} is {below}, not the planned {run}; plan again",
                    backup_id=into,
                )
            d = consolidate.plan_disk(s, links, len(links) - cut)
            if d is None:  # nothing under it any more
                return 0
            consolidate.mark_merging(s, {"disks": [d]})
            job = s.get(BackupJob, job_id)
            if job is not None:
                # What recovery needs; the merge notes "started_disks" itself.
                job.result = {**(job.result or {}), "current_merge": d, "started_disks": []}
        try:
            result = self.merger.execute(job_id, {"disks": [d]}, ctx)
        finally:
            # Done, or failed and settled by the merge: nothing to recover.
            with self.db.session() as s:
                job = s.get(BackupJob, job_id)
                if job is not None:
                    job.result = {**(job.result or {}), "current_merge": None}
        return int(result.get("freed_bytes") or 0)


def _outcomes(
    step: dict[str, Any], status: str, error: str | None = None, message: str | None = None
) -> list[dict[str, Any]]:
    """One record per restore point of a step."""
    out = []
    for backup_id in step["backup_ids"]:
        row: dict[str, Any] = {
            "backup_id": backup_id,
            "disk_id": step.get("disk_id"),
            "action": step["action"],
            "status": status,
        }
        if step.get("into"):
            row["into"] = step["into"]
        if error is not None:
            row["error"] = error
            row["message"] = message or error
        out.append(row)
    return out


def removed_ids(plan: dict[str, Any]) -> Sequence[str]:
    """Every restore point a VM's plan removes."""
    return [r["backup_id"] for d in plan.get("disks") or [] for r in d.get("remove") or []]
