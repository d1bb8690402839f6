"""Shared fixtures for the whole suite."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fixtures.cluster import Cluster
from fixtures.processes import busy_ports, kill_all, processes_under
from pgserver import PgCluster, PgNotFound, PgServer
from sendense.catalog.db import Database, sqlite_url
from sendense.qemu.qsd import QsdVm

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


# --------------------------------------------------------------------------
# Real components: qsd VMs, hub + node processes, and leak checks
# --------------------------------------------------------------------------


@pytest.fixture
def make_vm(tmp_path: Path) -> Iterator[Callable[..., QsdVm]]:
    """Factory of qemu-storage-daemon VMs: ``make_vm("web1", [64 << 20, 32 << 20])``."""
    vms: list[QsdVm] = []

    def make(name: str = "vm1", sizes: list[int] | None = None, *, start: bool = True) -> QsdVm:
        vm = QsdVm(tmp_path / "vms" / name, name)
        for size in sizes or [64 << 20, 32 << 20]:
            vm.add_disk(size)
        if start:
            vm.start()
        vms.append(vm)
        return vm

    yield make
    for vm in vms:
        vm.stop()


def _cluster_db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if getattr(request, "param", "sqlite") == "sqlite":
        return ""
    server = request.getfixturevalue("pg_server")
    return str(server.create_database(f"e2e_{uuid.uuid4().hex[:10]}"))


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A hub and a node (real processes) on loopback, catalog on SQLite.

    Parametrize indirectly with ``"postgresql"`` to run the hub on PostgreSQL.
    At teardown no qemu-nbd, qsd or worker process of the test may remain and
    the test's NBD ports must be free.
    """
    c = Cluster(tmp_path, _cluster_db(request, tmp_path))
    c.start_node()
    c.start_hub()
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    yield
    # Runs after the test's own fixtures are torn down (autouse first in, last out).
    deadline = time.monotonic() + 15
    leaked = processes_under(tmp_path)
    while leaked and time.monotonic() < deadline:
        time.sleep(0.1)
        leaked = processes_under(tmp_path)
    kill_all(leaked)
    assert not leaked, f"processes left behind: {leaked}"
    c = request.node.funcargs.get("cluster") if hasattr(request.node, "funcargs") else None
    if isinstance(c, Cluster):
        busy = busy_ports(c.nbd_first, c.nbd_last)
        assert not busy, f"NBD ports still in use after the test: {busy}"
