"""Policies, their runs and queue, webhooks and their outbox.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

``policy_runs`` has a unique ``(policy_id, scheduled_at)``: the claim that
lets several hub processes on one catalog start each scheduled run once.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def _fk(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{target}.id"], name=f"fk_{table}_{column}_{target}")


def upgrade() -> None:
    op.create_table(
        "policies",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("repository_id", sa.String(36), nullable=False),
        sa.Column("schedule", sa.String(200), nullable=False),
        sa.Column("timezone", sa.String(100), nullable=False),
        sa.Column("full_every", sa.Integer(), nullable=True),
        sa.Column("retention", sa.JSON(), nullable=False),
        sa.Column("verify_after", sa.Boolean(), nullable=False),
        sa.Column("window", sa.JSON(), nullable=True),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=True),
        sa.Column("last_scheduled_at", TZ, nullable=True),
        _fk("policies", "repository_id", "repositories"),
        sa.UniqueConstraint("name", name="uq_policies_name"),
    )
    op.create_table(
        "policy_runs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("policy_id", sa.String(36), nullable=False),
        sa.Column("scheduled_at", TZ, nullable=False),
        sa.Column("trigger", sa.String(20), nullable=False),
        sa.Column("missed_count", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("claimed_by", sa.String(200), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("finished_at", TZ, nullable=True),
        sa.Column("summary", sa.JSON(), nullable=False),
        _fk("policy_runs", "policy_id", "policies"),
        sa.UniqueConstraint("policy_id", "scheduled_at", name="uq_policy_runs_policy_scheduled"),
    )
    op.create_index("ix_policy_runs_policy_id", "policy_runs", ["policy_id"])
    op.create_table(
        "policy_run_vms",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("policy_id", sa.String(36), nullable=False),
        sa.Column("vm_id", sa.String(36), nullable=False),
        sa.Column("node_id", sa.String(36), nullable=True),
        sa.Column("backup_type", sa.String(20), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("job_id", sa.String(36), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("not_before", TZ, nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=True),
        _fk("policy_run_vms", "run_id", "policy_runs"),
        _fk("policy_run_vms", "policy_id", "policies"),
        _fk("policy_run_vms", "vm_id", "vms"),
        _fk("policy_run_vms", "node_id", "nodes"),
    )
    for column in ("run_id", "policy_id", "vm_id", "job_id"):
        op.create_index(f"ix_policy_run_vms_{column}", "policy_run_vms", [column])
    op.create_index("ix_policy_run_vms_status", "policy_run_vms", ["status", "not_before"])
    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("policy_id", sa.String(36), nullable=True),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("secret_encrypted", sa.Text(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        _fk("webhooks", "policy_id", "policies"),
    )
    op.create_index("ix_webhooks_policy_id", "webhooks", ["policy_id"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("webhook_id", sa.String(36), nullable=False),
        sa.Column("event", sa.String(50), nullable=False),
        sa.Column("event_key", sa.String(200), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TZ, nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("delivered_at", TZ, nullable=True),
        _fk("webhook_deliveries", "webhook_id", "webhooks"),
        sa.UniqueConstraint("webhook_id", "event_key", name="uq_webhook_deliveries_event"),
    )
    op.create_index("ix_webhook_deliveries_webhook_id", "webhook_deliveries", ["webhook_id"])
    op.create_index(
        "ix_webhook_deliveries_due", "webhook_deliveries", ["status", "next_attempt_at"]
    )


def downgrade() -> None:
    for table in ("webhook_deliveries", "webhooks", "policy_run_vms", "policy_runs", "policies"):
        op.drop_table(table)
