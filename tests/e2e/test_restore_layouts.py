"""Every partition layout and filesystem restore sessions claim, through the
real backup path, from a full and an incremental.

One qsd VM with three disks, built without mounting (tests/fixtures/disks.py):

- disk 0: GPT, XFS (partition 1) and FAT32 (2);
- disk 1: MBR, ext4 (1) and NTFS (2);
- disk 2: GPT, an LVM2 physical volume (1) holding a linear logical volume
  ``vgdata/root`` with ext4, in two segments stored out of order (listed
  after the partitions: index 2).

The VM is backed up (full); then files change inside each filesystem the
way tools change them without mounting (``debugfs -w`` on both ext4, mtools
on FAT, ``ntfscp`` on NTFS; XFS has no offline writer, so its image is
rebuilt from the changed tree) and the blocks that differ are written into
the running VM's disks through its NBD export, as a guest writes; then an
incremental. From both points, through the API: partitions, listings of
every directory, stat and symlink targets, downloads (sha256 equal to the
source file of that point in time), a range, ZIP and tar.gz of each
filesystem. Files from the incremental have the new content, files from the
full still the old. A session holds its chain (consolidation 409 ``in_use``);
once merged into a synthetic full, the incremental reads the same.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fixtures.cluster import Cluster
from fixtures.disks import (
    UNICODE_DIR,
    UNICODE_FILE,
    LogicalVolumeSpec,
    Manifest,
    PartitionSpec,
    build_ext4,
    build_fat,
    build_lvm_pv,
    build_ntfs,
    build_partitioned,
    build_xfs,
    copy_sparse,
    manifest_of,
    tools_missing,
)
from fixtures.lifecycle import MiB, error_body, lifecycle_cluster

pytestmark = pytest.mark.skipif(
    bool(tools_missing()), reason=f"test disk tools missing: {tools_missing()}"
)

DATA_SIZE = 3 * MiB
NEW_HELLO = b"hello after the change\n"


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


def small_tree(root: Path, seed: int, *, symlinks: bool, nested: bool, sparse: bool) -> None:
    """Nested and Unicode names, an empty, a sparse and a 3 MiB file, links
    inside and pointing out (what the filesystem can hold)."""
    rng = random.Random(seed)
    root.mkdir(parents=True)

    def put(rel: str, data: bytes) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)

    put("hello.txt", b"hello, world\n")
    put("empty.txt", b"")
    put(UNICODE_FILE, "contenu ünïcødé 名前\n".encode())
    put("data.bin", rng.randbytes(DATA_SIZE))
    if nested:
        put("nested/a/b/deep.txt", b"deep down\n")
        put("nested/a/mid.txt", rng.randbytes(70_000))
        put(f"{UNICODE_DIR}/ファイル.txt", "日本語\n".encode())
    if sparse:
        with (root / "sparse.img").open("wb") as fh:
            fh.truncate(4 * MiB)
            fh.seek(1 * MiB)
            fh.write(b"S" * 4096)
    if symlinks:
        (root / "links").mkdir()
        os.symlink("../hello.txt", root / "links/inside")
        os.symlink("../../../../etc/passwd", root / "links/outside")


def run(*cmd: str | Path) -> None:
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MTOOLS_SKIP_CHECK": "1"}
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, (cmd, proc.stderr or proc.stdout)


@dataclass
class Fs:
    """One filesystem of the VM: where it lives and what each point held."""

    name: str
    disk: int
    filesystem: str
    tree: Path
    image: Path  # the filesystem image (for LVM: the physical volume holding it)
    offset: int = 0  # of ``image`` on the disk
    partition: int = 0  # what partition= takes (LVM: found by its table/type)
    lv: str | None = None
    before: Manifest | None = None
    after: Manifest | None = None


def build(tmp: Path) -> tuple[list[Path], list[Fs]]:
    trees = tmp / "trees"
    specs = {
        "xfs": dict(symlinks=True, nested=True, sparse=True),
        "fat": dict(symlinks=False, nested=True, sparse=False),
        "ext4": dict(symlinks=True, nested=True, sparse=True),
        "ntfs": dict(symlinks=False, nested=False, sparse=False),
        "lvm-ext4": dict(symlinks=True, nested=True, sparse=True),
    }
    for n, (name, opts) in enumerate(specs.items()):
        small_tree(trees / name, n, **opts)
    img = tmp / "images"
    img.mkdir()
    build_xfs(img / "xfs.img", trees / "xfs")
    build_fat(img / "fat.img", trees / "fat", size=40 * MiB)
    build_ext4(img / "ext4.img", trees / "ext4", size=32 * MiB)
    build_ntfs(img / "ntfs.img", trees / "ntfs", size=16 * MiB)
    build_ext4(img / "lv.img", trees / "lvm-ext4", size=32 * MiB, label="lv-root")
    build_lvm_pv(
        img / "pv.img",
        "vgdata",
        [LogicalVolumeSpec("root", img / "lv.img", [(0, 4, 4), (4, 0, 4)])],
    )
    raws = [tmp / f"disk{i}.raw" for i in range(3)]
    o0 = build_partitioned(
        raws[0],
        "gpt",
        [PartitionSpec(img / "xfs.img", "linux"), PartitionSpec(img / "fat.img", "uefi")],
    )
    o1 = build_partitioned(
        raws[1],
        "dos",
        [PartitionSpec(img / "ext4.img", "83"), PartitionSpec(img / "ntfs.img", "7")],
    )
    o2 = build_partitioned(raws[2], "gpt", [PartitionSpec(img / "pv.img", "lvm")])
    fss = [
        Fs("xfs", 0, "xfs", trees / "xfs", img / "xfs.img", o0[0], 1),
        Fs("fat", 0, "fat", trees / "fat", img / "fat.img", o0[1], 2),
        Fs("ext4", 1, "ext", trees / "ext4", img / "ext4.img", o1[0], 1),
        Fs("ntfs", 1, "ntfs", trees / "ntfs", img / "ntfs.img", o1[1], 2),
        Fs("lvm-ext4", 2, "ext", trees / "lvm-ext4", img / "pv.img", o2[0], lv="vgdata/root"),
    ]
    for fs in fss:
        fs.before = manifest_of(fs.tree)
    return raws, fss


def change(tmp: Path, fs: Fs) -> Path:
    """Change files inside ``fs`` without mounting it (the tree changes the
    same way); returns the new image (``fs.image`` keeps the old one)."""
    new = fs.image.with_name(fs.image.stem + "-changed.img")
    copy_sparse(fs.image, new)
    (fs.tree / "hello.txt").write_bytes(NEW_HELLO)
    added = os.urandom(100_000)
    src = tmp / f"{fs.name}-new.bin"
    src.write_bytes(added)
    hello = fs.tree / "hello.txt"
    if fs.name in ("ext4", "lvm-ext4"):
        target = new
        if fs.name == "lvm-ext4":
            target = tmp / "images/lv-changed.img"
            copy_sparse(tmp / "images/lv.img", target)
        cmds = tmp / f"{fs.name}.debugfs"
        cmds.write_text(
            f"rm /hello.txt\nwrite {hello} /hello.txt\nrm /empty.txt\n"
            f"cd /nested\nwrite {src} new.bin\n"
        )
        run("debugfs", "-w", "-f", cmds, target)
        (fs.tree / "empty.txt").unlink()
        shutil.copy(src, fs.tree / "nested/new.bin")
        if fs.name == "lvm-ext4":
            build_lvm_pv(new, "vgdata", [LogicalVolumeSpec("root", target, [(0, 4, 4), (4, 0, 4)])])
    elif fs.name == "fat":
        run("mcopy", "-o", "-i", new, hello, "::/hello.txt")
        run("mdel", "-i", new, "::/empty.txt")
        run("mcopy", "-i", new, src, "::/nested/new.bin")
        (fs.tree / "empty.txt").unlink()
        shutil.copy(src, fs.tree / "nested/new.bin")
    elif fs.name == "ntfs":
        run("ntfscp", "-q", "-f", new, hello, "hello.txt")
        run("ntfscp", "-q", "-f", new, src, "new.bin")
        shutil.copy(src, fs.tree / "new.bin")
    else:  # xfs: no tool writes into an XFS image offline; rebuild it from the changed tree
        (fs.tree / "empty.txt").unlink()
        shutil.copy(src, fs.tree / "nested/new.bin")
        build_xfs(new, fs.tree)
    fs.after = manifest_of(fs.tree)
    return new


def write_differences(vm: Any, disk: int, old: Path, new: Path, at: int) -> int:
    """Write the 64 KiB blocks where ``new`` differs from ``old`` into the
    VM's disk at ``at``, as the guest would; returns the bytes written."""
    h = vm.guest(disk)
    written = 0
    step = 64 * 1024
    try:
        with old.open("rb") as a, new.open("rb") as b:
            pos = 0
            while True:
                x, y = a.read(step), b.read(step)
                if not x and not y:
                    break
                if x != y:
                    h.pwrite(y, at + pos)
                    written += len(y)
                pos += max(len(x), len(y))
        h.flush()
    finally:
        h.shutdown()
    return written


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def api(c: Cluster, mount: str, what: str, **params: Any) -> Any:
    return c.http("GET", f"/api/v1/restore/mounts/{mount}/{what}", params=params)


def check_point(c: Cluster, mount: dict[str, Any], fs: Fs, manifest: Manifest) -> None:
    mid = mount["mount_id"]
    parts = {p["index"]: p for p in mount["partitions"]}
    if fs.lv is not None:
        (part,) = [p for p in mount["partitions"] if p["table"] == "lvm" and p["type"] == fs.lv]
        fs.partition = part["index"]
        assert parts[1]["filesystem"] is None  # the physical volume itself
    assert parts[fs.partition]["filesystem"] == fs.filesystem, (fs.name, parts)
    dirs = ["/"] + [p for p, i in manifest.items.items() if i.type == "dir"]
    for d in dirs:
        r = api(c, mid, "files", path=d, partition=fs.partition)
        assert r.status_code == 200, (fs.name, d, r.text)
        names = {e["name"] for e in r.json()["entries"]}
        if fs.filesystem == "ext" and d == "/":
            names.discard("lost+found")
        assert names == manifest.children(d), (fs.name, d)
    for path, item in manifest.items.items():
        info = api(c, mid, "files/info", path=path, partition=fs.partition).json()
        assert info["type"] == item.type, (fs.name, path, info)
        if item.type == "symlink":
            assert info["target"] == item.target, (fs.name, path)
        if item.type != "file":
            continue
        assert info["size"] == item.size, (fs.name, path)
        r = api(c, mid, "download", path=path, partition=fs.partition)
        assert r.status_code == 200, (fs.name, path, r.text)
        assert sha(r.content) == item.sha256, (fs.name, path)
    data = (fs.tree / "data.bin").read_bytes()  # data.bin never changes
    r = c.http(
        "GET",
        f"/api/v1/restore/mounts/{mid}/download",
        params={"path": "/data.bin", "partition": fs.partition},
        headers={"Range": "bytes=1000000-1065535"},
    )
    assert r.status_code == 206 and r.content == data[1_000_000:1_065_536], fs.name
    check_archives(c, mid, fs, manifest)
    if "/links/outside" in manifest.items:
        r = api(c, mid, "download", path="/links/outside", partition=fs.partition)
        error_body(r, 400, "path_refused")


def check_archives(c: Cluster, mid: str, fs: Fs, manifest: Manifest) -> None:
    """The whole filesystem as a ZIP and as a tar.gz, unpacked and compared
    with the manifest: same paths, file contents, links as links."""
    for fmt in ("zip", "tar.gz"):
        r = api(c, mid, "download-directory", path="/", partition=fs.partition, format=fmt)
        assert r.status_code == 200, (fs.name, fmt, r.text)
        got: dict[str, tuple[str, bytes]] = {}
        if fmt == "zip":
            z = zipfile.ZipFile(io.BytesIO(r.content))
            for i in z.infolist():
                mode = i.external_attr >> 16
                kind = "dir" if i.is_dir() else "symlink" if stat.S_ISLNK(mode) else "file"
                got["/" + i.filename.rstrip("/")] = (kind, b"" if kind == "dir" else z.read(i))
        else:
            with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
                for m in tar.getmembers():
                    if m.isdir():
                        got["/" + m.name] = ("dir", b"")
                    elif m.issym():
                        got["/" + m.name] = ("symlink", m.linkname.encode())
                    else:
                        f = tar.extractfile(m)
                        assert f is not None
                        got["/" + m.name] = ("file", f.read())
        got.pop("/lost+found", None)
        assert set(got) == set(manifest.items), (fs.name, fmt, set(got) ^ set(manifest.items))
        for path, item in manifest.items.items():
            kind, content = got[path]
            assert kind == item.type, (fs.name, fmt, path)
            if item.type == "file":
                assert sha(content) == item.sha256, (fs.name, fmt, path)
            elif item.type == "symlink":
                assert item.target is not None and content == item.target.encode()


def test_every_layout_from_a_full_and_an_incremental(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    raws, fss = build(tmp_path)
    vm = make_vm("layouts", [r.stat().st_size for r in raws], start=False)
    for raw, disk in zip(raws, vm.disks, strict=True):
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, disk)
    vm.start()
    cluster.register(vm)

    def by_disk(job: dict[str, Any]) -> dict[int, str]:
        out = {}
        for backup_id in job["backups"]:
            out[cluster.client.get(f"/api/v1/backups/{backup_id}")["disk_id"]] = backup_id
        assert sorted(out) == [0, 1, 2], out
        return out

    full = by_disk(cluster.backup("layouts", "full"))
    for fs in fss:
        new = change(tmp_path, fs)
        assert write_differences(vm, fs.disk, fs.image, new, fs.offset) > 0, fs.name
    incr_job = cluster.backup("layouts", "incremental")
    incr = by_disk(incr_job)
    kinds = {cluster.client.get(f"/api/v1/backups/{b}")["backup_type"] for b in incr.values()}
    assert kinds == {"incremental"}, kinds

    for point, manifests in ((full, "before"), (incr, "after")):
        for disk in range(3):
            mount = cluster.client.post("/api/v1/restore/mounts", {"backup_id": point[disk]})
            assert mount["status"] == "open", mount
            for fs in fss:
                if fs.disk == disk:
                    manifest = getattr(fs, manifests)
                    assert manifest is not None
                    check_point(cluster, mount, fs, manifest)
            cluster.client.request("DELETE", f"/api/v1/restore/mounts/{mount['mount_id']}")

    # a session holds its chain: consolidation is refused until it closes,
    # and the incremental, merged into a synthetic full, reads the same after
    held = cluster.client.post("/api/v1/restore/mounts", {"backup_id": full[0]})["mount_id"]
    body = error_body(
        cluster.http("POST", "/api/v1/backups/consolidate", json={"vm_name": "layouts", "keep": 1}),
        409,
        "in_use",
    )
    assert held in {h["holder_id"] for h in body["details"]["holders"]}, body
    cluster.client.request("DELETE", f"/api/v1/restore/mounts/{held}")
    merged = cluster.client.post("/api/v1/backups/consolidate", {"vm_name": "layouts", "keep": 1})
    assert cluster.wait_job(merged["job_id"])["status"] == "completed"
    for disk in range(3):
        assert cluster.client.get(f"/api/v1/backups/{incr[disk]}")["synthetic"], disk
        mount = cluster.client.post("/api/v1/restore/mounts", {"backup_id": incr[disk]})
        for fs in fss:
            if fs.disk == disk:
                assert fs.after is not None
                check_point(cluster, mount, fs, fs.after)
        cluster.client.request("DELETE", f"/api/v1/restore/mounts/{mount['mount_id']}")

    # the same path, two points in time
    for fs in fss:
        assert fs.before is not None and fs.after is not None
        assert fs.before.items["/hello.txt"].sha256 == sha(b"hello, world\n")
        assert fs.after.items["/hello.txt"].sha256 == sha(NEW_HELLO)
