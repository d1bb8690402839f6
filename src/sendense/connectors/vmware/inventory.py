"""Discovery: the VMs of a vCenter and their disks, through the property
collector (one ``RetrievePropertiesEx`` per datacenter, paged).

A VM's ``vm_path`` is its inventory path, ``/<datacenter>/vm/<folders>/<name>``
(the path ``SearchIndex.FindByInventoryPath`` takes, with a leading slash).
Its name in Sendense is its vCenter name; when two VMs share a name (in other
folders or datacenters), both are named ``<name>@<managed object id>``
(``web1@vm-42``: unique in the vCenter, and no ``/`` to escape in URLs).

Disks, in the order of their device keys (2000, 2001, ... on vSphere: the
key of a disk is 2000 + 16 * controller bus + unit on SCSI): key, label
("Hard disk 1"), capacity (``capacityInBytes``, else ``capacityInKB``; some
servers leave the former unset), the backing's datastore path
(``[datastore1] web1/web1.vmdk``), thin or thick, whether the backing already
has a parent (a linked clone or a snapshot delta), and its change id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pyVmomi import vim

from sendense.connectors.base import DiskInfo, VmInfo
from sendense.connectors.vmware.session import Session
from sendense.core.errors import InvalidRequest, NotFound

VM_PROPERTIES = [
    "name",
    "parent",
    "runtime.powerState",
    "config.hardware.device",
    "config.changeTrackingEnabled",
    "config.template",
    "snapshot",
]
DATASTORE_PATH = re.compile(r"^\[(?P<ds>[^\]]+)\]\s*(?P<path>.*)$")


@dataclass
class VmwareDisk(DiskInfo):
    datastore: str = ""
    file: str = ""  # path of the descriptor inside the datastore
    thin: bool = False
    has_parent: bool = False
    flat: bool = True  # a FlatVer2 backing (a file the /folder path can serve)
    change_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = super().as_dict()
        out.update(
            datastore=self.datastore,
            provisioning="thin" if self.thin else "thick",
            thin_provisioned=self.thin,
        )
        return out


@dataclass
class VmwareVm(VmInfo):
    ref: Any = None  # vim.VirtualMachine
    moref: str = ""
    vcenter_name: str = ""
    power_state: str = ""
    cbt_enabled: bool = False
    has_snapshots: bool = False
    snapshot_tree: list[Any] = field(default_factory=list)
    vmware_disks: list[VmwareDisk] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = super().as_dict()
        out.update(
            vm_path=self.path,
            moref=self.moref,
            power_state=self.power_state,
            changed_block_tracking=self.cbt_enabled,
            has_snapshots=self.has_snapshots,
        )
        return out


def parse_datastore_path(path: str) -> tuple[str, str]:
    """``"[ds1] web1/web1.vmdk"`` -> ("ds1", "web1/web1.vmdk")."""
    m = DATASTORE_PATH.match(path)
    if not m:
        return "", path
    return m.group("ds"), m.group("path")


def disks_of(devices: list[Any]) -> list[VmwareDisk]:
    """The virtual disks among ``devices`` in key order."""
    found = sorted(
        (d for d in devices or [] if isinstance(d, vim.vm.device.VirtualDisk)), key=lambda d: d.key
    )
    out = []
    for index, d in enumerate(found):
        backing = d.backing
        file_name = getattr(backing, "fileName", "") or ""
        ds, rel = parse_datastore_path(file_name)
        capacity = int(getattr(d, "capacityInBytes", 0) or 0) or int(d.capacityInKB or 0) * 1024
        label = d.deviceInfo.label if d.deviceInfo is not None else f"disk {d.key}"
        out.append(
            VmwareDisk(
                index=index,
                key=int(d.key),
                label=label,
                capacity_bytes=capacity,
                path=file_name,
                node_name="",
                datastore=ds,
                file=rel,
                thin=bool(getattr(backing, "thinProvisioned", False)),
                has_parent=getattr(backing, "parent", None) is not None,
                flat=isinstance(backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo),
                change_id=getattr(backing, "changeId", None) or None,
            )
        )
    return out


def datacenters(session: Session) -> list[tuple[Any, str]]:
    """(datacenter, its inventory path without the leading slash), limited to
    ``config.datacenter`` when set (by name or path)."""
    found = []
    folders: dict[Any, tuple[str, Any]] = {}
    dcs = []
    for obj, props in session.retrieve_all(
        session.content.rootFolder,
        {vim.Folder: ["name", "parent"], vim.Datacenter: ["name", "parent"]},
    ):
        if isinstance(obj, vim.Datacenter):
            dcs.append((obj, props))
        else:
            folders[obj] = (props.get("name", ""), props.get("parent"))
    root = session.content.rootFolder
    for dc, props in dcs:
        parts = [props.get("name", "")]
        parent = props.get("parent")
        while parent is not None and parent != root and parent in folders:
            name, parent = folders[parent]
            parts.append(name)
        found.append((dc, "/".join(reversed(parts))))
    wanted = session.cfg.datacenter
    if wanted:
        wanted = wanted.strip("/")
        found = [x for x in found if wanted in (x[1], x[1].rsplit("/", 1)[-1])]
        if not found:
            raise InvalidRequest(
                f"source.config.datacenter: no datacenter {session.cfg.datacenter} in vCenter "
                f"{session.cfg.netloc}",
                fields=["source.config.datacenter"],
            )
    return found


def list_vms(session: Session) -> list[VmwareVm]:
    out: list[VmwareVm] = []
    for dc, dc_path in datacenters(session):
        vm_folder = session.retrieve(dc, ["vmFolder"])["vmFolder"]
        folders: dict[Any, tuple[str, Any]] = {}
        vms = []
        for obj, props in session.retrieve_all(
            vm_folder,
            {vim.Folder: ["name", "parent"], vim.VirtualMachine: VM_PROPERTIES},
        ):
            if isinstance(obj, vim.VirtualMachine):
                vms.append((obj, props))
            else:
                folders[obj] = (props.get("name", ""), props.get("parent"))
        for obj, props in vms:
            if props.get("config.template"):
                continue
            parts = [props.get("name", "")]
            parent = props.get("parent")
            while parent is not None and parent != vm_folder and parent in folders:
                name, parent = folders[parent]
                parts.append(name)
            path = f"/{dc_path}/vm/" + "/".join(reversed(parts))
            disks = disks_of(props.get("config.hardware.device") or [])
            snapshot = props.get("snapshot")
            tree = list(snapshot.rootSnapshotList) if snapshot is not None else []
            out.append(
                VmwareVm(
                    name=props.get("name", ""),
                    path=path,
                    disks=list(disks),
                    ref=obj,
                    moref=obj._moId,
                    vcenter_name=props.get("name", ""),
                    power_state=str(props.get("runtime.powerState", "")),
                    cbt_enabled=bool(props.get("config.changeTrackingEnabled")),
                    has_snapshots=bool(tree),
                    snapshot_tree=tree,
                    vmware_disks=disks,
                )
            )
    counts: dict[str, int] = {}
    for vm in out:
        counts[vm.name] = counts.get(vm.name, 0) + 1
    for vm in out:
        if counts[vm.name] > 1:
            vm.name = f"{vm.vcenter_name}@{vm.moref}"
    return sorted(out, key=lambda v: v.path)


def find_vm(session: Session, name: str) -> VmwareVm:
    """The VM Sendense calls ``name`` (its name, or its inventory path)."""
    vms = list_vms(session)
    for vm in vms:
        if name in (vm.name, vm.path, f"{vm.vcenter_name}@{vm.moref}"):
            return vm
    raise NotFound(f"VM {name} not found in vCenter {session.cfg.netloc}")


def snapshots(tree: list[Any]) -> list[Any]:
    """Every snapshot of a ``rootSnapshotList``, depth first."""
    out = []
    stack = list(tree)
    while stack:
        node = stack.pop(0)
        out.append(node)
        stack[:0] = list(node.childSnapshotList or [])
    return out
