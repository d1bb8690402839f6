"""The catalog's generation and the cache that relies on it, on SQLite and
PostgreSQL: an answer is reused only while nobody, in any process, committed
anything; a commit by another process is seen at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import func, select

from sendense.catalog.cache import CatalogCache
from sendense.catalog.db import Database
from sendense.catalog.models import Node

pytestmark = pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)


def commit_in_another_process(url: str, name: str) -> None:
    """Insert a node from a separate Python process (as another hub would)."""
    code = textwrap.dedent(
        f"""
        from sendense.catalog.db import Database
        from sendense.catalog.models import Node
        db = Database({url!r})
        with db.session() as s:
            s.add(Node(name={name!r}, url="http://127.0.0.1:1", token_encrypted="t"))
        db.dispose()
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def nodes(db: Database) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Node)) or 0


def test_generation_moves_with_every_commit_and_only_then(database: Database) -> None:
    g0 = database.generation()
    assert database.generation() == g0  # nothing happened
    nodes(database)  # a read commits nothing
    assert database.generation() == g0
    with database.session() as s:  # a commit through this process's pool
        s.add(Node(name="here", url="http://127.0.0.1:1", token_encrypted="t"))
    g1 = database.generation()
    assert g1 != g0
    commit_in_another_process(str(database.url.render_as_string(hide_password=False)), "there")
    assert database.generation() != g1


def test_cache_reuses_an_answer_until_another_process_commits(database: Database) -> None:
    cache = CatalogCache(database)
    calls: list[int] = []

    def count() -> int:
        calls.append(1)
        return nodes(database)

    assert cache.get("nodes", count) == 0
    assert cache.get("nodes", count) == 0
    assert len(calls) == 1, "the catalog did not change: the answer is reused"

    commit_in_another_process(str(database.url.render_as_string(hide_password=False)), "n1")
    assert cache.get("nodes", count) == 1, "a commit elsewhere is seen at once"
    assert len(calls) == 2
    assert cache.get("nodes", count) == 1
    assert len(calls) == 2


def test_cache_keeps_at_most_its_size(database: Database) -> None:
    cache = CatalogCache(database, max_entries=3)
    for i in range(10):
        assert cache.get(("k", i), lambda i=i: i) == i  # type: ignore[misc]
    calls: list[int] = []
    cache.get(("k", 0), lambda: calls.append(1) or 0)  # evicted: computed again
    cache.get(("k", 9), lambda: calls.append(1) or 9)  # kept
    assert len(calls) == 1
