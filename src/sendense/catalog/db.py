"""Database handle for the catalog: engine, sessions and migrations.

One `Database` per process. SQLite is the embedded default and PostgreSQL
(psycopg 3) the production database; both get the same schema from the
Alembic migrations in ``migrations/``, never from ``create_all``, so a fresh
install and an upgraded one cannot drift apart.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from pydantic_core import from_json
from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# A pooled PostgreSQL connection back in use within this many seconds is
# not pinged again (see `Database`).
PING_IDLE = 1.0


def sqlite_url(path: str | Path) -> str:
    """URL of a SQLite file (made absolute so the cwd does not matter)."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def normalize_url(url: str | URL) -> URL:
    """Parse ``url``, pinning PostgreSQL to psycopg 3.

    Plain ``postgresql://`` would make SQLAlchemy pick psycopg2, which we do
    not ship.
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLite leaves foreign keys off unless asked on every connection. WAL lets
    # readers (API) run while a job writes; busy_timeout makes writers wait for
    # each other instead of failing with "database is locked"; NORMAL is safe
    # with WAL (only the last transactions may be lost on power failure).
    cursor = dbapi_connection.cursor()
    try:
        for pragma in (
            "foreign_keys=ON",
            "journal_mode=WAL",
            "busy_timeout=30000",
            "synchronous=NORMAL",
        ):
            cursor.execute(f"PRAGMA {pragma}")
    finally:
        cursor.close()


def _mark_used(_dbapi_connection: Any, record: Any) -> None:
    record.info["used_at"] = time.monotonic()


class Database:
    """Engine plus session factory for one catalog database."""

    def __init__(self, url: str | URL) -> None:
        self.url = normalize_url(url)
        # Pool: the API's sync handlers run on up to 40 threads (anyio's default
        # limiter), plus job monitors and the lease renewer. SQLAlchemy's default
        # 5 + 10 made requests wait for a connection and fail with a pool
        # timeout under 50 clients (measured: /vms answered 500 for 35 of 50).
        # 20 + 40 covers every thread that can hold a session at once.
        kwargs: dict[str, Any] = {
            "pool_size": 20,
            "max_overflow": 40,
            "pool_timeout": 60,
            # JSON columns (job progress, params, tags...) parsed by
            # pydantic-core: json.loads was a third of the CPU of a list of
            # 50 jobs (five JSON columns a row; bench/api_bench.py).
            "json_deserializer": from_json,
        }
        sqlite = self.url.get_backend_name() == "sqlite"
        if sqlite:
            # Sessions are used from worker threads (jobs) as well as the API.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            database = self.url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(self.url, **kwargs)
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_on_connect)
        else:
            # A ping guards against a restarted server (SQLite files have no
            # server to lose), but one per checkout was a round trip more on
            # every request. A connection idle for less than PING_IDLE was
            # just used: a server gone since then fails its statement, and
            # SQLAlchemy then drops every pooled connection of before.
            event.listen(self.engine, "connect", _mark_used)
            event.listen(self.engine, "checkin", _mark_used)
            event.listen(self.engine, "checkout", self._ping_if_idle)
        self.sessionmaker: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)
        # Reads on PostgreSQL in autocommit: no BEGIN and COMMIT round trips
        # (see `read`). SQLite starts no transaction for a SELECT anyway.
        self._reader: sessionmaker[Session] = (
            self.sessionmaker
            if sqlite
            else sessionmaker(
                self.engine.execution_options(isolation_level="AUTOCOMMIT"),
                expire_on_commit=False,
            )
        )
        self._watch_lock = threading.Lock()
        self._watch: sqlite3.Connection | None = None
        log.debug("database opened url=%s", self.url.render_as_string(hide_password=True))

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self.sessionmaker.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads that need no transaction of their own: on
        PostgreSQL each statement runs in autocommit, which saves the
        ``BEGIN`` and ``COMMIT`` round trips of a request that reads one
        or two things. Each statement sees what was committed before it
        started, as in a READ COMMITTED transaction; nothing locks. Never
        for a read-modify-write (use `session`)."""
        with self._reader.begin() as session:
            yield session

    def _ping_if_idle(self, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("used_at", 0.0) < PING_IDLE:
            return
        try:
            self.engine.dialect.do_ping(dbapi_connection)
        except self.engine.dialect.loaded_dbapi.Error as e:
            # The pool replaces the connection and tries again.
            raise exc.DisconnectionError(str(e)) from e

    def generation(self, session: Session | None = None) -> str:
        """A value that changes whenever anything was committed to the catalog,
        by this process or any other (several hubs share one catalog).

        `CatalogCache` reuses what it computed while this stays the same. It is
        read before the cached value is computed, so a commit in between only
        costs a recomputation, never a stale answer.

        - SQLite: ``PRAGMA data_version`` on a connection of its own that never
          writes: it changes when any other connection, in any process, commits.
        - PostgreSQL: the current snapshot (``xmin:xmax:in-progress xids``):
          it changes when a transaction that writes starts or ends. Read-only
          transactions take no transaction id and leave it alone. It covers
          the whole server, so writes to other databases there only cost
          recomputations.
        - Anything else: a fresh value each time (nothing is reused).

        About 10 us on SQLite, one round trip on PostgreSQL. Given a
        ``session`` that has not read anything yet, PostgreSQL is asked on its
        connection (no second connection; each later statement of a READ
        COMMITTED transaction sees at least what this value stands for).
        """
        backend = self.url.get_backend_name()
        if backend == "sqlite" and self.url.database not in (None, "", ":memory:"):
            with self._watch_lock:
                if self._watch is None:
                    self._watch = sqlite3.connect(
                        self.url.database or "", check_same_thread=False, isolation_level=None
                    )
                return f"sqlite:{self._watch.execute('PRAGMA data_version').fetchone()[0]}"
        if backend == "postgresql":
            if session is not None:
                value = session.execute(text("SELECT pg_current_snapshot()::text")).scalar_one()
                return f"pg:{value}"
            with self.engine.connect() as c:
                return f"pg:{c.execute(text('SELECT pg_current_snapshot()::text')).scalar_one()}"
        return uuid.uuid4().hex

    def alembic_config(self) -> Config:
        """Alembic config built in code, so no alembic.ini has to be installed."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        # ConfigParser interpolation: a literal % in a password must be doubled.
        url = self.url.render_as_string(hide_password=False).replace("%", "%%")
        config.set_main_option("sqlalchemy.url", url)
        return config

    def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to ``revision``; a no-op when already there."""
        config = self.alembic_config()
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
        log.info("catalog schema upgraded revision=%s", revision)

    def dispose(self) -> None:
        """Close all pooled connections (at shutdown, or before dropping the DB)."""
        with self._watch_lock:
            if self._watch is not None:
                self._watch.close()
                self._watch = None
        self.engine.dispose()
