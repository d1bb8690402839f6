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

Which VMs changed: each bump also records, in ``vm_changes`` (one row per
VM), the version at which the VM's rows last changed. The counter's row lock
is held until commit, so versions are handed out in commit order: once a
reader sees version V committed, every change of version <= V is committed
too, and ``vm_changes`` rows with a version above the one an answer was
built at name exactly the VMs to rebuild (hub/vms/service.py rebuilds the
whole list of 5,000 VMs from the few that changed while backups complete
every second, instead of from scratch).

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

# (table, event, condition on the row, the row's VM id column) -> topic "vms".
_VMS_TRIGGERS = (
    ("vms", "INSERT", None, "id"),
    ("vms", "UPDATE", None, "id"),
    ("vms", "DELETE", None, "id"),
    ("vm_disks", "INSERT", None, "vm_id"),
    ("vm_disks", "UPDATE", None, "vm_id"),
    ("vm_disks", "DELETE", None, "vm_id"),
    ("backups", "INSERT", "NEW.status = 'completed'", "vm_id"),
    ("backups", "UPDATE", "OLD.status = 'completed' OR NEW.status = 'completed'", "vm_id"),
    ("backups", "DELETE", "OLD.status = 'completed'", "vm_id"),
)

# The first row a transaction changed bumps the version (at commit: the
# trigger is deferred) and keeps it in a setting local to the transaction;
# every row then records its VM at that version.
_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION sendense_topic_vms_bump() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
    vm text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        vm := to_jsonb(OLD) ->> TG_ARGV[0];
    ELSE
        vm := to_jsonb(NEW) ->> TG_ARGV[0];
    END IF;
    v := nullif(current_setting('sendense.topic_vms_version', true), '')::bigint;
    IF v IS NULL THEN
        UPDATE catalog_topics SET version = version + 1 WHERE topic = 'vms'
            RETURNING version INTO v;
        PERFORM set_config('sendense.topic_vms_version', v::text, true);
    END IF;
    IF vm IS NOT NULL THEN
        INSERT INTO vm_changes (vm_id, version) VALUES (vm, v)
            ON CONFLICT (vm_id) DO UPDATE SET version = EXCLUDED.version;
    END IF;
    RETURN NULL;
END
$$
"""


def _name(table: str, event: str) -> str:
    return f"topic_vms_{table}_{event.lower()}"


def create_triggers(bind: Connection) -> None:
    """Create the triggers that keep topic ``vms`` and ``vm_changes`` (a
    migration calls it once; see the module doc)."""
    if bind.dialect.name == "postgresql":
        bind.execute(text(_PG_FUNCTION))
        for table, event, when, column in _VMS_TRIGGERS:
            bind.execute(
                text(
                    f"CREATE CONSTRAINT TRIGGER {_name(table, event)} AFTER {event} ON {table} "
                    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                    + (f"WHEN ({when}) " if when else "")
                    + f"EXECUTE FUNCTION sendense_topic_vms_bump('{column}')"
                )
            )
    elif bind.dialect.name == "sqlite":
        for table, event, when, column in _VMS_TRIGGERS:
            row = "OLD" if event == "DELETE" else "NEW"
            bind.execute(
                text(
                    f"CREATE TRIGGER {_name(table, event)} AFTER {event} ON {table} "
                    + (f"WHEN {when} " if when else "")
                    + "BEGIN UPDATE catalog_topics SET version = version + 1 "
                    "WHERE topic = 'vms'; "
                    "INSERT INTO vm_changes (vm_id, version) "
                    f"SELECT {row}.{column}, version FROM catalog_topics "
                    f"WHERE topic = 'vms' AND {row}.{column} IS NOT NULL "
                    "ON CONFLICT (vm_id) DO UPDATE SET version = excluded.version; END"
                )
            )


def drop_triggers(bind: Connection) -> None:
    for table, event, _, _ in _VMS_TRIGGERS:
        if bind.dialect.name == "postgresql":
            bind.execute(text(f"DROP TRIGGER IF EXISTS {_name(table, event)} ON {table}"))
        elif bind.dialect.name == "sqlite":
            bind.execute(text(f"DROP TRIGGER IF EXISTS {_name(table, event)}"))
    if bind.dialect.name == "postgresql":
        bind.execute(text("DROP FUNCTION IF EXISTS sendense_topic_vms_bump()"))


def topic_counter(s: Session, topic: str) -> int | None:
    """The topic's version; None on another database than SQLite or
    PostgreSQL, or without the row (nothing can be reused then). Read it
    before anything a cached value is built from (module doc)."""
    if s.get_bind().dialect.name not in ("sqlite", "postgresql"):
        return None
    version = s.execute(
        text("SELECT version FROM catalog_topics WHERE topic = :topic"), {"topic": topic}
    ).scalar()
    return None if version is None else int(version)


def topic_version(s: Session, topic: str) -> str:
    """`topic_counter` as a `CatalogCache` generation (a fresh value when
    there is none: nothing is reused)."""
    counter = topic_counter(s, topic)
    return uuid.uuid4().hex if counter is None else f"{topic}:{counter}"


def changed_vms(s: Session, since: int) -> list[str]:
    """Ids of the VMs whose rows of topic ``vms`` changed after version
    ``since`` (deleted VMs included)."""
    return list(
        s.execute(
            text("SELECT vm_id FROM vm_changes WHERE version > :since"), {"since": since}
        ).scalars()
    )
