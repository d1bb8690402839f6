"""Writes the audit log: every mutating request (POST, PUT, PATCH, DELETE)
and every refused one (401, 403), whatever its method.

A pure ASGI middleware, outermost, so that it also sees the 401s that
`RequestGuard` (hub/limits.py) answers before any route runs. After the app
has answered it reads what routing left in the ASGI scope: the route template
(``/api/v1/backups/{backup_id}``) and the path parameters (the target ids),
and the caller that authentication put in ``scope["state"]["principal"]``.
Entries go through a queue to one writer thread: the event loop never waits
for the catalog, and a failed write is logged, never the request's problem.
Never stored: a token, a request body, a query string.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sendense.catalog.db import Database
from sendense.catalog.models import AuditEntry
from sendense.catalog.stores.audit import AuditStore
from sendense.core.access import Principal

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REFUSED = frozenset({401, 403})


class AuditWriter:
    """One thread that writes queued entries to the catalog, in order, and
    once an hour removes entries older than ``retention_days`` (0: never)."""

    PRUNE_EVERY = 3600.0

    def __init__(self, db: Database, retention_days: int = 0) -> None:
        self.db = db
        self.retention_days = retention_days
        self._queue: queue.Queue[AuditEntry | None] = queue.Queue(maxsize=10000)
        self._next_prune = 0.0  # at once, then every PRUNE_EVERY seconds
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def put(self, entry: AuditEntry) -> None:
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            log.error("audit queue full: entry dropped method=%s path=%s", entry.method, entry.path)

    def flush(self) -> None:
        """Return when every entry queued so far is in the catalog."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def prune(self) -> int:
        """Remove the entries past the retention; how many went."""
        if self.retention_days <= 0:
            return 0
        before = datetime.now(UTC) - timedelta(days=self.retention_days)
        with self.db.session() as s:
            removed = AuditStore(s).prune(before)
        if removed:
            log.info("audit entries older than %d days removed: %d", self.retention_days, removed)
        return removed

    def _run(self) -> None:
        while True:
            if time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + self.PRUNE_EVERY
                try:
                    self.prune()
                except Exception:
                    log.exception("audit pruning failed (retried in an hour)")
            try:
                entry = self._queue.get(timeout=max(0.1, self._next_prune - time.monotonic()))
            except queue.Empty:
                continue
            try:
                if entry is None:
                    return
                with self.db.session() as s:
                    s.add(entry)
            except Exception:
                log.exception("audit entry not written method=%s", getattr(entry, "method", "?"))
            finally:
                self._queue.task_done()


class AuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/api/"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            method = scope.get("method", "")
            if method in MUTATING or status in REFUSED:
                self._record(scope, method, status)

    @staticmethod
    def _record(scope: Scope, method: str, status: int) -> None:
        app = scope.get("app")
        st = getattr(getattr(app, "state", None), "hub", None)
        writer: AuditWriter | None = getattr(st, "audit", None)
        if writer is None:
            return
        who = (scope.get("state") or {}).get("principal")
        route = scope.get("route")
        params = scope.get("path_params") or {}
        if route is None and app is not None:
            # Refused before routing (401 from the guard): find the route the
            # request was for, so that filtering by route template finds it.
            route, params = _match(app, scope)
        client = scope.get("client")
        writer.put(
            AuditEntry(
                at=datetime.now(UTC),
                token_id=who.token_id if isinstance(who, Principal) else None,
                token_name=who.name if isinstance(who, Principal) else None,
                method=method[:10],
                route=str(getattr(route, "path", route or scope.get("path", "")))[:300],
                path=str(scope.get("path", ""))[:1000],
                target={str(k): str(v)[:200] for k, v in params.items()},
                status=status,
                client=f"{client[0]}:{client[1]}"[:100] if client else None,
            )
        )


_TEMPLATES: list[tuple[re.Pattern[str], str]] = []


def _match(app: Any, scope: Scope) -> tuple[str | None, dict[str, Any]]:
    """The route template (and path parameters) ``scope`` would have reached,
    from the paths of the app's OpenAPI document (the template a filter by
    ``route`` uses), or (None, {})."""
    if not _TEMPLATES:
        for template in sorted(app.openapi().get("paths", {}), key=lambda t: t.count("{")):
            regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            _TEMPLATES.append((re.compile(f"^{regex}$"), template))
    path = scope.get("path", "")
    for compiled, template in _TEMPLATES:
        m = compiled.match(path)
        if m:
            return template, m.groupdict()
    return None, {}
