"""Pull mode on the node (issue 11): what the worker is told, what it serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from sendense.core.errors import Error, InvalidRequest
from sendense.node import pull
from sendense.protocol.node import BackupStartRequest, WorkerJob
from sendense.settings import NodeSettings


def job(transfer: str = "pull", backup_type: str = "full") -> WorkerJob:
    request = BackupStartRequest.model_validate(
        {
            "job_id": "job-1",
            "vm_name": "web1",
            "source": {"type": "qemu", "config": {"vms": []}},
            "nbd_targets": "2000:nbd://pull/sendense-b1",
            "backup_type": backup_type,
            "transfer": transfer,
        }
    )
    return WorkerJob.from_request(
        request,
        job_dir=Path("/nonexistent"),
        in_flight=8,
        request_size=4 << 20,
        max_rate=0,
        digest="x3-64k",
        parallel_disks=1,
    )


@pytest.mark.parametrize(
    ("settings", "hub_reached", "bind", "advertise"),
    [
        # Loopback node (tests, demos): served and announced on loopback.
        ({}, "127.0.0.1", "127.0.0.1", "127.0.0.1"),
        # --host given to `node serve` counts, not only the environment.
        ({"host": "10.0.0.5"}, "node5.example", "10.0.0.5", "10.0.0.5"),
        # Every interface: announced where the hub reached the node's API.
        ({"host": "0.0.0.0"}, "node5.example", "0.0.0.0", "node5.example"),
        ({"pull_bind": "::"}, "fd00::5", "::", "fd00::5"),
        # An explicit announcement wins (NAT, a name the hub resolves).
        (
            {"host": "0.0.0.0", "pull_advertise_host": "node5.lan"},
            "node5.example",
            "0.0.0.0",
            "node5.lan",
        ),
    ],
)
def test_worker_is_told_where_to_serve(
    settings: dict[str, str], hub_reached: str, bind: str, advertise: str
) -> None:
    s = NodeSettings(transfer="pull", pull_port_first=20000, pull_port_last=20009, **settings)
    out = pull.for_worker(job(), s, hub_reached)
    assert (out.pull_bind, out.pull_advertise_host) == (bind, advertise)
    assert (out.pull_port_first, out.pull_port_last) == (20000, 20009)


def test_a_push_job_is_left_alone() -> None:
    j = job(transfer="push")
    assert pull.for_worker(j, NodeSettings(transfer="pull"), "h") is j


def test_requests_a_node_refuses() -> None:
    with pytest.raises(InvalidRequest, match="does not serve pulls"):
        pull.check_request(job(), NodeSettings(transfer="push"))
    with pytest.raises(InvalidRequest, match="full backups only"):
        pull.check_request(job(backup_type="incremental"), NodeSettings(transfer="pull"))
    pull.check_request(job(transfer="push"), NodeSettings(transfer="push"))


def test_the_frozen_view_is_reexported_from_its_url() -> None:
    assert pull._nbd_opts("nbd+unix:///sendense-x-2000?socket=/run/vm/nbd,1.sock") == (
        "driver=nbd,server.type=unix,server.path=/run/vm/nbd,,1.sock,export=sendense-x-2000"
    )
    assert pull._nbd_opts("nbd://10.0.0.7:10809/disk") == (
        "driver=nbd,server.type=inet,server.host=10.0.0.7,server.port=10809,export=disk"
    )
    with pytest.raises(Error, match="plain NBD only"):
        pull._nbd_opts("nbds://10.0.0.7/disk")
