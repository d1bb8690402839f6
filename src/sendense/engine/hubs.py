"""The hub processes sharing a catalog: registry, heartbeat and liveness.

Every hub process (each API worker process of a hub too: hub/serve.py) has a
row in ``hubs`` keyed by its lifecycle owner string ``host/pid/instance``
(engine/lifecycle.py). It writes the row at start, renews ``heartbeat_at``
with its job leases (every third of the lease) and sets ``stopped_at`` on a
clean stop.

Whether a hub process is gone:

- **this host**: ``/proc`` answers at once (a pid that no longer runs a
  sendense hub); no need to wait for anything;
- **another host**: its heartbeat is older than the lease, or it stopped
  cleanly. An owner with no row at all (a hub from before the registry) is
  judged by its job leases alone.

SQLite serves one hub: a second hub process on a SQLite catalog is refused at
start (`register` with ``single=True``). The API worker processes of one hub
are that hub: only the first one (index 0) asks, before it starts the others.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, inspect, or_, select, update
from sqlalchemy.orm import Session

from sendense.catalog.db import Database
from sendense.catalog.models import Hub
from sendense.core.errors import Conflict

log = logging.getLogger(__name__)

# Rows of hubs gone for this long are removed at the next start of a hub.
FORGET_AFTER = timedelta(days=7)


class SecondHubRefused(Conflict):
    code = "second_hub_refused"


@dataclass(frozen=True)
class Seen:
    """What the catalog knows of a hub process."""

    host: str
    pid: int
    heartbeat_at: datetime
    stopped_at: datetime | None


def split_owner(owner: str) -> tuple[str, int | None]:
    """(host, pid) of an owner string ``host/pid/instance``."""
    host, _, rest = owner.partition("/")
    pid_text = rest.partition("/")[0]
    return host, int(pid_text) if pid_text.isdigit() else None


def local_process_is_gone(pid: int) -> bool:
    """This host's process ``pid`` is no sendense hub (any more)."""
    if pid == os.getpid():
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"sendense" not in cmdline or b"hub" not in cmdline


def seen(s: Session, owners: Iterable[str | None]) -> dict[str, Seen]:
    """The registry rows of these owners (those that have one)."""
    wanted = sorted({o for o in owners if o})
    out: dict[str, Seen] = {}
    for i in range(0, len(wanted), 500):
        for row in s.scalars(select(Hub).where(Hub.id.in_(wanted[i : i + 500]))):
            out[row.id] = Seen(row.host, row.pid, row.heartbeat_at, row.stopped_at)
    return out


def is_dead(
    owner: str, row: Seen | None, lease: timedelta, now: datetime | None = None
) -> bool | None:
    """True: gone; False: alive; None: unknown (another host, no row)."""
    host, pid = split_owner(owner)
    if host == socket.gethostname() and pid is not None:
        return local_process_is_gone(pid)
    if row is None:
        return None
    if row.stopped_at is not None:
        return True
    return row.heartbeat_at < (now or datetime.now(UTC)) - lease


def register(db: Database, owner: str, *, lease: timedelta, single: bool = False) -> None:
    """Write this hub process's row. ``single`` (SQLite, first API worker):
    refuse to start while another hub process runs on the catalog."""
    host, pid = split_owner(owner)
    now = datetime.now(UTC)
    with db.session() as s:
        # The insert comes first: on SQLite it takes the write lock, so of two
        # hubs starting at once the second one sees the first one's row.
        s.add(Hub(id=owner, host=host, pid=pid or 0, started_at=now, heartbeat_at=now))
        s.flush()
        if single:
            refuse_others(s, owner, lease, now)
        s.execute(
            delete(Hub).where(
                Hub.id != owner,
                or_(Hub.stopped_at < now - FORGET_AFTER, Hub.heartbeat_at < now - FORGET_AFTER),
            )
        )


def refuse_others(s: Session, owner: str, lease: timedelta, now: datetime) -> None:
    """Raise `SecondHubRefused` if a hub process other than ``owner`` (and
    this process) runs on the catalog."""
    host = socket.gethostname()
    others = s.scalars(select(Hub).where(Hub.id != owner, Hub.stopped_at.is_(None))).all()
    for other in others:
        row = Seen(other.host, other.pid, other.heartbeat_at, other.stopped_at)
        if other.pid == os.getpid() and other.host == host:
            continue  # this process (tests open several hubs in one)
        if is_dead(other.id, row, lease, now) is False:
            raise SecondHubRefused(
                f"another hub process runs on this SQLite catalog (pid {other.pid} "
                f"on host {other.host}, last heartbeat {other.heartbeat_at:%Y-%m-%d %H:%M:%S} "
                "UTC): SQLite serves one hub; stop that hub first, or put the catalog "
                "on PostgreSQL (SENDENSE_DATABASE_URL) to run several hubs",
                pid=other.pid,
                host=other.host,
            )


def check_alone(db: Database, lease: timedelta) -> None:
    """Before a hub on a SQLite catalog starts: refuse if another one runs
    (`register` checks again, atomically, when it writes its row)."""
    if not inspect(db.engine).has_table("hubs"):
        return  # a new catalog, or one from before the registry
    with db.session() as s:
        refuse_others(s, "", lease, datetime.now(UTC))


def heartbeat(db: Database, owner: str) -> None:
    with db.session() as s:
        s.execute(
            update(Hub)
            .where(Hub.id == owner, Hub.stopped_at.is_(None))
            .values(heartbeat_at=datetime.now(UTC))
        )


def stopped(db: Database, owner: str) -> None:
    """A clean stop: other hubs need not wait for the heartbeat to age."""
    with db.session() as s:
        s.execute(update(Hub).where(Hub.id == owner).values(stopped_at=datetime.now(UTC)))


def live(db: Database, lease: timedelta) -> list[Seen]:
    """Hub processes believed to run (this host: checked in /proc)."""
    now = datetime.now(UTC)
    with db.session() as s:
        rows = s.scalars(select(Hub).where(Hub.stopped_at.is_(None))).all()
    out = []
    for r in rows:
        row = Seen(r.host, r.pid, r.heartbeat_at, r.stopped_at)
        if is_dead(r.id, row, lease, now) is False:
            out.append(row)
    return out
