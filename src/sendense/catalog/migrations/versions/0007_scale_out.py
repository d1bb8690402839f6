"""Scale-out: several hub processes on one catalog.

- ``hubs``: one row per hub process (``id`` is its lifecycle owner string
  ``host/pid/instance``), with a heartbeat it renews along with its job
  leases; another host judges a hub dead when the heartbeat is older than the
  lease. ``stopped_at`` is set by a clean stop.
- ``nbd_ports``: the NBD ports hub processes serve targets on, claimed by
  inserting a row (the primary key ``(host, port)`` makes a claim atomic), so
  two hubs on one host never hand out the same port; a dead hub's ports are
  released when its lease has expired.
- ``nodes.max_jobs``: how many backup jobs may run on a node at once (NULL:
  the hub's default); further jobs wait in the queue.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "hubs",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("heartbeat_at", TZ, nullable=False),
        sa.Column("stopped_at", TZ, nullable=True),
    )
    op.create_index("ix_hubs_heartbeat_at", "hubs", ["heartbeat_at"])
    op.create_table(
        "nbd_ports",
        sa.Column("host", sa.String(200), primary_key=True),
        sa.Column("port", sa.Integer(), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("backup_id", sa.String(36), nullable=True),
        sa.Column("lease_until", TZ, nullable=False),
    )
    op.create_index("ix_nbd_ports_owner", "nbd_ports", ["owner"])
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("max_jobs", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("max_jobs")
    op.drop_index("ix_nbd_ports_owner", table_name="nbd_ports")
    op.drop_table("nbd_ports")
    op.drop_index("ix_hubs_heartbeat_at", table_name="hubs")
    op.drop_table("hubs")
