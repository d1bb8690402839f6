"""Change counters per topic, kept by the database itself (triggers).

`Database.generation` moves with every commit (PostgreSQL: every transaction
that writes moves ``pg_current_snapshot``), so an answer cached with it lives
only until the next write anywhere. While backups run, progress, leases,
claims and heartbeats write several times a second, and the 8 MB ``GET /vms``
answer of 5,000 VMs was rebuilt for nearly every request (notes of issue 12).

A topic is the set of tables (and rows) one answer depends on. Its row in
``catalog_topics`` has a ``version`` that triggers bump whenever such a row
is committed, by any process, whatever wrote it (the API, a job, another
hub, an operator with psql). An answer cached with the topic's version is
therefore never older than the catalog for what it shows, and survives the
writes it does not depend on.

Topic ``vms`` (``GET /api/v1/vms``): any change to ``vms`` (names, tags: the
scope filter reads them) or ``vm_disks``, and any insert, update or delete of
a ``backups`` row that is or was ``completed`` (the newest completed one is
each VM's ``last_backup``; its verify status, immutability... are shown). The
progress of a running backup (``status`` running before and after), jobs,
leases, ports, hubs and sessions leave it alone.

PostgreSQL: the bump is a DEFERRABLE INITIALLY DEFERRED constraint trigger,
so it runs at commit, after every other statement of the transaction: the
counter's row lock is the last lock a writer takes and is held only while it
commits (no deadlock with the row locks the transaction took before, writers
of other tables never wait for it). A transaction-local setting makes a
transaction bump once however many rows it changes. SQLite: plain row
triggers (one writer at a time anyway).

Readers read the version first, then the data (`topic_version`): a commit in
between only costs a recomputation (the value is stored under the older
version), never a stale answer.

Careful in later migrations: on SQLite, ``batch_alter_table`` recreates a
table and drops its triggers. A migration that batch-alters ``vms``,
``vm_disks`` or ``backups`` must call `drop_triggers` before and
`create_triggers` after it.
"""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

TOPICS = ("vms",)

# (table, event, condition on the row) -> bumps topic "vms".
_VMS_TRIGGERS = (
    ("vms", "INSERT", None),
    ("vms", "UPDATE", None),
    ("vms", "DELETE", None),
    ("vm_disks", "INSERT", None),
    ("vm_disks", "UPDATE", None),
    ("vm_disks", "DELETE", None),
    ("backups", "INSERT", "NEW.status = 'completed'"),
    ("backups", "UPDATE", "OLD.status = 'completed' OR NEW.status = 'completed'"),
    ("backups", "DELETE", "OLD.status = 'completed'"),
)

_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION sendense_topic_vms_bump() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Once per transaction (the setting is local to it).
    IF current_setting('sendense.topic_vms_bumped', true) = 'yes' THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('sendense.topic_vms_bumped', 'yes', true);
    UPDATE catalog_topics SET version = version + 1 WHERE topic = 'vms';
    RETURN NULL;
END
$$
"""


def _name(table: str, event: str) -> str:
    return f"topic_vms_{table}_{event.lower()}"


def create_triggers(bind: Connection) -> None:
    """Create the triggers that keep topic ``vms`` (idempotent only in the
    sense that a migration calls it once; see the module doc)."""
    if bind.dialect.name == "postgresql":
        bind.execute(text(_PG_FUNCTION))
        for table, event, when in _VMS_TRIGGERS:
            bind.execute(
                text(
                    f"CREATE CONSTRAINT TRIGGER {_name(table, event)} AFTER {event} ON {table} "
                    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                    + (f"WHEN ({when}) " if when else "")
                    + "EXECUTE FUNCTION sendense_topic_vms_bump()"
                )
            )
    elif bind.dialect.name == "sqlite":
        for table, event, when in _VMS_TRIGGERS:
            bind.execute(
                text(
                    f"CREATE TRIGGER {_name(table, event)} AFTER {event} ON {table} "
                    + (f"WHEN {when} " if when else "")
                    + "BEGIN UPDATE catalog_topics SET version = version + 1 "
                    "WHERE topic = 'vms'; END"
                )
            )


def drop_triggers(bind: Connection) -> None:
    for table, event, _ in _VMS_TRIGGERS:
        if bind.dialect.name == "postgresql":
            bind.execute(text(f"DROP TRIGGER IF EXISTS {_name(table, event)} ON {table}"))
        elif bind.dialect.name == "sqlite":
            bind.execute(text(f"DROP TRIGGER IF EXISTS {_name(table, event)}"))
    if bind.dialect.name == "postgresql":
        bind.execute(text("DROP FUNCTION IF EXISTS sendense_topic_vms_bump()"))


def topic_version(s: Session, topic: str) -> str:
    """The topic's version, for `CatalogCache.get` as its generation. Read it
    before anything the cached value is built from (module doc). On another
    database than SQLite or PostgreSQL, or without the row: a fresh value
    (nothing is reused)."""
    if s.get_bind().dialect.name not in ("sqlite", "postgresql"):
        return uuid.uuid4().hex
    version = s.execute(
        text("SELECT version FROM catalog_topics WHERE topic = :topic"), {"topic": topic}
    ).scalar()
    return uuid.uuid4().hex if version is None else f"{topic}:{version}"
