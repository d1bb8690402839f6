"""Change counters per topic (``catalog_topics``), bumped by triggers.

``GET /api/v1/vms`` is cached with the version of topic ``vms`` instead of
the whole catalog's generation, which every progress or lease write moves
(catalog/topics.py says which rows bump it and why the PostgreSQL triggers
are deferred to commit). ``vm_changes``: the version at which each VM's rows
last changed, so that the whole list is rebuilt from the VMs that changed.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sendense.catalog.topics import TOPICS, create_triggers, drop_triggers

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "catalog_topics",
        sa.Column("topic", sa.String(64), primary_key=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(table, [{"topic": topic, "version": 0} for topic in TOPICS])
    op.create_table(
        "vm_changes",
        sa.Column("vm_id", sa.String(36), primary_key=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_vm_changes_version", "vm_changes", ["version"])
    create_triggers(op.get_bind())


def downgrade() -> None:
    drop_triggers(op.get_bind())
    op.drop_table("vm_changes")
    op.drop_table("catalog_topics")
