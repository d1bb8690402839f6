"""NBD ports claimed in the catalog and the registry of hub processes, on
SQLite and PostgreSQL (issue 12: several hubs on one catalog).

Two allocators stand for two hub processes on one host (different owners);
"other host" owners are rows written as another machine's hub would.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from fixtures.cluster import port_range
from sendense.catalog.db import Database
from sendense.catalog.models import Hub, NbdPort
from sendense.core.errors import PortsExhausted
from sendense.engine import hubs
from sendense.engine.lifecycle import new_owner, owner_is_dead
from sendense.nbd.ports import PortAllocator

LEASE = timedelta(seconds=30)


def claims(db: Database) -> dict[int, str]:
    with db.session() as s:
        return {p.port: p.owner for p in s.scalars(select(NbdPort))}


def add_hub(db: Database, owner: str, *, age: float = 0.0, stopped: bool = False) -> None:
    host, pid = hubs.split_owner(owner)
    at = datetime.now(UTC) - timedelta(seconds=age)
    with db.session() as s:
        s.add(
            Hub(
                id=owner,
                host=host,
                pid=pid or 0,
                started_at=at,
                heartbeat_at=at,
                stopped_at=at if stopped else None,
            )
        )


def dead_local_owner() -> str:
    """An owner string of this host whose process has exited."""
    p = subprocess.Popen(["true"])
    p.wait()
    return f"{socket.gethostname()}/{p.pid}/deadbeef"


def test_two_hub_processes_never_hand_out_the_same_port(database: Database) -> None:
    first, last = port_range(8)
    a = PortAllocator(first, last, db=database, owner=new_owner())
    b = PortAllocator(first, last, db=database, owner=new_owner())
    got: dict[str, list[int]] = {"a": [], "b": []}

    def take(name: str, alloc: PortAllocator) -> None:
        for _ in range(4):
            got[name].append(alloc.allocate())

    threads = [threading.Thread(target=take, args=x) for x in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got["a"] + got["b"]) == list(range(first, last + 1))
    assert not set(got["a"]) & set(got["b"])
    assert claims(database) == {
        **{p: a.owner for p in got["a"]},
        **{p: b.owner for p in got["b"]},
    }
    with pytest.raises(PortsExhausted, match="4 by other hub processes on this host"):
        a.allocate()
    # A release frees the claim; the other hub gets that port next.
    b.release(got["b"][0])
    a.release(got["b"][1])  # not a's: nothing happens
    assert got["b"][0] not in claims(database)
    assert claims(database)[got["b"][1]] == b.owner
    assert a.allocate() == got["b"][0]


def test_a_dead_hubs_ports_are_released_after_its_lease(database: Database) -> None:
    first, last = port_range(4)
    me = PortAllocator(first, last, db=database, owner=new_owner(), lease_seconds=30)
    far_alive, far_dead, far_unknown = "far/11/a", "far/12/b", "far/13/c"
    near_dead = dead_local_owner()
    add_hub(database, far_alive, age=5)
    add_hub(database, far_dead, age=31)  # heartbeat older than the lease
    now = datetime.now(UTC)
    with database.session() as s:
        for port, owner, lease in [
            (first, far_alive, now - timedelta(seconds=1)),  # its hub still beats
            (first + 1, far_dead, now + timedelta(seconds=5)),
            (first + 2, far_unknown, now + timedelta(seconds=5)),  # no row, lease runs
            (first + 3, near_dead, now + timedelta(seconds=5)),  # /proc: gone
        ]:
            s.add(NbdPort(host=me.machine, port=port, owner=owner, lease_until=lease))
    gone = me.release_dead()
    assert sorted(p for _, p, _ in gone) == [first + 1, first + 3]
    assert claims(database) == {first: far_alive, first + 2: far_unknown}
    with database.session() as s:
        s.get(NbdPort, (me.machine, first + 2)).lease_until = now - timedelta(seconds=1)  # type: ignore[union-attr]
    assert [p for _, p, _ in me.release_dead()] == [first + 2]
    # The renewal keeps one's own claims alive.
    port = me.allocate()
    with database.session() as s:
        s.get(NbdPort, (me.machine, port)).lease_until = now  # type: ignore[union-attr]
    assert me.renew() == 1
    with database.session() as s:
        assert s.get(NbdPort, (me.machine, port)).lease_until > now + timedelta(seconds=20)  # type: ignore[union-attr]


def test_a_hub_taking_over_a_job_takes_its_port_not_a_live_hubs(database: Database) -> None:
    first, last = port_range(4)
    me = PortAllocator(first, last, db=database, owner=new_owner())
    live = PortAllocator(first, last, db=database, owner=new_owner())  # this process: alive
    with database.session() as s:
        s.add(
            NbdPort(
                host=me.machine,
                port=first,
                owner=dead_local_owner(),
                backup_id="b1",
                lease_until=datetime.now(UTC),
            )
        )
    me.reserve(first)
    taken = live.allocate()
    me.reserve(taken)  # a live hub's claim stays its own
    assert claims(database) == {first: me.owner, taken: live.owner}
    with database.session() as s:
        assert s.get(NbdPort, (me.machine, first)).backup_id == "b1"  # type: ignore[union-attr]


def test_owner_is_dead_on_other_hosts_by_heartbeat(database: Database) -> None:
    add_hub(database, "far/1/a", age=5)
    add_hub(database, "far/2/b", age=40)
    add_hub(database, "far/3/c", age=1, stopped=True)
    with database.session() as s:
        seen = hubs.seen(s, ["far/1/a", "far/2/b", "far/3/c", "far/4/d"])
    assert not owner_is_dead("far/1/a", seen, LEASE)
    assert owner_is_dead("far/2/b", seen, LEASE)
    assert owner_is_dead("far/3/c", seen, LEASE)  # stopped cleanly
    assert not owner_is_dead("far/4/d", seen, LEASE)  # unknown: the job lease decides
    # This host: /proc answers, whatever the registry says.
    assert owner_is_dead(dead_local_owner(), seen, LEASE)
    assert not owner_is_dead(new_owner(), seen, LEASE)


def test_a_second_hub_on_sqlite_is_refused_naming_the_first(database: Database) -> None:
    if database.url.get_backend_name() != "sqlite":
        hubs.register(database, "far/1/a", lease=LEASE)
        hubs.register(database, "far/2/b", lease=LEASE)  # PostgreSQL: any number
        return
    # A hub process on another host sharing the file, beating.
    add_hub(database, "far/77/a", age=2)
    with pytest.raises(hubs.SecondHubRefused) as e:
        hubs.register(database, new_owner(), lease=LEASE, single=True)
    assert "pid 77 on host far" in e.value.message and "PostgreSQL" in e.value.message
    with pytest.raises(hubs.SecondHubRefused):
        hubs.check_alone(database, LEASE)
    with database.session() as s:  # the refused hub left no row
        assert s.scalars(select(Hub.id)).all() == ["far/77/a"]
    # Once that hub is gone (heartbeat older than the lease), a hub starts.
    hubs.stopped(database, "far/77/a")
    owner = new_owner()
    hubs.register(database, owner, lease=LEASE, single=True)
    hubs.check_alone(database, LEASE)  # the only live one is this process


def test_of_two_hubs_starting_at_once_on_sqlite_one_is_refused(database: Database) -> None:
    """The registration writes its row before it looks for others: the
    second writer waits for the first one's transaction, then sees it.
    PostgreSQL takes both."""
    sqlite = database.url.get_backend_name() == "sqlite"

    def start(owner: str, barrier: threading.Barrier, outcome: dict[str, str]) -> None:
        barrier.wait()
        try:
            hubs.register(database, owner, lease=LEASE, single=sqlite)
            outcome[owner] = "started"
        except hubs.SecondHubRefused:
            outcome[owner] = "refused"

    for round_ in range(10):
        barrier = threading.Barrier(2)
        outcome: dict[str, str] = {}
        owners = [f"far{round_}/1/a", f"far{round_}/2/b"]  # other hosts: judged by heartbeat
        threads = [threading.Thread(target=start, args=(o, barrier, outcome)) for o in owners]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        expected = ["refused", "started"] if sqlite else ["started", "started"]
        assert sorted(outcome.values()) == expected, outcome
        for owner, value in outcome.items():
            if value == "started":
                hubs.stopped(database, owner)
