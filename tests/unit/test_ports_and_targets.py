from __future__ import annotations

import socket

import pytest

from fixtures.cluster import port_range
from sendense.core.errors import PortsExhausted
from sendense.nbd.ports import PortAllocator
from sendense.node.worker import parse_targets


def test_ports_are_never_handed_out_twice_and_come_back() -> None:
    first, last = port_range(4)
    ports = PortAllocator(first, last)
    got = {ports.allocate() for _ in range(4)}
    assert got == set(range(first, last + 1))
    with pytest.raises(PortsExhausted, match=f"{first}-{last}"):
        ports.allocate()
    ports.release(first + 2)
    assert ports.allocate() == first + 2


def test_ports_in_use_by_another_program_are_skipped() -> None:
    first, last = port_range(4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", first))
        s.listen()
        ports = PortAllocator(first, last)
        assert first not in {ports.allocate() for _ in range(3)}


def test_parse_targets() -> None:
    spec = "2000:nbd://127.0.0.1:10100/a,2001:nbd://127.0.0.1:10101/b"
    assert parse_targets(spec) == {
        2000: "nbd://127.0.0.1:10100/a",
        2001: "nbd://127.0.0.1:10101/b",
    }


@pytest.mark.parametrize("bad", ["", "x:nbd://h:1/e", "2000:http://h/e", "2000"])
def test_parse_targets_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_targets(bad)


def test_worker_processes_of_one_hub_take_disjoint_shares_of_the_range() -> None:
    """Each API worker process (hub/serve.py) hands out only its own ports,
    so two processes never give two jobs the same port."""
    first, last = port_range(width=8)
    shares = [PortAllocator(first, last, stride=2, offset=i) for i in range(2)]
    got = [[a.allocate() for _ in range(4)] for a in shares]
    assert sorted(got[0] + got[1]) == list(range(first, last + 1))
    assert not set(got[0]) & set(got[1])
    for a in shares:
        with pytest.raises(PortsExhausted):
            a.allocate()


def test_a_range_too_small_for_the_workers_is_refused() -> None:
    with pytest.raises(ValueError, match="too small for 4 hub worker processes"):
        PortAllocator(20000, 20001, stride=4, offset=3)
