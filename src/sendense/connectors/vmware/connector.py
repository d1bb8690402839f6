"""VMware connector: a VM of a vCenter (or ESXi host), reached with pyVmomi.

Point in time, for all disks of the VM at once::

    (stale sendense-backup-* snapshots of a dead worker are removed first)
    refuse if the VM has snapshots of its own        (reading without VDDK)
    ReconfigVM_Task changeTrackingEnabled=true        (when off: counts from the
                                                       next snapshot on, so
                                                       every disk is read in full)
    CreateSnapshot_Task sendense-backup-<id>, memory=false, quiesce=config
    per disk: snapshot.config.hardware.device[key].backing.changeId  (new change id)
              QueryChangedDiskAreas(snapshot, key, offset, previous change id | "*")
    per disk: nbdkit curl on https://HOST/folder/<dir>/<disk>-flat.vmdk
              ?dcPath=<datacenter>&dsName=<datastore>, cookie=+FILE (the session),
              read-only, on a unix socket

While the backup snapshot exists, vSphere writes the guest's changes into a
delta file and leaves the base (``-flat.vmdk``) as it was at the snapshot: the
base disk *is* the point in time, as long as the backup snapshot is the VM's
only one. A VM with snapshots of its own has older data in its base; reading
it that way would be a silent wrong backup, so it is refused (`NeedsVddk`),
and so is a disk that is not a flat file (RDM, sesparse, a linked clone).

A full read serves the allocated areas (``changeId="*"``) through nbdkit's
extentlist filter as the export's ``base:allocation``: the rest reads as zero
and is not copied. An incremental hands the changed areas to the mover as the
disk view's ``changed_extents``. A change id vSphere rejects turns into a full
read with the reason in the job.

With VMware's VDDK (``SENDENSE_NODE_VDDK_LIBDIR`` names its directory on the
node), disks are read through ``nbdkit vddk`` from the snapshot itself
(``snapshot=<moref>``), which also works with the VM's own snapshots. That
path cannot be tested without VDDK and a real ESXi: it is built as VMware
documents it and checked only for its command line.

Release, always (success, failure, cancel): stop the nbdkit processes, remove
the backup snapshot (its task polled to the end), log out, remove the secret
files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from pyVmomi import vim

from sendense.connectors.base import DiskView, PointInTime, VmInfo
from sendense.connectors.vmware import inventory
from sendense.connectors.vmware.cbt import ChangeIdRejected, changed_areas
from sendense.connectors.vmware.config import VmwareConfig
from sendense.connectors.vmware.inventory import VmwareDisk, VmwareVm
from sendense.connectors.vmware.nbdkit import NbdkitServer
from sendense.connectors.vmware.session import (
    Session,
    certificate_fingerprint,
    check_pinned,
    wrap_fault,
)
from sendense.core.errors import Error, NeedsVddk, NotFound, SnapshotFailed

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "sendense-backup-"
VDDK_ENV = "SENDENSE_NODE_VDDK_LIBDIR"
# sun_path is 108 bytes: longer socket paths go to a private temp folder.
MAX_SOCKET_PATH = 100


def write_secret(path: Path, value: str) -> None:
    """A file only this user can read, for nbdkit's ``key=+FILE``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


def folder_url(cfg: VmwareConfig, dc_path: str, disk: VmwareDisk) -> str:
    """The HTTPS URL of a disk's base ``-flat.vmdk`` on its datastore."""
    flat = disk.file[: -len(".vmdk")] + "-flat.vmdk" if disk.file.endswith(".vmdk") else disk.file
    query = urllib.parse.urlencode({"dcPath": dc_path, "dsName": disk.datastore})
    return f"https://{cfg.netloc}/folder/{urllib.parse.quote(flat)}?{query}"


def vddk_params(
    cfg: VmwareConfig,
    libdir: str,
    vm_moref: str,
    snapshot_moref: str,
    disk: VmwareDisk,
    password_file: str,
    thumbprint: str,
) -> list[tuple[str, str]]:
    """``nbdkit vddk`` parameters for one disk of a snapshot (nbdkit-vddk-plugin(1))."""
    return [
        ("libdir", libdir),
        ("server", cfg.host.strip("[]")),
        ("port", str(cfg.port)),
        ("user", cfg.user),
        ("password", f"+{password_file}"),
        ("thumbprint", ":".join(thumbprint[i : i + 2] for i in range(0, 40, 2)).upper()),
        ("vm", f"moref={vm_moref}"),
        ("snapshot", snapshot_moref),
        ("transports", "nbdssl:nbd"),
        ("file", disk.path),
    ]


class VmwareConnector:
    """Connector over the ``vmware`` source config (see `config`)."""

    def __init__(self, config: dict[str, Any], *, workdir: str) -> None:
        self.cfg = VmwareConfig.parse(config)
        self.workdir = Path(workdir)
        self.vddk_libdir = os.environ.get(VDDK_ENV) or None
        self._session: Session | None = None
        self._vm: VmwareVm | None = None
        self._snapshot: Any = None
        self._snapshot_name = ""
        self._servers: list[NbdkitServer] = []
        self._secret_files: list[Path] = []
        self._sockdir: str | None = None

    # -- discovery ---------------------------------------------------------

    def discover(self) -> list[VmInfo]:
        session = Session(self.cfg)
        try:
            return list(inventory.list_vms(session))
        finally:
            session.close()

    # -- point in time -----------------------------------------------------

    def freeze(
        self, vm_name: str, disk_keys: list[int], previous_change_ids: dict[int, str]
    ) -> PointInTime:
        self.workdir.mkdir(parents=True, exist_ok=True)
        session = self._session = Session(self.cfg)
        vm = inventory.find_vm(session, vm_name)
        self._vm = vm
        disks = {d.key: d for d in vm.vmware_disks}
        unknown = [k for k in disk_keys if k not in disks]
        if unknown:
            raise NotFound(f"disk key(s) {unknown} not found in VM {vm_name}")
        vm = self._remove_stale_snapshots(session, vm)
        self._refuse_unreadable(vm, [disks[k] for k in disk_keys])

        reasons: dict[int, str] = {}
        if not vm.cbt_enabled:
            session.wait_task(
                f"enable changed block tracking on VM {vm.vcenter_name}",
                session.call(
                    "ReconfigVM_Task",
                    vm.ref.ReconfigVM_Task,
                    vim.vm.ConfigSpec(changeTrackingEnabled=True),
                ),
            )
            log.info("vm=%s changed block tracking enabled", vm.vcenter_name)
            for key in previous_change_ids:
                reasons[key] = (
                    "changed block tracking was off on the VM (enabled now; it counts "
                    "from this backup's snapshot on)"
                )

        name = f"{SNAPSHOT_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            task = vm.ref.CreateSnapshot_Task(
                name=name,
                description="Sendense backup: removed when the backup ends",
                memory=False,
                quiesce=self.cfg.quiesce,
            )
            self._snapshot_name = name
            self._snapshot = session.wait_task(f"create snapshot {name}", task)
        except Error as e:
            raise SnapshotFailed(f"cannot snapshot VM {vm.vcenter_name}: {e.message}") from None
        except Exception as e:
            err = wrap_fault(f"cannot snapshot VM {vm.vcenter_name}", e)
            raise SnapshotFailed(err.message, **err.details) from None
        log.info("vm=%s snapshot=%s created", vm.vcenter_name, name)
        snap_devices = session.retrieve(self._snapshot, ["config.hardware.device"])
        snap_disks = {d.key: d for d in inventory.disks_of(snap_devices["config.hardware.device"])}

        dc_path = self._datacenter_path(session, vm)
        views = []
        for key in disk_keys:
            disk = disks[key]
            snap_disk = snap_disks.get(key)
            new_id = snap_disk.change_id if snap_disk is not None else None
            if not new_id:
                raise Error(
                    f"disk {key} of VM {vm.vcenter_name} has no change id in the backup "
                    "snapshot (changed block tracking is not active on it)",
                    code="vsphere_cbt_error",
                )
            prev = previous_change_ids.get(key)
            reason = reasons.get(key)
            areas: list[tuple[int, int]] | None = None
            if prev and reason is None:
                try:
                    areas = changed_areas(
                        session, vm.ref, self._snapshot, key, disk.capacity_bytes, prev
                    )
                except ChangeIdRejected as e:
                    reason = e.message
            if areas is None:
                allocated = changed_areas(
                    session, vm.ref, self._snapshot, key, disk.capacity_bytes, "*"
                )
                server = self._serve(disk, dc_path, allocated=allocated)
            else:
                server = self._serve(disk, dc_path, allocated=None)
            views.append(
                DiskView(
                    disk=disk,
                    nbd_url=server.url,
                    dirty_context=None,
                    fallback_reason=reason,
                    new_change_id=new_id,
                    changed_extents=areas,
                )
            )
        session.start_keepalive()
        return PointInTime(views=views)

    def _remove_stale_snapshots(self, session: Session, vm: VmwareVm) -> VmwareVm:
        stale = [
            s for s in inventory.snapshots(vm.snapshot_tree) if s.name.startswith(SNAPSHOT_PREFIX)
        ]
        for s in stale:
            log.info("vm=%s stale snapshot=%s removed", vm.vcenter_name, s.name)
            self._remove_snapshot(session, s.snapshot, s.name)
        if stale:
            vm = inventory.find_vm(session, vm.path)
        return vm

    def _refuse_unreadable(self, vm: VmwareVm, disks: list[VmwareDisk]) -> None:
        if self.vddk_libdir:
            return
        if vm.has_snapshots:
            names = ", ".join(s.name for s in inventory.snapshots(vm.snapshot_tree))
            raise NeedsVddk(
                f"VM {vm.vcenter_name} has snapshots of its own ({names}): without VMware's "
                "VDDK its disks are read from their base file, which holds the state of the "
                "oldest snapshot, not the VM's. Remove or consolidate the snapshots, or install "
                f"VDDK on the node and set {VDDK_ENV}",
                vm=vm.vcenter_name,
                snapshots=names,
            )
        for d in disks:
            if not d.flat or d.has_parent or not d.datastore:
                raise NeedsVddk(
                    f"disk {d.key} ({d.label}) of VM {vm.vcenter_name} is not a flat file on a "
                    f"datastore ({d.path or 'no file'}): it can only be read through VMware's "
                    f"VDDK (install it on the node and set {VDDK_ENV})",
                    vm=vm.vcenter_name,
                    disk_key=d.key,
                )

    def _datacenter_path(self, session: Session, vm: VmwareVm) -> str:
        # vm_path is "/<datacenter path>/vm/<folders>/<name>".
        return vm.path.lstrip("/").split("/vm/", 1)[0]

    def _socket_path(self, name: str) -> str:
        path = self.workdir / name
        if len(str(path)) <= MAX_SOCKET_PATH:
            return str(path)
        if self._sockdir is None:
            self._sockdir = tempfile.mkdtemp(prefix="sendense-vmw-")
        return os.path.join(self._sockdir, name)

    def _serve(
        self, disk: VmwareDisk, dc_path: str, *, allocated: list[tuple[int, int]] | None
    ) -> NbdkitServer:
        assert self._session is not None and self._vm is not None
        log_path = str(self.workdir / f"nbdkit-{disk.key}.log")
        sock = self._socket_path(f"disk-{disk.key}.sock")
        filters: list[str] = []
        if self.vddk_libdir:
            password_file = self.workdir / "vsphere-password"
            if password_file not in self._secret_files:
                write_secret(password_file, self.cfg.password)
                self._secret_files.append(password_file)
            thumbprint = (
                self.cfg.thumbprint
                if self.cfg.thumbprint and len(self.cfg.thumbprint) == 40
                else certificate_fingerprint(self.cfg)
            )
            plugin = "vddk"
            params = vddk_params(
                self.cfg,
                self.vddk_libdir,
                self._vm.moref,
                self._snapshot._moId,
                disk,
                str(password_file),
                thumbprint,
            )
        else:
            cookie_file = self.workdir / "vsphere-cookie"
            if cookie_file not in self._secret_files:
                write_secret(cookie_file, self._session.cookie)
                self._secret_files.append(cookie_file)
            check_pinned(self.cfg)
            plugin = "curl"
            params = [
                ("url", folder_url(self.cfg, dc_path, disk)),
                ("cookie", f"+{cookie_file}"),
                ("sslverify", "true" if self.cfg.verify_tls else "false"),
                # The cookie is a credential: never sent on to another host.
                ("followlocation", "false"),
                ("timeout", "120"),
            ]
        if allocated is not None:
            extents = self.workdir / f"allocated-{disk.key}.txt"
            with open(extents, "w") as f:
                f.writelines(f"{start} {length}\n" for start, length in allocated)
            filters.append("extentlist")
            params.append(("extentlist", str(extents)))
        server = NbdkitServer(plugin, params, socket_path=sock, filters=filters, log_path=log_path)
        self._servers.append(server)
        server.start()
        return server

    # -- release -----------------------------------------------------------

    def _remove_snapshot(self, session: Session, snapshot: Any, name: str) -> None:
        try:
            task = snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True)
            session.wait_task(f"remove snapshot {name}", task)
        except Error as e:
            raise SnapshotFailed(
                f"the backup snapshot {name} could not be removed: {e.message}; "
                "remove it in vSphere (the next backup of this VM also tries)"
            ) from None
        except Exception as e:
            err = wrap_fault(f"remove snapshot {name}", e)
            raise SnapshotFailed(
                f"the backup snapshot {name} could not be removed: {err.message}"
            ) from None

    def release(self, success: bool) -> None:
        errors: list[Error] = []
        for server in self._servers:
            try:
                server.stop()
            except Exception as e:  # cleanup goes on; the first error wins
                log.warning("release step=nbdkit error=%s", e)
        self._servers = []
        session = self._session
        if session is not None and self._snapshot is not None:
            try:
                self._remove_snapshot(session, self._snapshot, self._snapshot_name)
                log.info("snapshot=%s removed", self._snapshot_name)
            except Error as e:
                log.warning("release step=snapshot error=%s", e.message)
                errors.append(e)
            self._snapshot = None
        if session is not None:
            session.close()
            self._session = None
        for path in self._secret_files:
            with contextlib.suppress(OSError):
                path.unlink()
        self._secret_files = []
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None
        if errors:
            raise errors[0]
