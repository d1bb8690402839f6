"""Initial catalog schema.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Foreign keys and unique constraints are named here (``fk_<table>_<column>_
<referred table>``, ``uq_<table>_<column>``) so that later migrations, which
on SQLite rebuild tables in batch mode, can refer to them by name.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def _id() -> sa.Column:
    return sa.Column("id", sa.String(36), primary_key=True)


def _fk(table: str, column: str, referred: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{referred}.id"], name=f"fk_{table}_{column}_{referred}"
    )


def upgrade() -> None:
    op.create_table(
        "nodes",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("url", sa.String(500), nullable=False),
        sa.Column("token_encrypted", sa.Text(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("last_seen_at", TZ, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.UniqueConstraint("name", name="uq_nodes_name"),
    )
    op.create_table(
        "repositories",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("type", sa.String(20), nullable=False),
        sa.Column("path", sa.String(1000), nullable=False),
        sa.Column("immutable", sa.Boolean(), nullable=False),
        sa.Column("retention_days", sa.Integer(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.UniqueConstraint("name", name="uq_repositories_name"),
    )
    op.create_table(
        "sources",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("node_id", sa.String(36), nullable=False),
        sa.Column("type", sa.String(20), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("secret_encrypted", sa.Text(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        _fk("sources", "node_id", "nodes"),
        sa.UniqueConstraint("name", name="uq_sources_name"),
    )
    op.create_table(
        "vms",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("source_id", sa.String(36), nullable=False),
        sa.Column("path", sa.String(1000), nullable=False),
        sa.Column("discovered_at", TZ, nullable=False),
        _fk("vms", "source_id", "sources"),
        sa.UniqueConstraint("name", name="uq_vms_name"),
    )
    op.create_table(
        "vm_disks",
        _id(),
        sa.Column("vm_id", sa.String(36), nullable=False),
        sa.Column("disk_index", sa.Integer(), nullable=False),
        sa.Column("disk_key", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("capacity_bytes", sa.BigInteger(), nullable=False),
        sa.Column("size_gb", sa.Double(), nullable=False),
        sa.Column("path", sa.String(1000), nullable=False),
        sa.Column("node_name", sa.String(200), nullable=False),
        _fk("vm_disks", "vm_id", "vms"),
        sa.UniqueConstraint("vm_id", "disk_index", name="uq_vm_disks_vm_id"),
    )
    op.create_table(
        "backup_jobs",
        _id(),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("vm_id", sa.String(36), nullable=False),
        sa.Column("repository_id", sa.String(36), nullable=False),
        sa.Column("node_id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("requested_type", sa.String(20), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("error_code", sa.String(100), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("started_at", TZ, nullable=True),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("timeout_at", TZ, nullable=True),
        sa.Column("owner", sa.String(200), nullable=True),
        _fk("backup_jobs", "vm_id", "vms"),
        _fk("backup_jobs", "repository_id", "repositories"),
        _fk("backup_jobs", "node_id", "nodes"),
    )
    op.create_index("ix_backup_jobs_status", "backup_jobs", ["status"])
    op.create_table(
        "backups",
        _id(),
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("vm_id", sa.String(36), nullable=False),
        sa.Column("vm_disk_id", sa.String(36), nullable=False),
        sa.Column("disk_index", sa.Integer(), nullable=False),
        sa.Column("disk_key", sa.Integer(), nullable=False),
        sa.Column("repository_id", sa.String(36), nullable=False),
        sa.Column("parent_id", sa.String(36), nullable=True),
        sa.Column("backup_type", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("file_path", sa.String(1000), nullable=False),
        sa.Column("nbd_export_name", sa.String(200), nullable=False),
        sa.Column("nbd_port", sa.Integer(), nullable=True),
        sa.Column("nbd_pid", sa.Integer(), nullable=True),
        sa.Column("total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("bytes_transferred", sa.BigInteger(), nullable=False),
        sa.Column("size_on_disk", sa.BigInteger(), nullable=False),
        sa.Column("change_id", sa.String(300), nullable=True),
        sa.Column("previous_change_id", sa.String(300), nullable=True),
        sa.Column("digest", sa.String(200), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("started_at", TZ, nullable=True),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("immutable_until", TZ, nullable=True),
        _fk("backups", "job_id", "backup_jobs"),
        _fk("backups", "vm_id", "vms"),
        _fk("backups", "vm_disk_id", "vm_disks"),
        _fk("backups", "repository_id", "repositories"),
        _fk("backups", "parent_id", "backups"),
    )
    for column in ("job_id", "vm_id", "repository_id", "status", "created_at"):
        op.create_index(f"ix_backups_{column}", "backups", [column])


def downgrade() -> None:
    for table in (
        "backups",
        "backup_jobs",
        "vm_disks",
        "vms",
        "sources",
        "repositories",
        "nodes",
    ):
        op.drop_table(table)  # indexes go with their table
