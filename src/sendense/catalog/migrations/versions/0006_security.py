"""Security across hosts: pinned node certificates and encrypted repositories.

- ``nodes.fingerprint``: SHA-256 of the node's TLS certificate (DER, hex),
  pinned at registration; ``nodes.certificate``: that certificate (PEM,
  public), which the hub trusts for this node and nothing else.
- ``repositories.encrypted``: backups in it are QCOW2 with LUKS encryption.
- ``repository_keys``: each encrypted repository's data key, wrapped
  (encrypted) with the hub's master key, which lives in a file outside the
  catalog. The catalog never holds a key in clear.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("fingerprint", sa.String(64), nullable=True))
        batch.add_column(sa.Column("certificate", sa.Text(), nullable=True))
    with op.batch_alter_table("repositories") as batch:
        batch.add_column(
            sa.Column("encrypted", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "repository_keys",
        sa.Column(
            "repository_id",
            sa.String(36),
            sa.ForeignKey("repositories.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("wrapped_key", sa.Text(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("repository_keys")
    with op.batch_alter_table("repositories") as batch:
        batch.drop_column("encrypted")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("certificate")
        batch.drop_column("fingerprint")
