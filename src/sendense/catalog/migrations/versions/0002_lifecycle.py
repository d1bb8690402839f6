"""Lifecycle: job leases and params, verify state, holds, tokens, audit, tags.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Jobs of kinds other than ``backup`` (consolidate, verify, rescan) have no
node, and a rescan no VM: those columns become nullable.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("vms") as t:
        t.add_column(sa.Column("tags", sa.JSON(), nullable=False, server_default="{}"))
    with op.batch_alter_table("repositories") as t:
        t.add_column(sa.Column("config", sa.JSON(), nullable=False, server_default="{}"))
        t.add_column(sa.Column("secret_encrypted", sa.Text(), nullable=True))
        t.add_column(sa.Column("updated_at", TZ, nullable=True))
    with op.batch_alter_table("backup_jobs") as t:
        t.alter_column("vm_id", existing_type=sa.String(36), nullable=True)
        t.alter_column("repository_id", existing_type=sa.String(36), nullable=True)
        t.alter_column("node_id", existing_type=sa.String(36), nullable=True)
        t.add_column(sa.Column("lease_until", TZ, nullable=True))
        t.add_column(sa.Column("cancel_requested_at", TZ, nullable=True))
        t.add_column(sa.Column("params", sa.JSON(), nullable=False, server_default="{}"))
        t.add_column(sa.Column("result", sa.JSON(), nullable=False, server_default="{}"))
        t.create_index("ix_backup_jobs_created_at", ["created_at"])
        t.create_index("ix_backup_jobs_vm_id", ["vm_id"])
    with op.batch_alter_table("backups") as t:
        t.add_column(
            sa.Column("synthetic", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        t.add_column(sa.Column("verify_status", sa.String(20), nullable=True))
        t.add_column(sa.Column("verified_at", TZ, nullable=True))
        t.add_column(sa.Column("verify_error", sa.Text(), nullable=True))
    op.create_table(
        "backup_holds",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("backup_id", sa.String(36), nullable=False),
        sa.Column("holder_type", sa.String(20), nullable=False),
        sa.Column("holder_id", sa.String(36), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.ForeignKeyConstraint(
            ["backup_id"], ["backups.id"], name="fk_backup_holds_backup_id_backups"
        ),
    )
    op.create_index("ix_backup_holds_backup_id", "backup_holds", ["backup_id"])
    op.create_index("ix_backup_holds_holder_id", "backup_holds", ["holder_id"])
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("scope", sa.JSON(), nullable=True),
        sa.Column("expires_at", TZ, nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("revoked_at", TZ, nullable=True),
        sa.Column("last_used_at", TZ, nullable=True),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("at", TZ, nullable=False),
        sa.Column("token_id", sa.String(36), nullable=True),
        sa.Column("token_name", sa.String(200), nullable=True),
        sa.Column("method", sa.String(10), nullable=False),
        sa.Column("route", sa.String(300), nullable=False),
        sa.Column("path", sa.String(1000), nullable=False),
        sa.Column("target", sa.JSON(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("client", sa.String(100), nullable=True),
    )
    for column in ("at", "token_name", "route"):
        op.create_index(f"ix_audit_log_{column}", "audit_log", [column])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("api_tokens")
    op.drop_table("backup_holds")
    with op.batch_alter_table("backups") as t:
        for column in ("verify_error", "verified_at", "verify_status", "synthetic"):
            t.drop_column(column)
    with op.batch_alter_table("backup_jobs") as t:
        t.drop_index("ix_backup_jobs_vm_id")
        t.drop_index("ix_backup_jobs_created_at")
        for column in ("result", "params", "cancel_requested_at", "lease_until"):
            t.drop_column(column)
    with op.batch_alter_table("repositories") as t:
        for column in ("updated_at", "secret_encrypted", "config"):
            t.drop_column(column)
    with op.batch_alter_table("vms") as t:
        t.drop_column("tags")
