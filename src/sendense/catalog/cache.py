"""Answers computed from the catalog, reused while the catalog is unchanged.

Some answers cost far more than the request around them: the exact ``total``
of a filtered list counts every matching row (4 ms for 90,000 backups on
SQLite), and ``GET /vms`` for 1,000 VMs builds 1.6 MB of JSON. Both depend on
nothing but the catalog, so each is kept with the catalog's generation
(`Database.generation`) and served again while that has not moved. Any
commit, by any hub process, moves it: an answer is never older than the
catalog. There is no shared memory between hub processes and no expiry to
tune; during backups (progress is written every few seconds) an entry lives
until the next write.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from sendense.catalog.db import Database

T = TypeVar("T")


class CatalogCache:
    """A small LRU of (generation, value) per key, safe across threads."""

    def __init__(self, db: Database, max_entries: int = 512) -> None:
        self.db = db
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, compute: Callable[[], T], generation: str | None = None) -> T:
        """The value for ``key``: cached if the catalog has not changed since
        it was computed, else ``compute()`` (stored for the next caller).

        ``generation``: `Database.generation` read before the transaction
        ``compute`` reads in had read anything (saves a round trip on
        PostgreSQL); by default it is read here, and ``compute`` must then
        read in a transaction of its own."""
        if generation is None:
            generation = self.db.generation()  # before computing: see the module doc
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == generation:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1]  # type: ignore[no-any-return]
            self.misses += 1
        value = compute()
        with self._lock:
            self._entries[key] = (generation, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def put(self, key: Hashable, value: Any, generation: str) -> None:
        """Keep ``value`` for ``key``, computed in a transaction that read
        nothing before ``generation`` was read."""
        with self._lock:
            self._entries[key] = (generation, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
