"""The images of a ``file`` source: what they are, whether they moved, and a
read-only server over them.

- `probe`: ``qemu-img info`` *without* ``-U``: it takes QEMU's shared lock
  (which refuses to share "write"), so it fails on an image a running QEMU
  has open for writing. That is the check that the image is not in use.
- `Fingerprint`: what tells that an image changed between two moments: for a
  file its mtime (nanoseconds) and size; for a block device only its size
  (a device node's mtime does not move on writes). The size is read with
  ``lseek(SEEK_END)``, which works the same on both.
- `ImageServer`: one ``qemu-storage-daemon`` per job serving every image of
  the VM read-only (a read-only node still takes QEMU's lock: while the job
  runs no QEMU can open the image for writing), plus, per incremental disk, a
  ``null-co`` node that carries the dirty bitmap of the blocks that changed
  (see `connectors.file.changes`). Always stopped; it dies with the worker
  (``setpriv --pdeathsig``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from sendense.core.errors import Error, ImageInUse, InvalidRequest, QemuImgError, QmpError
from sendense.qemu import img
from sendense.qemu.qmp import QmpClient

log = logging.getLogger(__name__)

FORMATS = ("raw", "qcow2")
# What QEMU says when another process holds a conflicting lock (block/file-posix.c,
# raw_check_lock_bytes: 'Failed to get "write" lock' / 'Failed to get shared
# "write" lock'); qemu-img and qemu-storage-daemon exit 1 for any failure, so
# the text is all there is to tell a lock from another error.
LOCK_MARKER = '"write" lock'


SOCKETS_PREFIX = "sendense-file-"
STALE_AFTER = 600.0  # seconds


def sweep_stale_sockets() -> None:
    """Remove socket folders of image servers that died with their worker
    (SIGKILL leaves no time to clean up): older than `STALE_AFTER` and
    nobody listening on their QMP socket."""
    root = Path(tempfile.gettempdir())
    for folder in root.glob(f"{SOCKETS_PREFIX}*"):
        try:
            if time.time() - folder.stat().st_mtime < STALE_AFTER:
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe_sock:
                probe_sock.settimeout(1)
                probe_sock.connect(str(folder / "qmp"))
            continue  # a live server
        except (ConnectionRefusedError, FileNotFoundError):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("stale image server sockets removed folder=%s", folder)
        except OSError:
            continue


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    device: bool


def _in_use(path: str, field: str) -> ImageInUse:
    return ImageInUse(
        f"{field}: {path} is open for writing by a running VM (QEMU holds its write "
        "lock); a backup of it would not be a point in time. Stop the VM, back up a "
        "snapshot of the image, or back the VM up through a qemu source",
        field=field,
        path=path,
    )


def probe(path: str, field: str, *, device: bool) -> ImageInfo:
    """Format and virtual size of ``path``; `ImageInUse` while a QEMU writes it."""
    try:
        out = img.run(["info", "--output=json", path])
    except QemuImgError as e:
        if LOCK_MARKER in e.stderr:
            raise _in_use(path, field) from None
        raise InvalidRequest(
            f"{field}: {path} is not a readable image: {e.stderr}", field=field
        ) from e
    info: dict[str, Any] = json.loads(out)
    fmt = str(info.get("format"))
    if fmt not in FORMATS:
        raise InvalidRequest(
            f"{field}: {path} is a {fmt} image; a file source reads raw or qcow2",
            field=field,
        )
    return ImageInfo(path=path, format=fmt, virtual_size=int(info["virtual-size"]), device=device)


@dataclass(frozen=True)
class Fingerprint:
    size: int
    mtime_ns: int | None  # None for a block device

    @classmethod
    def of(cls, path: str) -> Fingerprint:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
        return cls(size=size, mtime_ns=None if stat.S_ISBLK(st.st_mode) else st.st_mtime_ns)

    def changes(self, later: Fingerprint) -> list[str]:
        """What moved between this and ``later``, for a person."""
        out = []
        if later.size != self.size:
            out.append(f"size {self.size} -> {later.size}")
        if later.mtime_ns != self.mtime_ns:
            out.append("modification time moved")
        return out


class ImageServer:
    """``qemu-storage-daemon`` serving images read-only over NBD (unix socket).

    ``images``: disk index -> image. Nodes: ``file<i>`` (protocol) ->
    ``src<i>`` (format), both read-only; `add_bitmap_node` adds ``chg<i>``
    (null-co). Exports are added and removed over QMP.
    """

    def __init__(self, workdir: Path, images: dict[int, ImageInfo]) -> None:
        self.workdir = workdir
        self.images = images
        # Sockets in a short private folder (made at start): a unix socket
        # path has at most 107 bytes (sun_path), which a job's folder can exceed.
        self.sockets = Path(tempfile.gettempdir())
        self.qmp_path = self.sockets / "qmp"
        self.nbd_path = self.sockets / "nbd"
        self.log_path = workdir / "qsd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QmpClient | None = None

    def argv(self) -> list[str]:
        args = []
        if shutil.which("setpriv"):
            # A worker killed outright must not leave the images locked.
            args += ["setpriv", "--pdeathsig", "KILL"]
        args.append("qemu-storage-daemon")
        for i, image in self.images.items():
            # JSON syntax: a path may hold commas, which the key=value syntax splits on.
            protocol = {
                "driver": "host_device" if image.device else "file",
                "node-name": f"file{i}",
                "filename": image.path,
                "read-only": True,
                "aio": "threads",
            }
            fmt = {
                "driver": image.format,
                "node-name": f"src{i}",
                "file": f"file{i}",
                "read-only": True,
            }
            args += ["--blockdev", json.dumps(protocol), "--blockdev", json.dumps(fmt)]
        args += [
            "--nbd-server",
            f"addr.type=unix,addr.path={self.nbd_path}",
            "--chardev",
            f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
            "--monitor",
            "chardev=qmp0",
        ]
        return args

    def start(self, fields: dict[int, str]) -> None:
        """Start and connect; `ImageInUse` naming ``fields[i]`` when image i is locked."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        sweep_stale_sockets()
        self.sockets = Path(tempfile.mkdtemp(prefix=SOCKETS_PREFIX))
        self.qmp_path = self.sockets / "qmp"
        self.nbd_path = self.sockets / "nbd"
        with open(self.log_path, "wb") as logf:
            proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        self.proc = proc
        # The socket file appears at bind(), a moment before listen(): connect
        # until it answers (refused meanwhile), or the daemon exits.
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                self.proc = None
                self._raise_start_failure(fields)
            if self.qmp_path.exists():
                try:
                    self.qmp = QmpClient(str(self.qmp_path)).connect()
                    return
                except QmpError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise Error("qemu-storage-daemon did not start within 15 s", code="qsd_failed")
            time.sleep(0.01)

    def _raise_start_failure(self, fields: dict[int, str]) -> NoReturn:
        text = self.log_path.read_text(errors="replace").strip()
        if LOCK_MARKER in text:
            for i, image in self.images.items():
                if image.path in text:
                    raise _in_use(image.path, fields[i])
            first = min(self.images)
            raise _in_use(self.images[first].path, fields[first])
        raise Error(f"qemu-storage-daemon failed: {text[-1000:]}", code="qsd_failed")

    def execute(self, command: str, **arguments: Any) -> Any:
        if self.qmp is None:
            raise QmpError("the image server is not running")
        return self.qmp.execute(command, **arguments)

    def url(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_path}"

    def export(
        self, export: str, node: str, *, writable: bool = False, bitmap: str | None = None
    ) -> str:
        args: dict[str, Any] = {
            "type": "nbd",
            "id": export,
            "node-name": node,
            "name": export,
            "writable": writable,
        }
        if bitmap is not None:
            bm_node, name = bitmap.split("/", 1)
            args["bitmaps"] = [{"node": bm_node, "name": name}]
        self.execute("block-export-add", **args)
        return self.url(export)

    def remove_export(self, export: str) -> None:
        self.execute("block-export-del", id=export, mode="hard")
        with contextlib.suppress(QmpError):
            assert self.qmp is not None
            self.qmp.wait_event("BLOCK_EXPORT_DELETED", timeout=10, id=export)

    def add_bitmap_node(self, node: str, size: int, bitmap: str, granularity: int) -> None:
        """A ``null-co`` node of ``size`` bytes with an (empty, enabled) bitmap:
        writes to it (of zeroes: nothing is kept) only set bits."""
        self.execute(
            "blockdev-add",
            driver="null-co",
            **{"node-name": node},
            size=size,
            **{"read-zeroes": True},
        )
        self.execute("block-dirty-bitmap-add", node=node, name=bitmap, granularity=granularity)

    def stop(self) -> None:
        """Quit (or kill) the daemon; never raises."""
        proc, qmp = self.proc, self.qmp
        self.proc = self.qmp = None
        if qmp is not None:
            with contextlib.suppress(Exception):
                qmp.execute("quit")
            qmp.close()
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("qemu-storage-daemon pid=%d did not quit: killed", proc.pid)
                proc.kill()
                proc.wait()
        if self.sockets.name.startswith(SOCKETS_PREFIX):
            shutil.rmtree(self.sockets, ignore_errors=True)
