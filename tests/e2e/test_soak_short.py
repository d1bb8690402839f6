"""The kill -9 soak (tests/soak/soak.py), three iterations inside the suite.

Two hubs on one PostgreSQL catalog, two nodes, three qsd VMs; each iteration
an action with, most of the time, kill -9 of a hub, a node, a qemu-nbd
target, a node worker or a VM while it runs; then the invariants (every
completed restore point reads as its truth image, repository files and
records match, nothing leaked, no job past its lease) and a backup of every
VM that must complete. ``make soak`` runs the long version.

SOAK_SEED picks another seed (default: a fixed one, so the suite is
repeatable); a failure prints the seed, the step and the replay command.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from fixtures.disks import tools_missing
from soak.soak import Soak

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(bool(tools_missing()), reason=f"test disk tools missing: {tools_missing()}"),
]

SEED = int(os.environ.get("SOAK_SEED") or 20261123)


@pytest.mark.timeout(600)
def test_soak_three_iterations(pg_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    name = f"soak_{uuid.uuid4().hex[:10]}"
    soak = Soak(tmp_path, pg_server.create_database(name), seed=SEED, iterations=3, fault_rate=1.0)
    try:
        summary = soak.run()
    finally:
        soak.teardown()
        pg_server.drop_database(name)
    assert summary["soak_iterations"] == 3
    assert summary["soak_faults"] >= 1, summary
    assert summary["soak_points_checked"] > 0, summary
