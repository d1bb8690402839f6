"""A qemu-storage-daemon "VM": disks + QMP socket, no guest.

Used by the demo, the benchmark and the tests as a stand-in for a running
QEMU: the QMP side (bitmaps, fleecing, exports) is the same code in QEMU.
A guest's writes are simulated through a writable NBD export per disk (a
running QEMU's device would refuse a second writer; qsd has no device).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import nbd

from sendense.core.errors import QmpError
from sendense.qemu import img
from sendense.qemu.qmp import QmpClient


class QsdVm:
    def __init__(self, workdir: str | Path, name: str = "vm") -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.disks: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp_socket = str(self.workdir / f"{name}.qmp")
        self.guest_socket = str(self.workdir / f"{name}.guest.sock")

    def add_disk(self, size: int, *, fmt: str = "qcow2") -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / f"{self.name}-disk{len(self.disks)}.{fmt}"
        img.create(str(path), size, fmt=fmt)
        self.disks.append(path)
        return path

    def argv(self) -> list[str]:
        args = ["qemu-storage-daemon"]
        for i, path in enumerate(self.disks):
            fmt = "qcow2" if path.suffix == ".qcow2" else "raw"
            args += [
                "--blockdev",
                f"driver=file,node-name=file{i},filename={path},aio=threads",
                "--blockdev",
                f"driver={fmt},node-name=disk{i},file=file{i}",
            ]
        args += [
            "--chardev",
            f"socket,id=qmp0,path={self.qmp_socket},server=on,wait=off",
            "--monitor",
            "chardev=qmp0",
        ]
        return args

    def start(self, *, guest_exports: bool = True) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qmp_socket)
        log = open(self.workdir / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + 10
        while not os.path.exists(self.qmp_socket):
            if self.proc.poll() is not None:
                raise QmpError(f"qemu-storage-daemon exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise QmpError("qemu-storage-daemon did not create its QMP socket")
            time.sleep(0.01)
        if guest_exports:
            # Opening its images can wait on the host's write-back (images
            # just written by qemu-img on a busy disk): more than QMP's
            # usual 30 s was seen under a full test run.
            with contextlib.closing(self._first_qmp(deadline)) as qmp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.guest_socket)
                # A guest-side server on its own socket: the node's connector
                # must then find it and add its exports there.
                qmp.execute(
                    "nbd-server-start",
                    addr={"type": "unix", "data": {"path": self.guest_socket}},
                )
                for i in range(len(self.disks)):
                    qmp.execute(
                        "block-export-add",
                        type="nbd",
                        id=f"guest{i}",
                        **{"node-name": f"disk{i}"},
                        name=f"guest{i}",
                        writable=True,
                    )

    def _first_qmp(self, deadline: float) -> QmpClient:
        """The first QMP connection. The daemon binds the socket's path
        before it listens: a connect between the two is refused (seen in a
        full test run), so that one is tried again. No probe connection
        first: the monitor takes one client at a time, and one that came
        while a probe was still attached was dropped without a greeting
        (also seen in a full run)."""
        while True:
            qmp = QmpClient(self.qmp_socket, timeout=120.0)
            try:
                return qmp.connect()
            except QmpError as e:
                if not isinstance(e.__cause__, ConnectionRefusedError):
                    raise
                if self.proc is not None and self.proc.poll() is not None:
                    raise QmpError(f"qemu-storage-daemon exited with {self.proc.returncode}") from e
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def guest(self, index: int) -> nbd.NBD:
        """A writable handle on disk ``index``, as the guest would write."""
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///guest{index}?socket={self.guest_socket}")
        return h

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            # quit writes persistent bitmaps into the qcow2 images.
            try:
                with QmpClient(self.qmp_socket, timeout=5) as qmp:
                    qmp.execute("quit")
                proc.wait(timeout=10)
            except (QmpError, subprocess.TimeoutExpired, OSError):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
