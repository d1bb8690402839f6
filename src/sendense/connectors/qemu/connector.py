"""QEMU connector: a VM is a running QEMU or qemu-storage-daemon reached
through its QMP socket.

Point in time (QMP, qemu >= 7.0), for all disks at once::

    blockdev-add  sendense-fleece-<i>: qcow2 overlay (node-local temp file)
                  backed by the disk's node
    transaction [ block-dirty-bitmap-add    <disk> <new change id> (persistent)
                  block-dirty-bitmap-disable <disk> <previous change id>   (incremental)
                  blockdev-backup <disk> -> fleece, sync=none ]            (copy-before-write)
    block-export-add  nbd, read-only, node=fleece,
                      bitmaps=[<disk>/<previous change id>]                (incremental)

Guest writes after the transaction first copy the old data into the fleece
overlay, so the export reads the disk exactly as it was at the transaction.
The change id is the bitmap name; the new bitmap collects every write after
the point in time and is the next incremental's change id.

Release: exports, backup jobs and fleece nodes always go. On success the
previous bitmap is removed. On failure the new bitmap is merged back into the
previous one, which is re-enabled, so the chain's change id stays valid.
A previous bitmap that qemu loaded as inconsistent (the VM stopped uncleanly)
cannot be used, merged or enabled: that disk is read in full, and the bitmap
is removed once that backup succeeded.

Leftovers of a node or worker that died (``sendense-*`` exports, jobs, nodes,
disabled bitmaps) are cleaned up before the next freeze.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import nbd

from sendense.connectors.base import DiskInfo, DiskView, PointInTime, VmInfo
from sendense.core.errors import InvalidRequest, NotFound, QmpError
from sendense.qemu import img
from sendense.qemu.qmp import QmpClient

log = logging.getLogger(__name__)

PREFIX = "sendense-"
BITMAP_GRANULARITY = 64 * 1024
FIRST_DISK_KEY = 2000
INTERNAL_DRIVERS = {"copy-before-write", "snapshot-access", "throttle"}


def new_change_id() -> str:
    return f"{PREFIX}{uuid.uuid4().hex[:16]}"


def list_disks(qmp: QmpClient, explicit: list[str] | None = None) -> list[dict[str, Any]]:
    """The VM's disks in order, as ``query-named-block-nodes`` entries.

    QEMU with devices: the root node of each guest device (``query-block``).
    qemu-storage-daemon: the top nodes of its block graph (not a child of another
    node), in creation order; or the node names given in the source config.
    """
    nodes = qmp.execute("query-named-block-nodes", flat=True)
    by_name = {n["node-name"]: n for n in nodes}
    if explicit:
        missing = [n for n in explicit if n not in by_name]
        if missing:
            raise NotFound(f"block node(s) {', '.join(missing)} not found in the VM")
        return [by_name[n] for n in explicit]
    devices = [
        b for b in qmp.execute("query-block") if b.get("inserted") and b.get("qdev") is not None
    ]
    if devices:
        out = []
        for b in devices:
            name = b["inserted"]["node-name"]
            if name in by_name:
                entry = dict(by_name[name])
                entry["_label"] = b.get("device") or b.get("qdev") or name
                out.append(entry)
        return out
    graph = qmp.execute("x-debug-query-block-graph")
    ids = {n["id"]: n for n in graph["nodes"]}
    children = {
        e["child"] for e in graph["edges"] if ids.get(e["parent"], {}).get("type") == "block-driver"
    }
    tops = {
        n["name"] for n in graph["nodes"] if n["type"] == "block-driver" and n["id"] not in children
    }
    # query-named-block-nodes lists the newest node first.
    ordered = [n for n in reversed(nodes) if n["node-name"] in tops]
    return [
        n
        for n in ordered
        if not n["node-name"].startswith(PREFIX) and n["drv"] not in INTERNAL_DRIVERS
    ]


def _disk_info(index: int, node: dict[str, Any]) -> DiskInfo:
    return DiskInfo(
        index=index,
        key=FIRST_DISK_KEY + index,
        label=node.get("_label") or node["node-name"],
        capacity_bytes=int(node["image"]["virtual-size"]),
        path=node.get("file", ""),
        node_name=node["node-name"],
    )


def _bitmaps(node: dict[str, Any]) -> dict[str, dict[str, Any]]:
    # Anonymous bitmaps (a running backup job's own) have no name.
    return {b["name"]: b for b in node.get("dirty-bitmaps", []) or [] if "name" in b}


class QemuConnector:
    """Connector over the ``qemu`` source config:
    ``{"vms": [{"name", "qmp_socket", "disks"?: [node names]}]}``."""

    def __init__(self, config: dict[str, Any], *, workdir: str) -> None:
        vms = config.get("vms")
        if not isinstance(vms, list) or not vms:
            raise InvalidRequest("source.config.vms must be a non-empty list")
        for vm in vms:
            if not isinstance(vm, dict) or not vm.get("name") or not vm.get("qmp_socket"):
                raise InvalidRequest("each source.config.vms entry needs name and qmp_socket")
        self.vms = {v["name"]: v for v in vms}
        self.workdir = Path(workdir)
        self.qmp: QmpClient | None = None
        self._state: dict[str, Any] = {}

    # -- discovery ---------------------------------------------------------

    def discover(self) -> list[VmInfo]:
        out = []
        for name, vm in self.vms.items():
            with QmpClient(vm["qmp_socket"]) as qmp:
                disks = [_disk_info(i, n) for i, n in enumerate(list_disks(qmp, vm.get("disks")))]
            out.append(VmInfo(name=name, path=vm["qmp_socket"], disks=disks))
        return out

    # -- point in time -----------------------------------------------------

    def freeze(
        self, vm_name: str, disk_keys: list[int], previous_change_ids: dict[int, str]
    ) -> PointInTime:
        vm = self.vms.get(vm_name)
        if vm is None:
            raise NotFound(f"VM {vm_name} is not in this source")
        self.workdir.mkdir(parents=True, exist_ok=True)
        qmp = QmpClient(vm["qmp_socket"]).connect()
        self.qmp = qmp
        st: dict[str, Any] = {
            "fleece": [],
            "exports": [],
            "jobs": [],
            "bitmaps": [],
            "unusable": [],
        }
        self._state = st
        self._cleanup_stale(qmp, previous_change_ids.values())
        nodes = list_disks(qmp, vm.get("disks"))
        disks = [_disk_info(i, n) for i, n in enumerate(nodes)]
        by_key = {d.key: (d, nodes[d.index]) for d in disks}
        unknown = [k for k in disk_keys if k not in by_key]
        if unknown:
            raise NotFound(f"disk key(s) {unknown} not found in VM {vm_name}")
        st["server_url_base"] = self._nbd_server(qmp)

        change_id = new_change_id()
        actions: list[dict[str, Any]] = []
        views: list[DiskView] = []
        for key in disk_keys:
            disk, node = by_key[key]
            prev = previous_change_ids.get(key)
            reason = None
            bitmap = None
            if prev:
                bm = _bitmaps(node).get(prev)
                if bm is None:
                    reason = (
                        f"change id {prev} not found on disk {key} (VM recreated or bitmap lost)"
                    )
                elif bm.get("inconsistent"):
                    reason = f"change id {prev} on disk {key} is inconsistent (unclean shutdown)"
                    # Unusable for good (qemu can only remove it): dropped once
                    # this full read has replaced it (release on success).
                    st["unusable"].append((disk.node_name, prev))
                else:
                    bitmap = prev
            fleece_name = f"{PREFIX}fleece-{disk.index}"
            fleece_path = self.workdir / f"fleece-{disk.index}.qcow2"
            img.create(str(fleece_path), disk.capacity_bytes)
            qmp.execute(
                "blockdev-add",
                driver="qcow2",
                **{"node-name": fleece_name},
                file={"driver": "file", "filename": str(fleece_path)},
                backing=disk.node_name,
            )
            st["fleece"].append((fleece_name, str(fleece_path)))
            persistent = node.get("drv") == "qcow2"
            actions.append(
                {
                    "type": "block-dirty-bitmap-add",
                    "data": {
                        "node": disk.node_name,
                        "name": change_id,
                        "persistent": persistent,
                        "granularity": BITMAP_GRANULARITY,
                    },
                }
            )
            if bitmap:
                actions.append(
                    {
                        "type": "block-dirty-bitmap-disable",
                        "data": {"node": disk.node_name, "name": bitmap},
                    }
                )
            actions.append(
                {
                    "type": "blockdev-backup",
                    "data": {
                        "job-id": f"{PREFIX}backup-{disk.index}",
                        "device": disk.node_name,
                        "target": fleece_name,
                        "sync": "none",
                        "auto-finalize": True,
                        "auto-dismiss": True,
                    },
                }
            )
            views.append(
                DiskView(
                    disk=disk,
                    nbd_url="",
                    dirty_context=f"qemu:dirty-bitmap:{bitmap}" if bitmap else None,
                    fallback_reason=reason,
                    new_change_id=change_id,
                )
            )
            st["bitmaps"].append((disk.node_name, change_id, bitmap))
        qmp.execute("transaction", actions=actions)
        st["frozen"] = True
        st["jobs"] = [f"{PREFIX}backup-{by_key[k][0].index}" for k in disk_keys]
        for view in views:
            export = f"{PREFIX}{change_id}-{view.disk.key}"
            args: dict[str, Any] = {
                "type": "nbd",
                "id": export,
                "node-name": f"{PREFIX}fleece-{view.disk.index}",
                "name": export,
                "writable": False,
            }
            if view.dirty_context:
                bitmap = view.dirty_context.split(":", 2)[2]
                args["bitmaps"] = [{"node": view.disk.node_name, "name": bitmap}]
            qmp.execute("block-export-add", **args)
            st["exports"].append(export)
            view.nbd_url = st["server_url_base"].format(export=export)
        return PointInTime(views=views)

    def _nbd_server(self, qmp: QmpClient) -> str:
        """Start an NBD server in the VM process, or find the one it runs.

        qemu allows one NBD server per process, and QMP cannot say where a
        running one listens; we find it from the process's listening sockets.
        """
        sock = self.workdir / "nbd.sock"
        try:
            qmp.execute(
                "nbd-server-start",
                addr={"type": "unix", "data": {"path": str(sock)}},
                **{"max-connections": 0},
            )
            self._state["server_started"] = True
            return f"nbd+unix:///{{export}}?socket={sock}"
        except QmpError as e:
            if "already running" not in e.message:
                raise
        for url in _listening_sockets(qmp.peer_pid(), exclude=qmp.path):
            if _is_nbd_server(url.format(export="")):
                return url
        raise QmpError("the VM runs an NBD server but its address could not be found")

    def release(self, success: bool) -> None:
        qmp = self.qmp
        if qmp is None:
            return
        st = self._state
        errors: list[str] = []

        def attempt(what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
            try:
                fn(*args, **kwargs)
            except Exception as e:  # cleanup must go on; the first error wins
                log.warning("release step=%s error=%s", what, e)
                errors.append(f"{what}: {e}")

        for export in st.get("exports", []):
            attempt("export", _del_export, qmp, export)
        for job in st.get("jobs", []):
            attempt("job", _cancel_job, qmp, job)
        for name, path in st.get("fleece", []):
            attempt("fleece", qmp.execute, "blockdev-del", **{"node-name": name})
            with contextlib.suppress(OSError):
                os.unlink(path)
        if st.get("frozen"):
            for node, new, prev in st.get("bitmaps", []):
                if success:
                    if prev:
                        attempt("bitmap", _remove_bitmap, qmp, node, prev)
                else:
                    if prev:
                        attempt("bitmap", _restore_bitmap, qmp, node, prev, new)
                    attempt("bitmap", _remove_bitmap, qmp, node, new)
            if success:
                for node, name in st.get("unusable", []):
                    attempt("bitmap", _remove_bitmap, qmp, node, name)
        if st.get("server_started"):
            attempt("nbd-server", qmp.execute, "nbd-server-stop")
        qmp.close()
        self.qmp = None
        if errors:
            log.warning("release finished with errors=%d", len(errors))

    def _cleanup_stale(self, qmp: QmpClient, wanted: Any) -> None:
        """Remove what a dead worker left in the VM, so the next freeze works."""
        wanted = set(wanted)
        for exp in qmp.execute("query-block-exports"):
            if exp["id"].startswith(PREFIX):
                log.info("stale export=%s removed", exp["id"])
                _del_export(qmp, exp["id"])
        for job in qmp.execute("query-block-jobs"):
            if job["device"].startswith(PREFIX):
                log.info("stale job=%s cancelled", job["device"])
                _cancel_job(qmp, job["device"])
        nodes = qmp.execute("query-named-block-nodes", flat=True)
        for n in nodes:
            if n["node-name"].startswith(f"{PREFIX}fleece-"):
                log.info("stale node=%s removed", n["node-name"])
                with contextlib.suppress(QmpError):
                    qmp.execute("blockdev-del", **{"node-name": n["node-name"]})
        for n in nodes:
            bms = _bitmaps(n)
            for name, bm in bms.items():
                # An inconsistent bitmap (the VM stopped uncleanly while it was
                # loaded) also shows recording=false, but qemu refuses to merge
                # into it or enable it: leave it to freeze, which reports it and
                # falls back to a full read. Trying here failed every backup.
                if not name.startswith(PREFIX) or bm.get("recording", True):
                    continue
                if bm.get("inconsistent"):
                    continue
                # A disabled Sendense bitmap: a worker died between freeze and
                # release. Give it back every write since (the newer bitmaps),
                # so the catalog's change id stays valid (over-copying is safe).
                newer = [
                    b
                    for b, v in bms.items()
                    if b != name and b.startswith(PREFIX) and not v.get("inconsistent")
                ]
                if newer:
                    qmp.execute(
                        "block-dirty-bitmap-merge", node=n["node-name"], target=name, bitmaps=newer
                    )
                qmp.execute("block-dirty-bitmap-enable", node=n["node-name"], name=name)
                log.info("stale disabled bitmap=%s re-enabled", name)


def _del_export(qmp: QmpClient, export: str) -> None:
    qmp.execute("block-export-del", id=export, mode="hard")
    with contextlib.suppress(QmpError):
        qmp.wait_event("BLOCK_EXPORT_DELETED", timeout=10, id=export)


def _cancel_job(qmp: QmpClient, job: str) -> None:
    try:
        qmp.execute("block-job-cancel", device=job, force=True)
    except QmpError as e:
        if "not found" in e.message.lower() or "no active" in e.message.lower():
            return
        raise
    with contextlib.suppress(QmpError):
        qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=10, device=job)


def _remove_bitmap(qmp: QmpClient, node: str, name: str) -> None:
    qmp.execute("block-dirty-bitmap-remove", node=node, name=name)


def _restore_bitmap(qmp: QmpClient, node: str, prev: str, new: str) -> None:
    qmp.execute("block-dirty-bitmap-merge", node=node, target=prev, bitmaps=[new])
    qmp.execute("block-dirty-bitmap-enable", node=node, name=prev)


def _listening_sockets(pid: int, *, exclude: str) -> list[str]:
    """NBD URL templates for the listening sockets of process ``pid``."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    urls = []
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            # Flags 00010000 = __SO_ACCEPTCON (listening).
            if len(parts) >= 8 and parts[6] in inodes and parts[3] == "00010000":
                path = parts[7]
                if path != exclude and os.path.abspath(path) != os.path.abspath(exclude):
                    urls.append(f"nbd+unix:///{{export}}?socket={path}")
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] != "0A" or parts[9] not in inodes:  # 0A = LISTEN
                    continue
                port_hex = parts[1].rsplit(":", 1)[1]
                port = int(port_hex, 16)
                host = "127.0.0.1" if table.endswith("tcp") else "[::1]"
                urls.append(f"nbd://{host}:{port}/{{export}}")
    return urls


def _is_nbd_server(url: str) -> bool:
    h = nbd.NBD()
    try:
        h.set_opt_mode(True)
        h.connect_uri(url)
        h.opt_abort()
        return True
    except nbd.Error:
        return False
    finally:
        with contextlib.suppress(Exception):
            h.shutdown()
