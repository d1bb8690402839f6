"""Indexes for the API at scale (bench/api_bench.py: 1,000 VMs, 100,000 backups).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

Single-column indexes on ``status`` and ``created_at`` gave way to composite
ones that match the queries: lists ordered by ``(created_at, id)``, the
status and type filter, chains by VM and disk, the last backup of each VM,
the parent of a new incremental, and the dependents of a delete.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BACKUPS = {
    "ix_backups_created_id": ["created_at", "id"],
    "ix_backups_status_type": ["status", "backup_type", "created_at", "id"],
    "ix_backups_vm_disk": ["vm_id", "disk_index", "status", "created_at"],
    "ix_backups_vm_status": ["vm_id", "status", "created_at"],
    "ix_backups_disk_latest": ["vm_disk_id", "status", "created_at"],
    "ix_backups_parent_id": ["parent_id"],
}
DROPPED = ("ix_backups_status", "ix_backups_created_at", "ix_backups_vm_id")


def upgrade() -> None:
    for name in DROPPED:
        op.drop_index(name, table_name="backups")
    for name, columns in BACKUPS.items():
        op.create_index(name, "backups", columns)
    op.drop_index("ix_backup_jobs_created_at", table_name="backup_jobs")
    op.create_index("ix_backup_jobs_created_id", "backup_jobs", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_backup_jobs_created_id", table_name="backup_jobs")
    op.create_index("ix_backup_jobs_created_at", "backup_jobs", ["created_at"])
    for name in BACKUPS:
        op.drop_index(name, table_name="backups")
    for name, column in zip(DROPPED, ("status", "created_at", "vm_id"), strict=True):
        op.create_index(name, "backups", [column])
