"""Serving the hub's API from several processes on one port.

One Python process runs one request at a time (the GIL): on a 2-core machine
a single hub process answered 50 concurrent clients of a list of 100 restore
points at a p99 of 270-360 ms with one core idle (bench/api_bench.py). The
hub therefore runs ``api_workers`` processes (default: one per core, at most
4), each a complete hub (catalog, engine, leases, its own jobs), as several
hubs on one catalog already work (engine/lifecycle.py: jobs have an owner
process and a lease; nothing is shared in memory between processes).

Start-up order keeps them from racing: the first process prepares everything
once (migrations, tokens, the default repository, recovery of what a dead hub
left) before the others start, so the others find nothing to recover. Each
listens on the port with its own ``SO_REUSEPORT`` socket, so the kernel
spreads connections over them evenly (with one shared socket the process that
woke first accepted most of 50 connections, and its clients waited twice as
long). Each takes its own slice of the NBD port range (nbd/ports.py). A worker's settings reach it
on its stdin (a database password never appears in its argv or environment).
If the first process dies, even by ``kill -9``, the kernel kills the others
(``PR_SET_PDEATHSIG``), so a crashed hub never leaves workers holding its port;
a worker that dies alone is started again.

On a SQLite catalog a second hub is refused before anything starts
(`refuse_second_hub`, engine/hubs.py): SQLite serves one hub, whose API
workers are the processes above. Several hubs share a PostgreSQL catalog.

TLS: given ``tls_cert_file`` and ``tls_key_file`` (PEM), every process serves
HTTPS on its socket (uvicorn's ``ssl_certfile``/``ssl_keyfile``); without
them, plain HTTP (loopback, or behind a reverse proxy terminating TLS:
docs/security.md).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import uvicorn

from sendense.catalog.db import Database
from sendense.engine import hubs
from sendense.engine.hubs import SecondHubRefused
from sendense.settings import HubSettings
from sendense.tls import is_loopback_host

log = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 4
PR_SET_PDEATHSIG = 1


def worker_count(settings: HubSettings) -> int:
    if settings.api_workers > 0:
        return settings.api_workers
    return max(1, min(os.cpu_count() or 1, MAX_AUTO_WORKERS))


def serve(settings: HubSettings) -> None:
    """Run the hub in the foreground until SIGINT/SIGTERM."""
    from sendense.hub.app import create_app
    from sendense.hub.state import HubState

    n = worker_count(settings)
    settings.worker_count, settings.worker_index = n, 0
    refuse_second_hub(settings)
    tls = tls_options(settings)
    if tls:
        log.info("hub serves HTTPS cert=%s", settings.tls_cert_file)
    elif not is_loopback_host(settings.host):
        # Tokens would cross the network in clear, unless a reverse proxy
        # terminates TLS in front (docs/security.md).
        log.warning(
            "hub API in plain HTTP on %s: set SENDENSE_TLS_CERT_FILE/SENDENSE_TLS_KEY_FILE "
            "or put a TLS-terminating reverse proxy in front",
            settings.host,
        )
    if n == 1:
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level.lower(),
            **tls,  # type: ignore[arg-type]
        )
        return
    if _in_use(settings.host, settings.port):
        raise SystemExit(f"{settings.host}:{settings.port} is in use by another program")
    sock = _listen(settings.host, settings.port)
    try:
        state = HubState.open(settings)  # migrations, recovery: once, before the others
    except SecondHubRefused as e:  # started at the same moment as another hub
        raise SystemExit(f"hub not started: {e.message}") from None
    workers = Workers(settings, n)
    workers.start()
    # uvicorn answers SIGTERM/SIGINT by shutting down, then raises the signal
    # again with the handlers it found: with the defaults that kills this
    # process before it stops its workers (which PR_SET_PDEATHSIG would then
    # kill mid-way, leaving their qemu-nbd behind). These handlers let it
    # return, so the workers stop cleanly first.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    try:
        _run(create_app(settings, state), sock, settings)
    finally:
        workers.stop()
        sock.close()


def refuse_second_hub(settings: HubSettings) -> None:
    """SQLite serves one hub (engine/hubs.py): exit with the reason if
    another hub process runs on this catalog. Its own API worker processes
    start after this check and are that one hub."""
    if settings.database_url and not settings.database_url.startswith("sqlite"):
        return
    db = Database(settings.catalog_url)
    try:
        hubs.check_alone(db, timedelta(seconds=settings.job_lease))
    except hubs.SecondHubRefused as e:
        raise SystemExit(f"hub not started: {e.message}") from None
    finally:
        db.dispose()


def tls_options(settings: HubSettings) -> dict[str, str]:
    """uvicorn's TLS arguments: both files or neither."""
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if cert is None and key is None:
        return {}
    if cert is None or key is None:
        raise SystemExit("SENDENSE_TLS_CERT_FILE and SENDENSE_TLS_KEY_FILE go together")
    for path in (cert, key):
        if not path.is_file():
            raise SystemExit(f"TLS file {path} does not exist")
    return {"ssl_certfile": str(cert.resolve()), "ssl_keyfile": str(key.resolve())}


def _in_use(host: str, port: int) -> bool:
    """Something answers there (SO_REUSEPORT would otherwise let this hub
    share the port with another one of the same user)."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


class Workers:
    """The other API worker processes of this hub (index 1 .. n-1)."""

    def __init__(self, settings: HubSettings, n: int) -> None:
        self.settings = settings
        self.n = n
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        for i in range(1, self.n):
            self.procs[i] = self._spawn(i)
        self._watcher = threading.Thread(target=self._watch, name="hub-workers", daemon=True)
        self._watcher.start()

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            # The data dir only tells ``ps`` readers whose worker this is.
            [
                sys.executable,
                "-m",
                "sendense.hub.serve",
                str(os.getpid()),
                f"--data-dir={self.settings.data_dir}",
            ],
            stdin=subprocess.PIPE,
        )
        given = self.settings.model_dump(mode="json")
        given.update(worker_index=index, worker_count=self.n)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(given).encode())
        proc.stdin.close()
        log.info("hub worker %d/%d started pid=%d", index, self.n, proc.pid)
        return proc

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for i, proc in list(self.procs.items()):
                if proc.poll() is not None and not self._stopping.is_set():
                    log.warning(
                        "hub worker %d pid=%d exited with %s: starting it again",
                        i,
                        proc.pid,
                        proc.returncode,
                    )
                    self.procs[i] = self._spawn(i)

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


def _worker_main(argv: list[str]) -> None:
    parent_pid = int(argv[0])
    _die_with_parent(parent_pid)
    given: dict[str, Any] = json.loads(sys.stdin.read())
    settings = HubSettings(**given)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [w{settings.worker_index}] %(name)s %(message)s",
    )
    from sendense.hub.app import create_app

    _run(create_app(settings), _listen(settings.host, settings.port), settings)


def _run(app: Any, sock: socket.socket, settings: HubSettings) -> None:
    # The socket itself, not ``fd=``: uvicorn takes an fd for a unix socket,
    # and the loop then never sets TCP_NODELAY (40 ms per small answer).
    # (The app's lifespan opens the worker's HubState.)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level.lower(),
        **tls_options(settings),  # type: ignore[arg-type]
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
