"""Alembic environment for the catalog.

Run from `sendense.catalog.db.Database.upgrade`, which hands over an open
connection in ``config.attributes["connection"]``; a plain ``alembic`` command
line works too, given ``sqlalchemy.url`` in its config. SQLite cannot ALTER
most things, so its migrations run in batch mode (copy and move tables).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from sendense.catalog.db import Database
from sendense.catalog.models import Base

config = context.config
target_metadata = Base.metadata


def run_with(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    """Emit SQL instead of running it (``alembic upgrade --sql``)."""
    url = config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=bool(url and url.startswith("sqlite")),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_with(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("alembic: set sqlalchemy.url or pass a connection")
    # Database gives the same URL rewriting and SQLite pragmas as the hub.
    database = Database(url)
    try:
        with database.engine.begin() as conn:
            run_with(conn)
    finally:
        database.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
