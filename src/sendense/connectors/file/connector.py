"""File connector: a VM is a list of images or block devices on the node.

Config: ``{"vms": [{"name", "paths": ["/images/a.qcow2", "/dev/vg/lv", ...]}]}``
(`connectors.file.config`). Each path is one disk, key 2000 + its position;
its format (raw or qcow2) is detected with ``qemu-img info`` and its capacity
is the virtual size.

Point in time. Nothing can freeze a plain image, so the image must not
change while it is read: the VM is stopped, or the path is a snapshot (an
LVM snapshot, a reflink copy). The connector checks what it can:

- a running QEMU that has the image open for writing holds QEMU's write
  lock: discovery and backup refuse the image (`ImageInUse`, 409);
- from before the read to after the copy the images stay open read-only in
  one ``qemu-storage-daemon`` (`image.ImageServer`), whose lock keeps any
  QEMU from opening them for writing meanwhile;
- each image's `image.Fingerprint` (mtime and size of a file, size of a
  block device) is taken before and compared after the copy; if it moved,
  the backup fails (`ImageChanged`) instead of keeping a mixed-up copy.

Change tracking. A full backup exports the image as it is: the mover reads
the allocated extents (``base:allocation``: qcow2's allocation map, a raw
file's holes; a block device is all data). An incremental needs the block
hash list of the previous change id on this node (`changes`): the image is
read once, hashed per 64 KiB block, compared, and the export carries a
dirty bitmap of the changed blocks, so the mover moves only those as it
does for QEMU. (A bitmap in the image server rather than a list in
`DiskView.changed_extents`: one bit per block, 2 KiB per GiB whatever the
pattern of changes, where a list of scattered extents grows with them.) Without
the list (another node made that restore point, the list was pruned, the
disk was resized, or the change id is not ours), the disk is read in full
and the job says why. The change id names the restore point's list:
``sendense-file-<16 hex digits>``.

Release stops the server, always; after a successful copy it is where a
moved fingerprint fails the job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd

from sendense.connectors.base import DiskInfo, DiskView, PointInTime, VmInfo
from sendense.connectors.file import changes, mapped
from sendense.connectors.file.config import FileVm, check_allowed, check_readable, parse_config
from sendense.connectors.file.image import Fingerprint, ImageInfo, ImageServer, probe
from sendense.core.errors import ImageChanged, NotFound
from sendense.mover import digest as dg

log = logging.getLogger(__name__)

FIRST_DISK_KEY = 2000
CHANGE_ID_PREFIX = "sendense-file-"
BITMAP = "sendense-changed"


def new_change_id() -> str:
    return f"{CHANGE_ID_PREFIX}{uuid.uuid4().hex[:16]}"


def hash_list_dir(data_dir: Path, vm_name: str, key: int) -> Path:
    """Where the worker keeps a disk's block hash lists, one per change id
    (``node/worker.py``, ``_hash_list_dir``: the same layout)."""
    return data_dir / "blockhash" / vm_name.replace("/", "_") / str(key)


def node_data_dir(workdir: Path) -> Path | None:
    """The node's data dir, from a job's work dir ``<data>/jobs/<job id>/work``
    or discovery's ``<data>/discover`` (node/app.py)."""
    if workdir.parent.parent.name == "jobs":
        return workdir.parent.parent.parent
    if workdir.name == "discover":
        return workdir.parent
    return None


class FileConnector:
    """Connector over the ``file`` source config. Building it checks the
    config only; discovery and freeze read the images."""

    def __init__(self, config: dict[str, Any], *, workdir: str) -> None:
        self.vms = {vm.name: vm for vm in parse_config(config)}
        self.workdir = Path(workdir)
        self.server: ImageServer | None = None
        self._before: dict[str, Fingerprint] = {}
        self._fields: dict[str, str] = {}
        self._images_by_key: dict[int, ImageInfo] = {}
        # Set by the worker when it can (the hash pass of an incremental reads
        # the whole image inside freeze): its cancel flag, and a callback
        # taking a step text for the job's status.
        self.cancel_event: threading.Event | None = None
        self.on_step: Callable[[str], None] | None = None

    def _data_dir(self) -> str | None:
        found = node_data_dir(self.workdir)
        return str(found) if found is not None else None

    # -- discovery ---------------------------------------------------------

    def _image(self, vm: FileVm, index: int) -> ImageInfo:
        path, field = vm.paths[index], vm.field(index)
        check_allowed(path, field, data_dir=self._data_dir())
        device = check_readable(path, field)
        return probe(path, field, device=device)

    def _disk(self, index: int, image: ImageInfo) -> DiskInfo:
        return DiskInfo(
            index=index,
            key=FIRST_DISK_KEY + index,
            label=os.path.basename(image.path),
            capacity_bytes=image.virtual_size,
            path=image.path,
            node_name=f"src{index}",
        )

    def discover(self) -> list[VmInfo]:
        out = []
        for vm in self.vms.values():
            disks = [self._disk(i, self._image(vm, i)) for i in range(len(vm.paths))]
            out.append(VmInfo(name=vm.name, path=vm.paths[0], disks=disks))
        return out

    # -- point in time -----------------------------------------------------

    def freeze(
        self, vm_name: str, disk_keys: list[int], previous_change_ids: dict[int, str]
    ) -> PointInTime:
        vm = self.vms.get(vm_name)
        if vm is None:
            raise NotFound(f"VM {vm_name} is not in this source")
        unknown = [k for k in disk_keys if not 0 <= k - FIRST_DISK_KEY < len(vm.paths)]
        if unknown:
            raise NotFound(f"disk key(s) {unknown} not found in VM {vm_name}")
        # Only the disks asked for are opened, locked and watched.
        images = {k - FIRST_DISK_KEY: self._image(vm, k - FIRST_DISK_KEY) for k in disk_keys}
        disks = {FIRST_DISK_KEY + i: self._disk(i, image) for i, image in images.items()}
        self._images_by_key = {FIRST_DISK_KEY + i: image for i, image in images.items()}
        self._fields = {image.path: vm.field(i) for i, image in images.items()}
        self._before = {image.path: Fingerprint.of(image.path) for image in images.values()}
        server = ImageServer(self.workdir, images)
        self.server = server
        server.start({i: vm.field(i) for i in images})
        change_id = new_change_id()
        data_dir = node_data_dir(self.workdir)
        views = []
        for key in disk_keys:
            disk = disks[key]
            prev = previous_change_ids.get(key)
            bitmap = None
            reason = None
            if prev:
                hashes, algorithm, reason = self._previous_list(data_dir, vm_name, disk, prev)
                if hashes is not None:
                    self._mark_changes(server, disk, hashes, algorithm)
                    bitmap = f"chg{disk.index}/{BITMAP}"
            export = f"{change_id}-{key}"
            url = server.export(export, disk.node_name, bitmap=bitmap)
            views.append(
                DiskView(
                    disk=disk,
                    nbd_url=url,
                    dirty_context=f"qemu:dirty-bitmap:{BITMAP}" if bitmap else None,
                    fallback_reason=reason,
                    new_change_id=change_id,
                )
            )
        # Reading for the hashes took a while: a change already shows.
        self._check_unchanged()
        return PointInTime(views=views)

    def _previous_list(
        self, data_dir: Path | None, vm_name: str, disk: DiskInfo, prev: str
    ) -> tuple[Path | None, str, str | None]:
        """The block hash list of ``prev`` and its algorithm, or why there is none."""
        if not prev.startswith(CHANGE_ID_PREFIX):
            return None, "", f"change id {prev} of disk {disk.key} is not a file source's"
        if data_dir is None:
            return None, "", "the node's block hash lists are not reachable from this job"
        folder = hash_list_dir(data_dir, vm_name, disk.key)
        for algorithm in (dg.DEFAULT_ALGORITHM, *dg.ALGORITHMS):
            path = folder / f"{prev}.{algorithm}"
            if path.exists():
                _, hash_size = changes.leaf_of(algorithm)
                if path.stat().st_size != dg.block_count(disk.capacity_bytes) * hash_size:
                    return (
                        None,
                        "",
                        (
                            f"the block hash list of change id {prev} does not match disk "
                            f"{disk.key} (resized?)"
                        ),
                    )
                return path, algorithm, None
        return (
            None,
            "",
            (
                f"no block hash list for change id {prev} of disk {disk.key} on this node "
                "(made by another node, or pruned)"
            ),
        )

    def _mark_changes(
        self, server: ImageServer, disk: DiskInfo, hashes: Path, algorithm: str
    ) -> None:
        node = f"chg{disk.index}"
        server.add_bitmap_node(node, disk.capacity_bytes, BITMAP, dg.BLOCK_SIZE)
        read_export, mark_export = f"hash-{disk.index}", f"mark-{disk.index}"
        src = nbd.NBD()
        src.add_meta_context("base:allocation")
        mark = nbd.NBD()
        try:
            src.connect_uri(server.export(read_export, disk.node_name))
            mark.connect_uri(server.export(mark_export, node, writable=True))
            image = self._images_by_key[disk.key]
            chunks = self._chunks(image, src)
            summary = changes.find_changes(
                chunks,
                disk.capacity_bytes,
                hashes,
                changes.ChangeMarker(mark, disk.capacity_bytes),
                algorithm=algorithm,
                cancel=self.cancel_event,
                on_progress=self._progress(disk.key),
            )
        finally:
            for h in (src, mark):
                with contextlib.suppress(Exception):
                    h.shutdown()
        server.remove_export(read_export)
        server.remove_export(mark_export)
        # An enabled bitmap cannot go with a read-only export (qemu nbd/server.c).
        server.execute("block-dirty-bitmap-disable", node=node, name=BITMAP)
        log.info(
            "disk=%d hashed blocks=%d changed=%d read_bytes=%d seconds=%.3f rate=%.0f",
            disk.key,
            summary.blocks,
            summary.changed_blocks,
            summary.read_bytes,
            summary.seconds,
            summary.rate,
        )

    def _chunks(
        self, image: ImageInfo, src: nbd.NBD
    ) -> Iterator[tuple[int, int, memoryview | None]]:
        """How the hash pass reads the image: a raw one directly, a plain qcow2
        chain by its map, anything else through the image server."""
        if image.format == "raw":
            return changes.file_chunks(image.path, image.virtual_size)
        files = mapped.direct_chain(image.path)
        if files is not None:
            return mapped.mapped_chunks(image.path, image.virtual_size, files, src)
        return changes.nbd_chunks(src, image.virtual_size)

    def _progress(self, key: int) -> Callable[[int, int], None] | None:
        on_step = self.on_step
        if on_step is None:
            return None

        def report(done: int, size: int) -> None:
            on_step(f"hashing disk {key}: {100 * done // max(size, 1)}%")

        return report

    def _check_unchanged(self) -> None:
        for path, before in self._before.items():
            try:
                moved = before.changes(Fingerprint.of(path))
            except OSError as e:
                moved = [f"cannot stat it any more: {e.strerror or e}"]
            if moved:
                field = self._fields.get(path, "")
                raise ImageChanged(
                    f"{field}: {path} changed while it was read ({', '.join(moved)}): "
                    "the copy is not a point in time and is refused. The image must not "
                    "change during a backup: stop the VM or back up a snapshot of it",
                    field=field,
                    path=path,
                )

    def release(self, success: bool) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()
        if success and self._before:
            self._check_unchanged()
