"""The QEMU connector against a real qemu-storage-daemon."""

from __future__ import annotations

import os
from pathlib import Path

import nbd
import pytest

from sendense.connectors.qemu.connector import QemuConnector
from sendense.core.errors import NotFound
from sendense.qemu.qmp import QmpClient


def leftovers(qmp_socket: str) -> dict[str, list[str]]:
    with QmpClient(qmp_socket) as qmp:
        nodes = qmp.execute("query-named-block-nodes", flat=True)
        return {
            "nodes": [n["node-name"] for n in nodes if n["node-name"].startswith("sendense-")],
            "exports": [
                e["id"]
                for e in qmp.execute("query-block-exports")
                if e["id"].startswith("sendense-")
            ],
            "jobs": [j["device"] for j in qmp.execute("query-block-jobs")],
        }


def bitmaps(qmp_socket: str, node: str = "disk0") -> dict[str, dict]:
    with QmpClient(qmp_socket) as qmp:
        for n in qmp.execute("query-named-block-nodes", flat=True):
            if n["node-name"] == node:
                return {b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b}
    return {}


def dirty_extents(url: str, context: str, size: int) -> list[tuple[int, int]]:
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(url)
    out: list[tuple[int, int]] = []

    def cb(ctx: str, offset: int, entries: list[int], err: object) -> int:
        pos = offset
        for i in range(0, len(entries), 2):
            if entries[i + 1] & 1:
                out.append((pos, entries[i]))
            pos += entries[i]
        return 0

    h.block_status(size, 0, cb)
    h.shutdown()
    return out


@pytest.mark.parametrize("guest_server", [True, False], ids=["vm-has-nbd-server", "no-nbd-server"])
def test_discover_freeze_release(make_vm, tmp_path: Path, guest_server: bool) -> None:
    vm = make_vm("c1", [8 << 20, 4 << 20], start=False)
    vm.start(guest_exports=guest_server)
    conn = QemuConnector(
        {"vms": [{"name": "c1", "qmp_socket": vm.qmp_socket}]}, workdir=str(tmp_path / "work")
    )
    [info] = conn.discover()
    assert [(d.key, d.node_name, d.capacity_bytes) for d in info.disks] == [
        (2000, "disk0", 8 << 20),
        (2001, "disk1", 4 << 20),
    ]

    pit = conn.freeze("c1", [2000, 2001], {})
    assert all(v.dirty_context is None for v in pit.views)
    h = nbd.NBD()
    h.connect_uri(pit.views[0].nbd_url)
    assert h.get_size() == 8 << 20
    assert h.is_read_only()
    h.shutdown()
    conn.release(True)
    assert leftovers(vm.qmp_socket) == {"nodes": [], "exports": [], "jobs": []}
    change_id = pit.views[0].new_change_id
    assert change_id in bitmaps(vm.qmp_socket)
    assert bitmaps(vm.qmp_socket)[change_id]["persistent"] is True
    assert not list((tmp_path / "work").glob("fleece-*"))


def test_failed_incremental_keeps_change_id_valid(make_vm, tmp_path: Path) -> None:
    vm = make_vm("c2", [8 << 20])
    conn = QemuConnector(
        {"vms": [{"name": "c2", "qmp_socket": vm.qmp_socket}]}, workdir=str(tmp_path / "w")
    )
    pit = conn.freeze("c2", [2000], {})
    conn.release(True)
    first = pit.views[0].new_change_id
    assert first is not None
    g = vm.guest(0)
    g.pwrite(os.urandom(65536), 0)
    g.flush()
    pit = conn.freeze("c2", [2000], {2000: first})
    assert pit.views[0].dirty_context == f"qemu:dirty-bitmap:{first}"
    assert dirty_extents(pit.views[0].nbd_url, pit.views[0].dirty_context, 8 << 20) == [(0, 65536)]
    g.pwrite(os.urandom(65536), 1 << 20)  # lands after the freeze
    g.flush()
    conn.release(False)  # the job failed
    bms = bitmaps(vm.qmp_socket)
    assert list(bms) == [first]  # the new one is gone, the old one is back
    assert bms[first]["recording"] is True
    # Both writes are still tracked under the old change id.
    pit = conn.freeze("c2", [2000], {2000: first})
    assert dirty_extents(pit.views[0].nbd_url, pit.views[0].dirty_context, 8 << 20) == [
        (0, 65536),
        (1 << 20, 65536),
    ]
    conn.release(True)
    assert first not in bitmaps(vm.qmp_socket)


def test_unknown_change_id_falls_back_with_reason(make_vm, tmp_path: Path) -> None:
    vm = make_vm("c3", [4 << 20])
    conn = QemuConnector(
        {"vms": [{"name": "c3", "qmp_socket": vm.qmp_socket}]}, workdir=str(tmp_path / "w")
    )
    pit = conn.freeze("c3", [2000], {2000: "sendense-gone"})
    assert pit.views[0].dirty_context is None
    assert "sendense-gone" in (pit.views[0].fallback_reason or "")
    conn.release(True)


def test_leftovers_of_a_dead_worker_are_cleaned(make_vm, tmp_path: Path) -> None:
    vm = make_vm("c4", [4 << 20])
    cfg = {"vms": [{"name": "c4", "qmp_socket": vm.qmp_socket}]}
    first = QemuConnector(cfg, workdir=str(tmp_path / "a"))
    pit = first.freeze("c4", [2000], {})
    first.release(True)
    base = pit.views[0].new_change_id
    assert base is not None
    dead = QemuConnector(cfg, workdir=str(tmp_path / "b"))
    dead.freeze("c4", [2000], {2000: base})  # never released: the worker "died"
    dead.qmp.close()  # type: ignore[union-attr]
    assert leftovers(vm.qmp_socket)["exports"]
    assert bitmaps(vm.qmp_socket)[base]["recording"] is False
    again = QemuConnector(cfg, workdir=str(tmp_path / "c"))
    pit = again.freeze("c4", [2000], {2000: base})
    assert pit.views[0].dirty_context == f"qemu:dirty-bitmap:{base}"
    again.release(True)
    assert leftovers(vm.qmp_socket) == {"nodes": [], "exports": [], "jobs": []}


def test_unknown_vm_and_disk(make_vm, tmp_path: Path) -> None:
    vm = make_vm("c5", [4 << 20])
    conn = QemuConnector(
        {"vms": [{"name": "c5", "qmp_socket": vm.qmp_socket}]}, workdir=str(tmp_path / "w")
    )
    with pytest.raises(NotFound, match="nope"):
        conn.freeze("nope", [2000], {})
    with pytest.raises(NotFound, match="2007"):
        conn.freeze("c5", [2007], {})
    conn.release(False)
    assert leftovers(vm.qmp_socket) == {"nodes": [], "exports": [], "jobs": []}
