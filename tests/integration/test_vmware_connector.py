"""The vmware connector against a vCenter *simulator* (govmomi's vcsim with
Sendense's CBT double, tests/vcsim), not a real vCenter: login, discovery
through the property collector, the backup snapshot, changed areas from
QueryChangedDiskAreas and reads of the base flat disk through nbdkit curl
with the session cookie, and the refusals."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import nbd
import pytest

from sendense.connectors.base import DiskView
from sendense.connectors.registry import make_connector
from sendense.connectors.vmware.config import VmwareConfig
from sendense.connectors.vmware.connector import VmwareConnector, vddk_params
from sendense.connectors.vmware.inventory import VmwareDisk
from sendense.core.errors import InvalidRequest, NeedsVddk, VsphereLoginFailed, VsphereUnreachable
from vcsim.kit import SimVm, Vcsim, running_vcsim
from vcsim.kit import vcsim as vcsim  # the fixture

MiB = 1 << 20
BLOCK = 64 << 10


def connector(sim: Vcsim, workdir: Path, **changes: Any) -> VmwareConnector:
    c = make_connector(
        {"type": "vmware", "config": sim.source_config(**changes)}, workdir=str(workdir)
    )
    assert isinstance(c, VmwareConnector)
    return c


def read_all(view: DiskView) -> bytes:
    h = nbd.NBD()
    h.connect_uri(view.nbd_url)
    try:
        size = h.get_size()
        out = bytearray()
        for offset in range(0, size, 4 * MiB):
            out += h.pread(min(4 * MiB, size - offset), offset)
        return bytes(out)
    finally:
        h.shutdown()


def allocation(view: DiskView) -> list[tuple[int, int, int]]:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(view.nbd_url)
    found: list[tuple[int, int, int]] = []

    def cb(ctx: str, offset: int, entries: list[int], err: object) -> int:
        pos = offset
        for i in range(0, len(entries), 2):
            found.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    try:
        size = h.get_size()
        offset = 0
        while offset < size:
            h.block_status(size - offset, offset, cb)
            offset = found[-1][0] + found[-1][1]
    finally:
        h.shutdown()
    return [(o, n, f) for o, n, f in found if not f & 2]  # data extents only


def scribble(vm: SimVm, rng: random.Random, count: int = 6) -> None:
    """Guest writes of random data at random places of every disk."""
    for disk in vm.disks:
        for _ in range(count):
            length = rng.choice([512, 4096, BLOCK, 3 * BLOCK + 17])
            disk.write(rng.randrange(0, disk.capacity - length), rng.randbytes(length))


@pytest.fixture
def web1(vcsim: Vcsim) -> SimVm:
    vm = vcsim.create_vm("web1", [(16 * MiB, True), (8 * MiB, False)])
    scribble(vm, random.Random(1))
    return vm


def test_discovery_reads_vms_and_disks_through_the_property_collector(
    vcsim: Vcsim, web1: SimVm, tmp_path: Path
) -> None:
    """vCenter simulator: the VM's inventory path, power state, CBT flag, own
    snapshots, and per disk its key, label, capacity, datastore path, thin/thick."""
    vms = {vm.name: vm.as_dict() for vm in connector(vcsim, tmp_path).discover()}
    got = vms["web1"]
    assert got["path"] == got["vm_path"] == "/DC0/vm/web1"
    assert got["power_state"] == "poweredOn"
    assert got["changed_block_tracking"] is False
    assert got["has_snapshots"] is False
    assert [
        (d["disk_key"], d["disk_index"], d["label"], d["capacity_bytes"], d["path"])
        for d in got["disks"]
    ] == [
        (2000, 0, "Hard disk 1", 16 * MiB, "[LocalDS_0] web1/web1.vmdk"),
        (2001, 1, "Hard disk 2", 8 * MiB, "[LocalDS_0] web1/web1_1.vmdk"),
    ]
    assert [d["provisioning"] for d in got["disks"]] == ["thin", "thick"]
    assert [d["size_gb"] for d in got["disks"]] == [0.016, 0.008]
    # The simulator's own VMs are there too (a whole inventory, not one folder).
    assert len(vms) >= 3


def test_full_then_incremental_read_the_snapshot_state(
    vcsim: Vcsim, web1: SimVm, tmp_path: Path
) -> None:
    """vCenter simulator + CBT double: a full read serves the flat file as it
    was at the snapshot, with only the allocated areas as data; CBT is turned
    on by the first backup; the next snapshot's changed areas are exactly the
    blocks the guest wrote; the snapshot and the readers go at release."""
    c = connector(vcsim, tmp_path / "w1")
    pit = c.freeze("web1", [2000, 2001], {})
    try:
        assert len(vcsim.snapshot_names("web1")) == 1
        assert vcsim.snapshot_names("web1")[0].startswith("sendense-backup-")
        first = {}
        for view in pit.views:
            disk = web1.disk(view.disk.key)
            assert not view.incremental and view.fallback_reason is None
            assert view.new_change_id
            assert read_all(view) == disk.read()
            data = sum(n for _, n, _ in allocation(view))
            if disk.thin:  # only its 64 KiB blocks holding data are data
                assert 0 < data <= 6 * 4 * BLOCK
            else:  # vSphere answers a thick disk's allocated areas as all of it
                assert data == disk.capacity
            first[view.disk.key] = view.new_change_id
        argv = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _nbdkit_pids(vcsim)]
        assert argv and all(b"cookie=+" in a for a in argv)
        assert not any(b"vmware_soap_session" in a for a in argv)  # never on argv
    finally:
        c.release(True)
    assert vcsim.snapshot_names("web1") == []
    assert _nbdkit_pids(vcsim) == []
    assert vcsim.retrieve(vcsim.find_vm("web1"), ["config.changeTrackingEnabled"]) == {
        "config.changeTrackingEnabled": True
    }
    assert vcsim.state()["folder_refused"] == 0
    assert not list((tmp_path / "w1").glob("vsphere-*")), "secret files left"

    disk = web1.disk(2000)
    disk.write(5 * BLOCK + 100, b"x" * 10)
    disk.write(9 * BLOCK, b"y" * (2 * BLOCK))
    c = connector(vcsim, tmp_path / "w2")
    pit = c.freeze("web1", [2000, 2001], first)
    try:
        views = {v.disk.key: v for v in pit.views}
        assert views[2000].incremental and views[2000].fallback_reason is None
        assert views[2000].changed_extents == [(5 * BLOCK, BLOCK), (9 * BLOCK, 2 * BLOCK)]
        assert views[2001].changed_extents == []
        assert views[2000].new_change_id != first[2000]
        assert read_all(views[2000]) == disk.read()
    finally:
        c.release(False)
    assert vcsim.snapshot_names("web1") == []


def test_changed_areas_are_asked_for_in_pages(tmp_path: Path) -> None:
    """vCenter simulator answering QueryChangedDiskAreas 1 MiB at a time (as
    vSphere may answer less than the whole disk): the connector pages on
    startOffset + length and gets every area."""
    with running_vcsim(tmp_path / "vcsim", qcda_page=MiB) as sim:
        vm = sim.create_vm("paged", [(8 * MiB, True)])
        disk = vm.disks[0]
        for offset in (0, MiB - 10, 3 * MiB + BLOCK, 8 * MiB - BLOCK):
            disk.write(offset, b"z" * 20 if offset != 8 * MiB - BLOCK else b"e" * BLOCK)
        c = connector(sim, tmp_path / "w")
        pit = c.freeze("paged", [2000], {})
        try:
            data = allocation(pit.views[0])
            assert [(o, n) for o, n, _ in data] == [
                (0, BLOCK),
                (MiB - BLOCK, 2 * BLOCK),
                (3 * MiB + BLOCK, BLOCK),
                (8 * MiB - BLOCK, BLOCK),
            ]
            assert read_all(pit.views[0]) == disk.read()
        finally:
            c.release(True)


def test_unknown_change_id_reads_in_full_and_says_why(
    vcsim: Vcsim, web1: SimVm, tmp_path: Path
) -> None:
    """vCenter simulator + CBT double: a change id vSphere does not know (CBT
    reset, VM moved) turns the disk into a full read, with the reason."""
    c = connector(vcsim, tmp_path / "w1")
    c.freeze("web1", [2000], {})
    c.release(True)  # CBT is on now
    c = connector(vcsim, tmp_path / "w2")
    pit = c.freeze("web1", [2000], {2000: "52 aa bb cc/999"})
    try:
        view = pit.views[0]
        assert not view.incremental
        assert view.fallback_reason is not None
        assert "52 aa bb cc/999" in view.fallback_reason
        assert "CBT reset" in view.fallback_reason
        assert read_all(view) == web1.disk(2000).read()
    finally:
        c.release(False)
    assert vcsim.snapshot_names("web1") == []


def test_first_backup_with_cbt_off_is_a_full_with_the_reason(
    vcsim: Vcsim, web1: SimVm, tmp_path: Path
) -> None:
    """vCenter simulator: CBT off and a previous change id given (CBT was turned
    off since): CBT is enabled again and every disk is read in full, saying why."""
    c = connector(vcsim, tmp_path / "w")
    pit = c.freeze("web1", [2000, 2001], {2000: "x/1", 2001: "y/1"})
    try:
        for view in pit.views:
            assert not view.incremental
            assert "changed block tracking was off" in (view.fallback_reason or "")
    finally:
        c.release(True)


def test_vm_with_its_own_snapshots_is_refused_naming_vddk(
    vcsim: Vcsim, web1: SimVm, tmp_path: Path
) -> None:
    """vCenter simulator: without VDDK the base disk of a VM with snapshots of
    its own is not the VM's state: refused (no silent wrong backup), and the
    error says VDDK is the way. Nothing is left behind."""
    ref = vcsim.find_vm("web1")
    vcsim.wait(ref.CreateSnapshot_Task(name="before-upgrade", memory=False, quiesce=False))
    c = connector(vcsim, tmp_path / "w")
    with pytest.raises(NeedsVddk) as e:
        c.freeze("web1", [2000], {})
    c.release(False)
    assert "before-upgrade" in e.value.message
    assert "VDDK" in e.value.message and "SENDENSE_NODE_VDDK_LIBDIR" in e.value.message
    assert vcsim.snapshot_names("web1") == ["before-upgrade"]


def test_stale_backup_snapshot_of_a_dead_worker_is_removed_first(
    vcsim: Vcsim, web1: SimVm, tmp_path: Path
) -> None:
    """vCenter simulator: a sendense-backup-* snapshot left by a worker that died
    is not "a snapshot of its own": the next backup removes it and goes on."""
    ref = vcsim.find_vm("web1")
    vcsim.wait(ref.CreateSnapshot_Task(name="sendense-backup-dead", memory=False, quiesce=False))
    c = connector(vcsim, tmp_path / "w")
    pit = c.freeze("web1", [2000], {})
    try:
        names = vcsim.snapshot_names("web1")
        assert len(names) == 1 and names[0] != "sendense-backup-dead"
        assert read_all(pit.views[0]) == web1.disk(2000).read()
    finally:
        c.release(True)
    assert vcsim.snapshot_names("web1") == []


def test_wrong_password_is_a_clear_refusal_without_the_password(
    vcsim: Vcsim, tmp_path: Path
) -> None:
    """vCenter simulator: a wrong password is a 400-category error saying so,
    and neither the given nor the right password appears in it."""
    with pytest.raises(VsphereLoginFailed) as e:
        connector(vcsim, tmp_path, password="Wrong-Pa55").discover()
    assert e.value.code == "vsphere_login_failed"
    assert "refused the user name or password" in e.value.message
    assert "Wrong-Pa55" not in str(e.value.to_body())
    assert vcsim.password not in str(e.value.to_body())


def test_unreachable_vcenter_is_unavailable(tmp_path: Path) -> None:
    port = _free_port()
    c = make_connector(
        {
            "type": "vmware",
            "config": {"host": "127.0.0.1", "port": port, "user": "u", "password": "Pw-1"},
        },
        workdir=str(tmp_path),
    )
    with pytest.raises(VsphereUnreachable) as e:
        c.discover()
    assert "Pw-1" not in e.value.message


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"user": "u", "password": "Pw-1"}, "source.config.host is required"),
        ({"host": "vc", "password": "Pw-1"}, "source.config.user is required"),
        ({"host": "vc", "user": "u"}, "source.config.password is required"),
        ({"host": "https://vc/sdk", "user": "u", "password": "Pw-1"}, "source.config.host must"),
        ({"host": "vc", "user": "u", "password": "Pw-1", "port": 0}, "source.config.port must"),
        (
            {"host": "vc", "user": "u", "password": "Pw-1", "insecure": "yes"},
            "source.config.insecure",
        ),
        (
            {"host": "vc", "user": "u", "password": "Pw-1", "thumbprint": "ab:cd"},
            "source.config.thumbprint",
        ),
        (
            {"host": "vc", "user": "u", "password": "Pw-1", "pasword": "x"},
            "source.config has unknown key(s) pasword",
        ),
        ({"host": "vc", "user": "u", "password": 7}, "source.config.password must be a string"),
    ],
)
def test_config_errors_name_the_field_and_never_the_password(
    config: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequest) as e:
        VmwareConfig.parse(config)
    assert e.value.message.startswith(message), e.value.message
    assert "Pw-1" not in e.value.message
    assert "Pw-1" not in repr(VmwareConfig.parse({"host": "vc", "user": "u", "password": "Pw-1"}))


def test_config_takes_the_original_node_api_names() -> None:
    cfg = VmwareConfig.parse(
        {
            "vcenter_host": "vc.example.com",
            "vcenter_user": "u",
            "vcenter_password": "Pw-1",
            "thumbprint": "AA:" * 19 + "AA",
        }
    )
    assert (cfg.host, cfg.user, cfg.password, cfg.port) == ("vc.example.com", "u", "Pw-1", 443)
    assert cfg.thumbprint == "aa" * 20 and not cfg.verify_tls


def test_vddk_command_line_passes_the_password_by_file() -> None:
    """The VDDK path cannot run here (no VDDK, no ESXi): its nbdkit parameters
    are checked as nbdkit-vddk-plugin(1) documents them."""
    cfg = VmwareConfig.parse({"host": "vc", "user": "u", "password": "Pw-1"})
    disk = VmwareDisk(
        index=0,
        key=2000,
        label="Hard disk 1",
        capacity_bytes=MiB,
        path="[ds1] web1/web1.vmdk",
        node_name="",
        datastore="ds1",
        file="web1/web1.vmdk",
    )
    params = dict(vddk_params(cfg, "/opt/vddk", "vm-12", "snapshot-34", disk, "/run/pw", "ab" * 20))
    assert params["password"] == "+/run/pw"
    assert params["vm"] == "moref=vm-12" and params["snapshot"] == "snapshot-34"
    assert params["file"] == "[ds1] web1/web1.vmdk"
    assert params["thumbprint"] == ":".join(["AB"] * 20)
    assert "Pw-1" not in str(params)


def _nbdkit_pids(sim: Vcsim) -> list[int]:
    from vcsim.kit import nbdkit_processes

    return [pid for pid, _ in nbdkit_processes(f"127.0.0.1:{sim.port}/")]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_reader_stops_at_once_although_the_worker_blocks_sigterm(tmp_path: Path) -> None:
    """The node's worker blocks SIGTERM/SIGINT in every thread (it takes them
    with sigwait); nbdkit must not inherit that mask, or neither a stop nor
    --exit-with-parent would reach it."""
    import signal
    import time

    from sendense.connectors.vmware.nbdkit import NbdkitServer

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        server = NbdkitServer("memory", [("size", "1M")], socket_path=str(tmp_path / "m.sock"))
        server.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    started = time.monotonic()
    server.stop(timeout=5)
    assert time.monotonic() - started < 2
    assert server.poll() == 0


def test_certificate_trust_by_thumbprint_or_refused_with_its_fingerprint(
    vcsim: Vcsim, web1: SimVm, tmp_path: Path
) -> None:
    """vCenter simulator (self-signed certificate): without insecure or a
    thumbprint the certificate is refused, saying its fingerprint; with that
    fingerprint pinned, discovery and a backup read work; a wrong pin is refused."""
    from sendense.connectors.vmware.session import certificate_fingerprint
    from sendense.core.errors import VsphereCertificate

    with pytest.raises(VsphereCertificate) as e:
        connector(vcsim, tmp_path / "a", insecure=False).discover()
    cfg = VmwareConfig.parse(vcsim.source_config())
    sha256 = certificate_fingerprint(cfg, algorithm="sha256")
    sha1 = certificate_fingerprint(cfg)
    assert "not trusted" in e.value.message and "thumbprint" in e.value.message

    pinned = ":".join(sha256[i : i + 2] for i in range(0, 64, 2)).upper()
    c = connector(vcsim, tmp_path / "b", insecure=False, thumbprint=pinned)
    assert "web1" in {vm.name for vm in c.discover()}
    pit = c.freeze("web1", [2000], {})
    try:
        assert read_all(pit.views[0]) == web1.disk(2000).read()
    finally:
        c.release(True)
    with pytest.raises(VsphereCertificate) as e:
        connector(vcsim, tmp_path / "c", insecure=False, thumbprint="00" * 20).freeze(
            "web1", [2000], {}
        )
    assert sha1 in e.value.message
    assert vcsim.snapshot_names("web1") == []


def test_vms_of_the_same_name_are_told_apart(vcsim: Vcsim, tmp_path: Path) -> None:
    """vCenter simulator: two VMs called app in different folders are named
    app@<moref> (unique, no slash for URLs) and each is backed up as itself."""
    dc = vcsim.si.content.searchIndex.FindByInventoryPath("DC0")
    dc.vmFolder.CreateFolder("prod")
    first = vcsim.create_vm("app", [(4 * MiB, True)])
    first.disks[0].write(0, b"first" * 100)
    second = vcsim.create_vm("app", [(4 * MiB, True)], folder="prod")
    second.disks[0].write(0, b"second" * 100)
    found = {vm.path: vm for vm in connector(vcsim, tmp_path / "d").discover()}
    a, b = found["/DC0/vm/app"], found["/DC0/vm/prod/app"]
    assert a.name.startswith("app@vm-") and b.name.startswith("app@vm-") and a.name != b.name
    for vm, sim_vm in ((a, first), (b, second)):
        c = connector(vcsim, tmp_path / vm.name)
        pit = c.freeze(vm.name, [2000], {})
        try:
            assert read_all(pit.views[0]) == sim_vm.disks[0].read()
        finally:
            c.release(True)


def test_unknown_datacenter_is_a_config_error(vcsim: Vcsim, tmp_path: Path) -> None:
    """vCenter simulator: config.datacenter naming none of its datacenters."""
    with pytest.raises(InvalidRequest) as e:
        connector(vcsim, tmp_path, datacenter="DC9").discover()
    assert e.value.message.startswith("source.config.datacenter: no datacenter DC9")
