"""A throw-away PostgreSQL server for tests.

The catalog must work on PostgreSQL as well as SQLite, so the suite starts a
real server: a fresh cluster in a temporary directory, trust auth, fsync off,
listening on 127.0.0.1 on a free port, removed again at the end. PostgreSQL
refuses to run as root, so as root the cluster belongs to the ``postgres``
user and its commands run through ``runuser -u postgres --``.

Manual use: ``python tests/pgserver.py`` prints the URL and waits for Ctrl-C.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

SERVER_OPTIONS = (
    "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
)


class PgNotFound(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bindir() -> Path:
    """The newest Debian server bindir, else wherever ``pg_ctl`` is on PATH."""

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if (Path(bindir) / "initdb").exists() and (Path(bindir) / "pg_ctl").exists():
            return Path(bindir)
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl and (Path(pg_ctl).parent / "initdb").exists():
        return Path(pg_ctl).parent
    raise PgNotFound("PostgreSQL server binaries (initdb, pg_ctl) not found")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """An existing server reached with a superuser URL; creates and drops databases."""

    def __init__(self, url: str) -> None:
        self._url = url

    @property
    def url(self) -> str:
        return self._url

    def _admin(self, sql: str) -> None:
        # CREATE/DROP DATABASE cannot run inside a transaction.
        engine = create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
        finally:
            engine.dispose()

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its URL."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def drop_database(self, name: str) -> None:
        # FORCE (PostgreSQL 13+) ends sessions a test forgot to close.
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PgServer(PgCluster):
    """A private PostgreSQL cluster: `start`, use `url`, `stop` (removes everything)."""

    def __init__(self, bindir: Path | None = None) -> None:
        super().__init__("")
        self.bindir = bindir or find_bindir()
        self.port = 0
        self.base: Path | None = None
        self.as_root = os.geteuid() == 0

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("PgServer is not started")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def datadir(self) -> Path:
        assert self.base is not None
        return self.base / "data"

    def _run(self, *argv: str) -> None:
        cmd = [str(self.bindir / argv[0]), *argv[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        # cwd: the postgres user may not be allowed into the caller's cwd.
        result = subprocess.run(cmd, cwd=self.base, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed rc={result.returncode}: {result.stderr or result.stdout}"
            )

    def start(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="sendense-pg-"))
        try:
            if self.as_root:
                shutil.chown(self.base, "postgres", "postgres")
            self._run(
                "initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres",
                "-E", "UTF8", "--no-locale", "--no-sync",
            )  # fmt: skip
            # A free port can be taken between probing and binding: retry.
            for attempt in range(3):
                self.port = free_port()
                options = f"-p {self.port} -k {self.base} {SERVER_OPTIONS}"
                try:
                    self._run(
                        "pg_ctl", "-D", str(self.datadir), "-l", str(self.base / "server.log"),
                        "-w", "-t", "60", "-o", options, "start",
                    )  # fmt: skip
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
                    log.warning("postgres start failed port=%d, retrying", self.port)
                    time.sleep(0.5)
        except BaseException:
            self._log_server_log()
            self.port = 0
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
            raise
        log.info("postgres started port=%d dir=%s", self.port, self.base)

    def _log_server_log(self) -> None:
        if self.base and (self.base / "server.log").exists():
            log.error("postgres server log:\n%s", (self.base / "server.log").read_text()[-4000:])

    def stop(self) -> None:
        if self.base is None:
            return
        try:
            if self.port:
                self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        except RuntimeError:
            log.exception("postgres stop failed dir=%s", self.base)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
            self.port = 0

    def __enter__(self) -> PgServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    with PgServer() as server:
        print(server.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
