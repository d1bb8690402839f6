"""The vCenter simulator kit: build once, start per test, make VMs, inject faults.

vcsim is govmomi's vCenter simulator. Debian packages govmomi 0.24.2 as Go
source only (golang-github-vmware-govmomi-dev, no binary, no main), so
``sim/`` holds a small launcher plus what vcsim lacks for Sendense's tests:
a changed block tracking double (``sim/cbt.go``: change ids at snapshot time,
QueryChangedDiskAreas from 64 KiB block hashes of each ``-flat.vmdk``),
session cookies checked on the datastore ``/folder`` path and fault injection
(``sim/faults.go``). It builds offline (GO111MODULE=off, GOPATH with Debian's
/usr/share/gocode) into a cache folder keyed by a hash of the sources and the
toolchain, once for every test run on the machine: ``$SENDENSE_VCSIM_CACHE``,
else ``$XDG_CACHE_HOME/sendense/vcsim``, else ``~/.cache/sendense/vcsim``.

What the simulator is not: it has no CBT of its own and creates no delta
disks (a snapshot leaves the flat file as it is, so "guest writes" after a
snapshot land in the base file: tests write between backups, never during
one). Tests that use it say so in their names and docstrings.

VM disks are monolithicFlat VMDKs (``qemu-img create -f vmdk -o
subformat=monolithicFlat``): a descriptor and a ``-flat.vmdk`` with the raw
bytes, which is what a vSphere datastore holds for a flat disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SIM_DIR = Path(__file__).parent / "sim"
GOCODE = Path("/usr/share/gocode")
PACKAGES = "golang-go golang-github-vmware-govmomi-dev"
DATACENTER = "DC0"
DATASTORE = "LocalDS_0"
USER = "backup@vsphere.local"
PASSWORD = "Vc-s3cret-Pa55!"


class VcsimUnavailable(Exception):
    pass


def _toolchain_id() -> str:
    go = shutil.which("go")
    if go is None or not (GOCODE / "src/github.com/vmware/govmomi/simulator").is_dir():
        raise VcsimUnavailable(f"Go or govmomi's source is missing: apt-get install {PACKAGES}")
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    pkg = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "golang-github-vmware-govmomi-dev"],
        capture_output=True,
        text=True,
    ).stdout
    return f"{version.strip()} govmomi {pkg.strip()}"


def cache_dir() -> Path:
    if os.environ.get("SENDENSE_VCSIM_CACHE"):
        return Path(os.environ["SENDENSE_VCSIM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sendense" / "vcsim"


def build() -> Path:
    """The simulator binary, built on first use (a file lock keeps parallel
    test runs from building it twice)."""
    h = hashlib.sha256(_toolchain_id().encode())
    for src in sorted(SIM_DIR.glob("*.go")):
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    key = h.hexdigest()[:16]
    root = cache_dir()
    binary = root / key / "vcsim"
    if binary.exists():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        work = Path(tempfile.mkdtemp(prefix=f"build-{key}-", dir=root))
        try:
            pkg = work / "gopath" / "src" / "sendensevcsim"
            pkg.mkdir(parents=True)
            for src in SIM_DIR.glob("*.go"):
                shutil.copy(src, pkg)
            env = {
                **os.environ,
                "GOPATH": f"{work / 'gopath'}:{GOCODE}",
                "GO111MODULE": "off",
                "GOPROXY": "off",
                "GOFLAGS": "",
                "GOCACHE": str(root / "gocache"),
                "CGO_ENABLED": "0",
            }
            out = work / "vcsim"
            proc = subprocess.run(
                ["go", "build", "-o", str(out), "sendensevcsim"],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"building the vCenter simulator failed:\n{proc.stderr}")
            binary.parent.mkdir(parents=True, exist_ok=True)
            os.replace(out, binary)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return binary


def build_or_skip() -> Path:
    """The binary; without the toolchain the test is skipped loudly (failed
    under CI or SENDENSE_REQUIRE_VCSIM=1)."""
    try:
        return build()
    except VcsimUnavailable as e:
        message = f"VMWARE TESTS SKIPPED: no vCenter simulator: {e} (make setup installs them)"
        if os.environ.get("CI") or os.environ.get("SENDENSE_REQUIRE_VCSIM") == "1":
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class SimDisk:
    key: int
    path: Path  # the -flat.vmdk (raw bytes of the disk)
    descriptor: Path
    capacity: int
    thin: bool
    datastore_path: str  # "[LocalDS_0] web1/web1.vmdk"

    def write(self, offset: int, data: bytes) -> None:
        """A guest write: straight into the flat file."""
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def read(self) -> bytes:
        return self.path.read_bytes()


@dataclass
class SimVm:
    name: str
    path: str  # inventory path
    disks: list[SimDisk] = field(default_factory=list)

    def disk(self, key: int) -> SimDisk:
        return next(d for d in self.disks if d.key == key)


class Vcsim:
    """One running simulator (SOAP and /folder on one HTTPS port)."""

    def __init__(self, binary: Path, root: Path, *, qcda_page: int = 0) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        self.user = USER
        self.password = PASSWORD
        self.log_path = root / "vcsim.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(binary),
                    "-l",
                    "127.0.0.1:0",
                    "-username",
                    self.user,
                    "-password",
                    self.password,
                    "-qcda-page",
                    str(qcda_page),
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                env={**os.environ, "TMPDIR": str(root / "tmp")},
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"vcsim did not start: {self.log_path.read_text()[-2000:]}")
        info = json.loads(line)
        self.url: str = info["url"]
        hostport = self.url.split("//", 1)[1].split("/", 1)[0]
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)
        self.datastore = Path(info["datastores"][DATASTORE])
        self._si: Any = None

    # -- what a Sendense source needs ------------------------------------

    def source_config(self, **changes: Any) -> dict[str, Any]:
        config = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "datacenter": DATACENTER,
            "insecure": True,
        }
        config.update(changes)
        return config

    # -- pyVmomi, for the tests' own set-up and checks -------------------

    @property
    def si(self) -> Any:
        if self._si is None:
            from pyVim.connect import SmartConnect

            self._si = SmartConnect(
                host=self.host,
                port=self.port,
                user=self.user,
                pwd=self.password,
                sslContext=ssl._create_unverified_context(),
            )
        return self._si

    def find_vm(self, name: str) -> Any:
        vm = self.si.content.searchIndex.FindByInventoryPath(f"{DATACENTER}/vm/{name}")
        assert vm is not None, f"VM {name} not in the simulator"
        return vm

    def retrieve(self, obj: Any, paths: list[str]) -> dict[str, Any]:
        from pyVmomi import vmodl

        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=obj)],
            propSet=[pc.PropertySpec(type=type(obj), pathSet=paths)],
        )
        found = self.si.content.propertyCollector.RetrieveContents([spec])
        return {p.name: p.val for p in found[0].propSet} if found else {}

    def wait(self, task: Any) -> Any:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = self.retrieve(task, ["info.state", "info.error", "info.result"])
            if info["info.state"] == "success":
                return info.get("info.result")
            if info["info.state"] == "error":
                raise RuntimeError(f"task failed: {info.get('info.error')}")
            time.sleep(0.05)
        raise TimeoutError(f"task {task} did not end")

    def snapshot_names(self, name: str) -> list[str]:
        snap = self.retrieve(self.find_vm(name), ["snapshot"]).get("snapshot")
        out: list[str] = []
        stack = list(snap.rootSnapshotList) if snap is not None else []
        while stack:
            node = stack.pop(0)
            out.append(node.name)
            stack[:0] = list(node.childSnapshotList or [])
        return out

    def create_vm(
        self,
        name: str,
        disks: list[tuple[int, bool]],
        *,
        power_on: bool = True,
        folder: str = "",
    ) -> SimVm:
        """A VM with flat disks of (size, thin) on the datastore, keys 2000,
        2001, ..., in the VM folder ``folder`` (made beforehand) or at the top."""
        from pyVmomi import vim

        ds_dir = f"{folder.replace('/', '-')}-{name}" if folder else name
        files = self.datastore / ds_dir
        files.mkdir(parents=True, exist_ok=True)
        dc = self.si.content.searchIndex.FindByInventoryPath(DATACENTER)
        vm_folder = (
            self.si.content.searchIndex.FindByInventoryPath(f"{DATACENTER}/vm/{folder}")
            if folder
            else dc.vmFolder
        )
        pool = next(
            c.resourcePool
            for c in dc.hostFolder.childEntity
            if isinstance(c, vim.ClusterComputeResource)
        )
        controller = vim.vm.device.ParaVirtualSCSIController(
            key=1000, busNumber=0, sharedBus="noSharing"
        )
        changes = [vim.vm.device.VirtualDeviceSpec(operation="add", device=controller)]
        vm = SimVm(name=name, path=f"/{DATACENTER}/vm/{folder + '/' if folder else ''}{name}")
        for i, (size, thin) in enumerate(disks):
            stem = name if i == 0 else f"{name}_{i}"
            descriptor = files / f"{stem}.vmdk"
            subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "vmdk",
                    "-o",
                    "subformat=monolithicFlat",
                    str(descriptor),
                    str(size),
                ],
                check=True,
            )
            ds_path = f"[{DATASTORE}] {ds_dir}/{stem}.vmdk"
            disk = vim.vm.device.VirtualDisk(
                key=2000 + i,
                controllerKey=1000,
                unitNumber=i,
                capacityInKB=size // 1024,
                deviceInfo=vim.Description(label=f"Hard disk {i + 1}", summary=""),
            )
            disk.backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=ds_path, diskMode="persistent", thinProvisioned=thin
            )
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=disk))
            vm.disks.append(
                SimDisk(
                    key=2000 + i,
                    path=files / f"{stem}-flat.vmdk",
                    descriptor=descriptor,
                    capacity=size,
                    thin=thin,
                    datastore_path=ds_path,
                )
            )
        spec = vim.vm.ConfigSpec(
            name=name,
            guestId="otherGuest64",
            numCPUs=1,
            memoryMB=256,
            files=vim.vm.FileInfo(vmPathName=f"[{DATASTORE}] {ds_dir}"),
            deviceChange=changes,
        )
        ref = self.wait(vm_folder.CreateVM_Task(config=spec, pool=pool))
        if power_on:
            self.wait(ref.PowerOnVM_Task())
        return vm

    # -- the double's faults and counters ---------------------------------

    def _double(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = f"https://{self.host}:{self.port}/sendense-double/{path}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(req, context=ssl._create_unverified_context()) as r:
            answer: dict[str, Any] = json.loads(r.read())
        return answer

    def faults(self, **settings: int) -> dict[str, Any]:
        """``snapshot_failures=N``, ``folder_drop_after=BYTES`` (-1: off)."""
        return self._double("faults", settings)

    def state(self) -> dict[str, Any]:
        return self._double("state")

    def stop(self) -> None:
        if self._si is not None:
            from pyVim.connect import Disconnect

            with contextlib.suppress(Exception):
                Disconnect(self._si)
            self._si = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def nbdkit_processes(needle: str) -> list[tuple[int, str]]:
    """nbdkit processes whose command line holds ``needle``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            continue
        if cmdline.startswith(b"nbdkit\0") and needle.encode() in cmdline:
            found.append((int(entry), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


@contextlib.contextmanager
def running_vcsim(root: Path, **options: Any) -> Iterator[Vcsim]:
    """A simulator for the block; at its end no nbdkit reading from it may be
    left (the connector always stops its readers), then it stops."""
    sim = Vcsim(build_or_skip(), root, **options)
    try:
        yield sim
        needle = f"127.0.0.1:{sim.port}/"
        deadline = time.monotonic() + 15
        left = nbdkit_processes(needle)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = nbdkit_processes(needle)
        for pid, _ in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"nbdkit processes left behind: {left}"
    finally:
        sim.stop()


@pytest.fixture
def vcsim(tmp_path: Path) -> Iterator[Vcsim]:
    """A vCenter simulator (vcsim + the CBT double) for one test."""
    with running_vcsim(tmp_path / "vcsim") as sim:
        yield sim
