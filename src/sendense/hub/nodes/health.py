"""Node health, probed in the background and cached: ``GET /nodes`` never
waits for a node.

Every call the hub makes to a node counts as a check too: a job that finds
its node unreachable marks it so at once (`NodeHealthMonitor.observe`).

A thread of the hub (`NodeHealthMonitor`, started by ``HubState.open``)
probes every node's ``/api/v1/health`` every ``SENDENSE_NODE_HEALTH_INTERVAL``
seconds (10 by default), all nodes in parallel, each probe bounded by
``probe_timeout``. A node whose previous probe still hangs (a peer that
trickles bytes) is not probed again meanwhile; the round marks it
unreachable. The API reads the cache only: ``status`` (``online``,
``unreachable``, or ``unknown`` before the first probe), ``checked_at`` and
``age_seconds``.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sendense.catalog.db import Database
from sendense.catalog.stores import NodeStore
from sendense.core.errors import Error
from sendense.engine.node_client import add_observer, cached_client, remove_observer
from sendense.secretbox import SecretBox, scrub

log = logging.getLogger(__name__)

MAX_PARALLEL = 16


@dataclass
class Probe:
    status: str  # online | unreachable
    version: str | None
    error: str | None
    checked_at: datetime
    checked_mono: float


def probe_node(
    node_id: str,
    url: str,
    token: str,
    timeout: float,
    certificate: str | None = None,
    name: str | None = None,
) -> Probe:
    """One health probe; never raises. An https node is probed through its
    pinned certificate: one presenting another is shown unreachable with
    "certificate does not match the pinned fingerprint"."""
    now, mono = datetime.now(UTC), time.monotonic()
    try:
        client = cached_client(node_id, url, token, certificate=certificate, name=name)
        h = client.health(timeout=timeout)
        return Probe("online", str(h.get("version") or "") or None, None, now, mono)
    except Error as e:
        return Probe("unreachable", None, e.message, now, mono)
    except Exception as e:  # a bug must not stop the monitor
        message = scrub(f"{type(e).__name__}: {e}", [token])
        return Probe("unreachable", None, message, now, mono)


class NodeHealthMonitor:
    def __init__(
        self,
        db: Database,
        secrets: SecretBox,
        *,
        interval: float = 10.0,
        probe_timeout: float = 3.0,
    ) -> None:
        self.db = db
        self.secrets = secrets
        self.interval = interval
        self.probe_timeout = probe_timeout
        self._cache: dict[str, Probe] = {}
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[Probe]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(MAX_PARALLEL, "node-health")
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ API side

    def health(self, node_id: str) -> dict[str, Any]:
        """The cached health of a node (no I/O)."""
        with self._lock:
            p = self._cache.get(node_id)
        if p is None:
            return {
                "status": "unknown",
                "version": None,
                "error": None,
                "checked_at": None,
                "age_seconds": None,
            }
        return {
            "status": p.status,
            "version": p.version,
            "error": p.error,
            "checked_at": p.checked_at.isoformat(),
            "age_seconds": round(time.monotonic() - p.checked_mono, 1),
        }

    def record_online(self, node_id: str, version: str | None = None) -> None:
        """A registration or an edit just talked to the node."""
        now = datetime.now(UTC)
        with self._lock:
            self._cache[node_id] = Probe("online", version, None, now, time.monotonic())

    def forget(self, node_id: str) -> None:
        """A node removed, or edited without a check: unknown until probed."""
        with self._lock:
            self._cache.pop(node_id, None)

    def refresh_soon(self) -> None:
        self._wake.set()

    def observe(self, node_id: str, answered: bool, error: str | None) -> None:
        """What any call to the node just found (engine/node_client.py):
        a transport failure makes it unreachable now, an answer online."""
        now, mono = datetime.now(UTC), time.monotonic()
        with self._lock:
            last = self._cache.get(node_id)
            if answered:
                version = last.version if last is not None else None
                self._cache[node_id] = Probe("online", version, None, now, mono)
            else:
                self._cache[node_id] = Probe("unreachable", None, error, now, mono)

    # ------------------------------------------------------------- thread

    def start(self) -> None:
        add_observer(self.observe)
        self._thread = threading.Thread(target=self._run, name="node-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        remove_observer(self.observe)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.probe_timeout + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:
                log.exception("node health round failed")
            self._wake.wait(self.interval)
            self._wake.clear()

    def refresh(self) -> None:
        """One round: probe every node in parallel, at most ``probe_timeout``
        (plus a second) in all."""
        with self.db.session() as s:
            nodes = [
                (n.id, n.url, n.token_encrypted, n.certificate, n.name) for n in NodeStore(s).all()
            ]  # no I/O with the session open
        known = {node[0] for node in nodes}
        with self._lock:
            for gone in [k for k in self._cache if k not in known]:
                del self._cache[gone]
        for node_id, url, token_encrypted, certificate, name in nodes:
            if node_id in self._inflight and not self._inflight[node_id].done():
                continue  # the last probe still hangs: the round below marks it
            try:
                token = str(self.secrets.decrypt(token_encrypted))
            except Exception:
                self._store(node_id, "unreachable", "the node's token cannot be decrypted")
                continue
            fut = self._pool.submit(
                probe_node, node_id, url, token, self.probe_timeout, certificate, name
            )
            self._inflight[node_id] = fut
        wait(list(self._inflight.values()), timeout=self.probe_timeout + 1)
        for node_id, fut in list(self._inflight.items()):
            if fut.done():
                del self._inflight[node_id]
                if node_id in known:
                    with self._lock:
                        self._cache[node_id] = fut.result()
            elif node_id in known:
                self._store(node_id, "unreachable", f"no answer within {self.probe_timeout:g}s")

    def _store(self, node_id: str, status: str, error: str) -> None:
        with self._lock:
            self._cache[node_id] = Probe(status, None, error, datetime.now(UTC), time.monotonic())
