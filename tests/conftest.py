"""Shared fixtures for the whole suite."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgserver import PgCluster, PgNotFound, PgServer
from sendense.catalog.db import Database, sqlite_url

# --------------------------------------------------------------------------
# Databases: SQLite and PostgreSQL
#
# The catalog runs on both, so database tests take `db_url` / `database`,
# which are parametrized over the two. PostgreSQL is a throw-away server
# started once per session (see tests/pgserver.py), or the server given in
# SENDENSE_TEST_PG_URL (a superuser URL; test databases are created there).
# Missing PostgreSQL binaries skip the postgres tests loudly, and fail the run
# under CI or SENDENSE_REQUIRE_PG=1.
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgCluster]:
    """The session's PostgreSQL server (`url`, `create_database`, `drop_database`)."""
    external = os.environ.get("SENDENSE_TEST_PG_URL")
    if external:
        yield PgCluster(external)
        return
    try:
        server = PgServer()
    except PgNotFound as exc:
        message = f"{exc}; install postgresql or set SENDENSE_TEST_PG_URL"
        if os.environ.get("CI") or os.environ.get("SENDENSE_REQUIRE_PG") == "1":
            pytest.fail(f"PostgreSQL required (CI / SENDENSE_REQUIRE_PG=1): {message}")
        pytest.skip(f"POSTGRESQL SUITE SKIPPED: {message}")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty database (no tables) on each backend."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "catalog.db")
        return
    cluster: PgCluster = request.getfixturevalue("pg_server")
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = cluster.create_database(name)
    try:
        yield url
    finally:
        cluster.drop_database(name)


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    """A `Database` migrated to head on each backend."""
    db = Database(db_url)
    try:
        db.upgrade()
        yield db
    finally:
        db.dispose()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> Iterator[None]:
    """Make a skipped PostgreSQL suite impossible to miss (after pytest's own summary)."""
    yield
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "postgres" in r.keywords]
    if skipped:
        terminalreporter.write_sep(
            "!",
            f"PostgreSQL suite SKIPPED ({len(skipped)} tests): catalog untested on PostgreSQL",
            red=True,
            bold=True,
        )
