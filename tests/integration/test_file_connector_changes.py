"""The file connector on real qemu-img / qemu-storage-daemon, without hub or
node: what it discovers, what it refuses, and that the dirty bitmap its
incremental export carries names exactly the blocks whose hash changed
(checked against hashes computed here, from a raw copy, independently of
the connector's own hashing)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import blake3
import nbd
import pytest
import xxhash

from sendense.connectors.file import changes, image, mapped
from sendense.connectors.file.connector import FileConnector
from sendense.core.errors import Cancelled, ImageChanged, ImageInUse, InvalidRequest
from sendense.qemu import img
from sendense.qemu.qsd import QsdVm

MiB = 1 << 20
BLOCK = 64 * 1024


def qemu_io(path: Path, *commands: str) -> None:
    args = ["qemu-io"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def hash_list(path: Path, tmp: Path, algorithm: str = "x3-64k") -> bytes:
    """Leaf hashes of the image as read by qemu-img (independent check)."""
    raw = tmp / f"{path.name}.raw"
    img.convert(str(path), str(raw), dst_fmt="raw")
    data = raw.read_bytes()
    raw.unlink()
    if algorithm == "b3-64k":
        return b"".join(
            blake3.blake3(data[i : i + BLOCK]).digest() for i in range(0, len(data), BLOCK)
        )
    return b"".join(xxhash.xxh3_128_digest(data[i : i + BLOCK]) for i in range(0, len(data), BLOCK))


def dirty_blocks(url: str, context: str, size: int) -> set[int]:
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.add_meta_context(context)
    h.connect_uri(url)
    found: set[int] = set()
    reached = [0]

    def cb(ctx: str, off: int, entries: list[int], err: Any) -> int:
        if ctx != context:
            return 0
        pos = off
        for i in range(0, len(entries), 2):
            if entries[i + 1] & 1:
                found.update(range(pos // BLOCK, -(-(pos + entries[i]) // BLOCK)))
            pos += entries[i]
        reached[0] = pos
        return 0

    offset = 0
    try:
        while offset < size:
            h.block_status(size - offset, offset, cb)
            offset = max(reached[0], offset + BLOCK)
    finally:
        h.shutdown()
    return found


def connector(tmp: Path, paths: list[Path]) -> FileConnector:
    # A job's work dir: <node data>/jobs/<job id>/work (the lists are under <node data>).
    return FileConnector(
        {"vms": [{"name": "vm1", "paths": [str(p) for p in paths]}]},
        workdir=str(tmp / "node" / "jobs" / "job1" / "work"),
    )


@pytest.mark.parametrize(
    ("fmt", "algorithm"), [("raw", "x3-64k"), ("qcow2", "x3-64k"), ("qcow2", "b3-64k")]
)
def test_incremental_bitmap_is_exactly_the_changed_blocks(
    tmp_path: Path, fmt: str, algorithm: str
) -> None:
    """b3-64k: a node whose digest is BLAKE3 keeps such lists; they are used as they are."""
    path = tmp_path / f"disk.{fmt}"
    size = 16 * MiB + 4096  # a short last block
    img.create(str(path), size, fmt=fmt)
    qemu_io(path, "write -P 7 0 3M", "write -P 9 8M 100k", f"write -P 5 {size - 4096} 4096")
    lists = tmp_path / "node" / "blockhash" / "vm1" / "2000"
    lists.mkdir(parents=True)
    (lists / f"sendense-file-prev.{algorithm}").write_bytes(hash_list(path, tmp_path, algorithm))
    # Data over data, zeroes over data (block 128 = 8 MiB), data into a hole,
    # the short last block, and a write of the same bytes (no change).
    qemu_io(
        path,
        "write -P 1 65536 10",
        "write -z 8M 64k",
        "write -P 3 15M 200k",
        f"write -P 6 {size - 100} 100",
        "write -P 7 1M 64k",
    )
    c = connector(tmp_path, [path])
    pit = c.freeze("vm1", [2000], {2000: "sendense-file-prev"})
    try:
        view = pit.views[0]
        assert view.fallback_reason is None and view.dirty_context is not None
        assert view.new_change_id and view.new_change_id.startswith("sendense-file-")
        got = dirty_blocks(view.nbd_url, view.dirty_context, size)
    finally:
        c.release(True)
    last = size // BLOCK
    assert got == {1, 128, *range(240, 244), last}


def test_unknown_change_id_reads_in_full_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    img.create(str(path), 4 * MiB, fmt="raw")
    c = connector(tmp_path, [path])
    pit = c.freeze("vm1", [2000], {2000: "sendense-file-gone"})
    try:
        view = pit.views[0]
        assert view.dirty_context is None
        assert view.fallback_reason is not None
        assert "no block hash list for change id sendense-file-gone" in view.fallback_reason
    finally:
        c.release(True)
    c = connector(tmp_path, [path])
    pit = c.freeze("vm1", [2000], {2000: "sendense-0123"})  # a qemu source's change id
    c.release(False)
    assert "is not a file source's" in str(pit.views[0].fallback_reason)


def test_discovery_formats_and_refusals(tmp_path: Path) -> None:
    raw, qcow2 = tmp_path / "a.raw", tmp_path / "b.qcow2"
    img.create(str(raw), 3 * MiB + 512, fmt="raw")
    img.create(str(qcow2), 5 * MiB, fmt="qcow2")
    vm = connector(tmp_path, [raw, qcow2]).discover()[0]
    assert [(d.key, d.capacity_bytes, d.path) for d in vm.disks] == [
        (2000, 3 * MiB + 512, str(raw)),
        (2001, 5 * MiB, str(qcow2)),
    ]

    bad: list[tuple[dict[str, Any], str]] = [
        ({}, "config.vms"),
        ({"vms": [{"paths": ["/a"]}]}, "config.vms[0].name"),
        ({"vms": [{"name": "x", "paths": []}]}, "config.vms[0].paths"),
        ({"vms": [{"name": "x", "paths": ["a.raw"]}]}, "config.vms[0].paths[0]"),
        (
            {"vms": [{"name": "x", "paths": ["/a"]}, {"name": "x", "paths": ["/b"]}]},
            "config.vms[1].name",
        ),
    ]
    for config, field in bad:
        with pytest.raises(InvalidRequest) as e:
            FileConnector(config, workdir=str(tmp_path / "w"))
        assert e.value.details["field"] == field, (config, e.value.message)

    with pytest.raises(InvalidRequest, match=r"config.vms\[0\].paths\[1\]: cannot read"):
        connector(tmp_path, [raw, tmp_path / "missing.raw"]).discover()
    with pytest.raises(InvalidRequest, match="neither an image file nor a block device"):
        connector(tmp_path, [tmp_path]).discover()
    vmdk = tmp_path / "c.vmdk"
    img.create(str(vmdk), MiB, fmt="vmdk")
    with pytest.raises(InvalidRequest, match="is a vmdk image"):
        connector(tmp_path, [vmdk]).discover()


def test_an_image_a_running_vm_writes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "busy.qcow2"
    img.create(str(path), 4 * MiB)
    holder = QsdVm(tmp_path / "holder", "holder")
    holder.disks = [path]
    holder.start(guest_exports=False)
    try:
        with pytest.raises(ImageInUse, match="open for writing by a running VM"):
            connector(tmp_path, [path]).discover()
        c = connector(tmp_path, [path])
        with pytest.raises(ImageInUse):
            c.freeze("vm1", [2000], {})
        c.release(False)
        # A backup of the VM's other disk alone only opens that one.
        other = tmp_path / "other.raw"
        img.create(str(other), MiB, fmt="raw")
        c = connector(tmp_path, [path, other])
        pit = c.freeze("vm1", [2001], {})
        assert [v.disk.key for v in pit.views] == [2001]
        c.release(True)
    finally:
        holder.stop()
    # While a backup reads it, no VM can open it for writing.
    c = connector(tmp_path, [path])
    c.freeze("vm1", [2000], {})
    try:
        with pytest.raises(Exception, match="exited"):
            holder.start(guest_exports=False)
        assert "lock" in (holder.workdir / "holder.log").read_text()
    finally:
        holder.kill()
        c.release(True)


def test_a_change_during_the_copy_fails_at_release(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    img.create(str(path), 4 * MiB, fmt="raw")
    c = connector(tmp_path, [path])
    c.freeze("vm1", [2000], {})
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1))  # as a writer would
    with pytest.raises(ImageChanged, match=r"config.vms\[0\].paths\[0\]: .* changed while"):
        c.release(True)
    assert c.server is None  # the server is stopped all the same


def test_hash_pass_stops_on_cancel_and_the_server_goes(tmp_path: Path) -> None:
    """The worker's cancel flag, given to the connector, stops an
    incremental's hash pass (it reads the whole image inside freeze)."""
    path = tmp_path / "disk.qcow2"
    img.create(str(path), 8 * MiB)
    qemu_io(path, "write -P 7 0 4M")
    lists = tmp_path / "node" / "blockhash" / "vm1" / "2000"
    lists.mkdir(parents=True)
    (lists / "sendense-file-prev.x3-64k").write_bytes(hash_list(path, tmp_path))
    c = connector(tmp_path, [path])
    c.cancel_event = threading.Event()
    c.cancel_event.set()
    with pytest.raises(Cancelled, match="while hashing"):
        c.freeze("vm1", [2000], {2000: "sendense-file-prev"})
    c.release(False)
    assert c.server is None
    # Nothing holds the image any more: a writer can open it.
    qemu_io(path, "write -P 1 0 64k")


def test_hash_rate_helpers_count_changed_blocks(tmp_path: Path) -> None:
    """What the benchmark drives: file_chunks + find_changes + CountMarker."""
    path = tmp_path / "disk.raw"
    size = 4 * MiB
    path.write_bytes(os.urandom(size))
    previous = tmp_path / "prev.x3-64k"
    previous.write_bytes(hash_list(path, tmp_path))
    with open(path, "r+b") as f:
        f.seek(3 * BLOCK)
        f.write(b"x")
    marker = changes.CountMarker()
    summary = changes.find_changes(changes.file_chunks(str(path), size), size, previous, marker)
    assert (summary.blocks, summary.changed_blocks, summary.read_bytes) == (64, 1, size)


def test_paths_outside_the_allowed_roots_or_in_the_data_dir_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, other = tmp_path / "images", tmp_path / "other"
    images.mkdir()
    other.mkdir()
    ok, outside = images / "a.raw", other / "b.raw"
    for p in (ok, outside):
        img.create(str(p), MiB, fmt="raw")
    link = images / "escape.raw"
    link.symlink_to(outside)  # the check is on the resolved path
    monkeypatch.setenv("SENDENSE_NODE_FILE_ROOTS", f"{images}:/nonexistent")
    assert connector(tmp_path, [ok]).discover()[0].disks[0].capacity_bytes == MiB
    for path in (outside, link):
        with pytest.raises(InvalidRequest, match="not under the folders this node reads"):
            connector(tmp_path, [path]).discover()
    monkeypatch.delenv("SENDENSE_NODE_FILE_ROOTS")
    token = tmp_path / "node" / "node.token"
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text("secret")
    with pytest.raises(InvalidRequest, match=r"paths\[0\]: .* is inside the node's data directory"):
        connector(tmp_path, [token]).discover()


def test_qcow2_with_a_backing_file_reads_through_its_chain(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    img.create(str(base), 4 * MiB)
    qemu_io(base, "write -P 3 0 2M")
    img.create(str(top), 4 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 4 1M 64k")
    c = connector(tmp_path, [top])
    assert c.discover()[0].disks[0].capacity_bytes == 4 * MiB
    pit = c.freeze("vm1", [2000], {})
    try:
        assert img.compare(pit.views[0].nbd_url, str(top))
    finally:
        c.release(True)


def test_socket_folders_of_dead_servers_are_swept() -> None:
    """A worker killed outright leaves its image server's socket folder in
    the temp dir; the next server start removes it once it is old and dead."""
    folders = [Path(tempfile.mkdtemp(prefix=image.SOCKETS_PREFIX)) for _ in range(2)]
    for folder in folders:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(folder / "qmp"))  # bound, never listening: a dead server's
    old = time.time() - image.STALE_AFTER - 10
    os.utime(folders[0], (old, old))
    try:
        image.sweep_stale_sockets()
        assert not folders[0].exists()
        assert folders[1].exists()  # too young: maybe a server starting
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def leaf_hashes(chunks: Any) -> bytes:
    """Leaf hashes of the blocks a chunk stream gives (a zero chunk: zeroes)."""
    out = []
    for _offset, length, data in chunks:
        for pos in range(0, length, BLOCK):
            piece = min(BLOCK, length - pos)
            block = bytes(piece) if data is None else data[pos : pos + piece]
            out.append(xxhash.xxh3_128_digest(block))
    return b"".join(out)


def _chain(tmp: Path) -> Path:
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    img.create(str(base), 6 * MiB)
    qemu_io(base, "write -P 1 0 2M", "write -P 2 5M 512k")
    img.create(str(top), 6 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 3 1M 4k", "write -z 5M 64k", "write -P 4 3M 100k")
    return top


def _raw_backing(tmp: Path) -> Path:
    base, top = tmp / "base.raw", tmp / "top.qcow2"
    img.create(str(base), 4 * MiB, fmt="raw")
    qemu_io(base, "write -P 5 0 1M")
    img.create(str(top), 4 * MiB, backing="base.raw", backing_fmt="raw")
    qemu_io(top, "write -P 6 512k 8k")
    return top


def _compressed(tmp: Path) -> Path:
    src, out = tmp / "src.qcow2", tmp / "compressed.qcow2"
    img.create(str(src), 4 * MiB)
    qemu_io(src, "write -P 7 0 1M", "write -P 8 3M 64k")
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(out)], check=True)
    qemu_io(out, "write -P 9 2M 64k")  # a plain cluster among compressed ones
    return out


def _subclusters(tmp: Path) -> Path:
    path = tmp / "sub.qcow2"
    img.create(str(path), 4 * MiB, extra_options={"extended_l2": "on", "cluster_size": "131072"})
    qemu_io(path, "write -P 10 4k 4k", "write -P 11 200k 20k", "write -z 1M 4k")
    return path


def _odd(tmp: Path) -> Path:
    path = tmp / "odd.qcow2"
    img.create(str(path), 5 * MiB + 1536, cluster_size=4096)
    qemu_io(path, "write -P 12 0 3k", f"write -P 13 {5 * MiB} 1536", "write -P 14 70k 1k")
    return path


@pytest.mark.parametrize("build", [_chain, _raw_backing, _compressed, _subclusters, _odd])
def test_map_reading_matches_the_image(tmp_path: Path, build: Any) -> None:
    """The hash pass of a qcow2 reads data clusters straight from the files
    by ``qemu-img map``; what it reads hashes like the image read by
    ``qemu-img convert``, and like the image server's NBD export."""
    path = build(tmp_path)
    size = int(img.info(str(path))["virtual-size"])
    files = mapped.direct_chain(str(path))
    assert files is not None and files[0] == str(path)
    server = image.ImageServer(
        tmp_path / "w", {0: image.ImageInfo(str(path), "qcow2", size, False)}
    )
    server.start({0: "config.vms[0].paths[0]"})
    try:
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(server.export("e", "src0"))
        try:
            want = hash_list(path, tmp_path)
            assert leaf_hashes(mapped.mapped_chunks(str(path), size, files, h)) == want
            assert leaf_hashes(changes.nbd_chunks(h, size)) == want
        finally:
            h.shutdown()
    finally:
        server.stop()
