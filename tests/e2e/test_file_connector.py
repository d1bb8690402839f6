"""The ``file`` source end to end (hub + node processes, real qemu): plain
images and block devices, change tracking by block hashes kept on the node.

The "block device" here is a loop-free stand-in: the tests cannot create a
block device without root and a loop driver, so a VM's third disk is the
path ``<tmp>/dev/vg0/lv0``, a symlink to a raw image, which is how LVM
exposes a logical volume (``/dev/vg/lv`` -> ``/dev/dm-N``). The node reads it
through the link and measures its size with ``lseek(SEEK_END)`` as it does
for a device; what only a real device does (``host_device`` driver, size
without mtime) is in the connector's docstring, not tested here.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from fixtures.cluster import Cluster, cli
from sendense.mover.digest import algorithm_of
from sendense.mover.verify import digest_of_image
from sendense.qemu import img
from sendense.qemu.qsd import QsdVm

MiB = 1 << 20
BLOCK = 64 * 1024


def error_body(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body: dict[str, Any] = r.json()
    assert set(body) == {"error", "message", "details"}, body
    if code is not None:
        assert body["error"] == code, body
    return body


def make_image(path: Path, size: int, fmt: str, data: list[tuple[int, int]]) -> None:
    """An image with random data at ``(offset, length)`` places, the rest holes."""
    img.create(str(path), size, fmt=fmt)
    for offset, length in data:
        write(path, fmt, offset, os.urandom(length))


def write(path: Path, fmt: str, offset: int, data: bytes) -> None:
    """Write as a stopped VM's disk is changed: through qemu-io for qcow2,
    in place for raw (and the device stand-in)."""
    if fmt == "raw":
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    pattern = path.with_suffix(".pattern")
    pattern.write_bytes(data)
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -s {pattern} {offset} {len(data)}", str(path)],
        check=True,
        capture_output=True,
    )
    pattern.unlink()


def backups_of(c: Cluster, job: dict[str, Any]) -> dict[int, dict[str, Any]]:
    out = {}
    for bid in job["backups"]:
        b = c.client.get(f"/api/v1/backups/{bid}")
        out[b["disk_id"]] = b
    return out


def snapshot(images: list[Path], into: Path) -> list[Path]:
    """Copies of the images as they are now (what the backup must read back as)."""
    into.mkdir(parents=True, exist_ok=True)
    out = []
    for i, path in enumerate(images):
        copy = into / f"{i}-{Path(os.path.realpath(path)).name}"
        shutil.copyfile(os.path.realpath(path), copy)
        out.append(copy)
    return out


def assert_restores_exactly(
    c: Cluster, job: dict[str, Any], copies: list[Path]
) -> dict[int, dict[str, Any]]:
    got = backups_of(c, job)
    assert sorted(got) == list(range(len(copies)))
    for i, b in got.items():
        assert b["status"] == "completed", b
        assert img.compare(b["file_path"], str(copies[i])), (i, b["file_path"])
        assert digest_of_image(b["file_path"], algorithm=algorithm_of(b["digest"])) == b["digest"]
    return got


def test_file_source_raw_qcow2_and_device_standin_full_then_incremental(
    cluster: Cluster, tmp_path: Path
) -> None:
    """One VM, three disks: a raw image, a qcow2 image and the block device
    stand-in (module docstring). Full, then random writes, then an
    incremental that moves only the changed blocks and reads back exactly as
    the images did at backup time; then an incremental with no change moves
    nothing."""
    images = tmp_path / "images"
    images.mkdir()
    raw, qcow2, lv_target = images / "d0.raw", images / "d1.qcow2", images / "lv0.img"
    make_image(raw, 24 * MiB, "raw", [(0, 3 * MiB), (20 * MiB, 100_000)])
    make_image(qcow2, 16 * MiB, "qcow2", [(MiB, 2 * MiB), (16 * MiB - 4096, 4096)])
    make_image(lv_target, 8 * MiB + 4096, "raw", [(0, MiB)])  # not a block multiple
    lv = tmp_path / "dev" / "vg0" / "lv0"
    lv.parent.mkdir(parents=True)
    lv.symlink_to(lv_target)
    paths = [raw, qcow2, lv]
    fmts = ["raw", "qcow2", "raw"]
    # Through the CLI, as an administrator would (a VM's disks in --vm order).
    cli(
        cluster,
        "node",
        "add",
        "node1",
        cluster.node_url,
        "--token-file",
        str(cluster.node_dir / "node.token"),
        "--yes",
    )
    cli(
        cluster,
        "source",
        "add-file",
        "files",
        "--node",
        "node1",
        *(f"--vm=files1={p}" for p in paths),
    )
    found = json.loads(cli(cluster, "--json", "vm", "discover", "files").stdout)["vms"]
    disks = found[0]["disks"]
    assert [d["disk_key"] for d in disks] == [2000, 2001, 2002]
    assert [d["capacity_bytes"] for d in disks] == [24 * MiB, 16 * MiB, 8 * MiB + 4096]
    assert [d["path"] for d in disks] == [str(p) for p in paths]

    copies = snapshot(paths, tmp_path / "at-full")
    full = cluster.backup("files1", "full")
    fulls = assert_restores_exactly(cluster, full, copies)
    for b in fulls.values():
        assert b["backup_type"] == "full" and b["change_id"].startswith("sendense-file-")
    # Only allocated data moved: holes are not read.
    assert fulls[0]["bytes_transferred"] <= 3 * MiB + 2 * BLOCK
    assert fulls[1]["bytes_transferred"] <= 2 * MiB + 2 * BLOCK

    rng = random.Random(8)
    changed: dict[int, set[int]] = {}
    for i, (path, fmt) in enumerate(zip(paths, fmts, strict=True)):
        size = disks[i]["capacity_bytes"]
        count = -(-size // BLOCK)
        blocks = [*rng.sample(range(count - 1), 5), count - 1]  # and the (short) last one
        changed[i] = set(blocks)
        for block in blocks:
            span = min(BLOCK, size - block * BLOCK)  # the last block may be short
            length = min(4096, span)
            offset = block * BLOCK + rng.randrange(0, span - length + 1, 512)
            write(Path(os.path.realpath(path)), fmt, offset, os.urandom(length))
    copies = snapshot(paths, tmp_path / "at-incr")
    inc = cluster.backup("files1", "auto")
    assert inc["messages"] == [], inc["messages"]
    incs = assert_restores_exactly(cluster, inc, copies)
    for i, b in incs.items():
        assert b["backup_type"] == "incremental", b
        assert b["parent_backup_id"] == fulls[i]["backup_id"]
        # Exactly the changed blocks moved (the last block of disk 2 is short).
        size = disks[i]["capacity_bytes"]
        moved = sum(min(BLOCK, size - k * BLOCK) for k in changed[i])
        assert b["bytes_transferred"] == moved, (i, b["bytes_transferred"], moved)

    again = cluster.backup("files1", "auto")
    for b in assert_restores_exactly(cluster, again, copies).values():
        assert b["backup_type"] == "incremental" and b["bytes_transferred"] == 0, b


def test_file_source_refusals_and_a_failed_backup_does_not_poison_the_next(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Bad configs are 400s naming the field; an image a running QEMU writes
    (qemu-storage-daemon holding it writable) is refused (409 image_in_use);
    an image changing during the copy fails the job (image_changed), and
    the next incremental still builds on the last good restore point; with
    its block hash list gone the node reads in full and says why."""
    node = cluster.client.post("/api/v1/nodes", cluster.node_body("node1"))

    def source(name: str, config: dict[str, Any]) -> httpx.Response:
        return cluster.http(
            "POST",
            "/api/v1/sources",
            json={"name": name, "node_id": node["node_id"], "type": "file", "config": config},
        )

    body = error_body(source("bad1", {"vms": [{"name": "x"}]}), 400, "invalid_request")
    assert "config.vms[0].paths" in body["message"], body
    body = error_body(
        source("bad2", {"vms": [{"name": "x", "paths": ["/ok.raw", "images/a.qcow2"]}]}), 400
    )
    assert "config.vms[0].paths[1] must be an absolute path" in body["message"], body
    missing = tmp_path / "nothing-here.qcow2"
    src = source("bad3", {"vms": [{"name": "ghost", "paths": [str(missing)]}]}).json()
    r = cluster.http("POST", "/api/v1/vms/discover", json={"source_id": src["source_id"]})
    body = error_body(r, 400)
    assert f"config.vms[0].paths[0]: cannot read {missing}" in body["message"], body
    cluster.http("DELETE", f"/api/v1/sources/{src['source_id']}")

    images = tmp_path / "images"
    images.mkdir()
    busy, disk = images / "busy.qcow2", images / "data.raw"
    make_image(busy, 8 * MiB, "qcow2", [(0, MiB)])
    make_image(disk, 32 * MiB, "raw", [(0, 16 * MiB)])

    # A running VM holds the image writable.
    holder = QsdVm(tmp_path / "holder", "holder")
    holder.disks = [busy]
    holder.start(guest_exports=False)
    try:
        src = source("busy", {"vms": [{"name": "busy1", "paths": [str(busy)]}]}).json()
        r = cluster.http("POST", "/api/v1/vms/discover", json={"source_id": src["source_id"]})
        body = error_body(r, 409, "image_in_use")
        assert f"{busy} is open for writing by a running VM" in body["message"], body
    finally:
        holder.stop()
    found = cluster.client.post("/api/v1/vms/discover", {"source_id": src["source_id"]})
    assert found["vms"][0]["disks"][0]["capacity_bytes"] == 8 * MiB
    holder.start(guest_exports=False)
    try:
        started = cluster.start_backup("busy1", "full")
        job = cluster.wait_job(started["job_id"])
        assert job["status"] == "failed", job
        assert "is open for writing by a running VM" in str(job["error"]), job
    finally:
        holder.stop()

    src = source("files", {"vms": [{"name": "data1", "paths": [str(disk)]}]}).json()
    cluster.client.post("/api/v1/vms/discover", {"source_id": src["source_id"]})
    full = cluster.backup("data1", "full")
    first = backups_of(cluster, full)[0]

    # A writer changes the image during the next backup.
    write(disk, "raw", 5 * BLOCK, os.urandom(BLOCK))
    stop = threading.Event()

    def writer() -> None:
        fd = os.open(disk, os.O_WRONLY)
        try:
            while not stop.wait(0.005):
                os.pwrite(fd, os.urandom(512), 30 * MiB)
        finally:
            os.close(fd)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        started = cluster.start_backup("data1", "incremental")
        job = cluster.wait_job(started["job_id"])
    finally:
        stop.set()
        thread.join()
    assert job["status"] == "failed", job
    assert f"{disk} changed while it was read" in str(job["error"]), job

    # Not poisoned: the next incremental builds on the full and reads back exactly.
    copies = snapshot([disk], tmp_path / "after-failure")
    inc = cluster.backup("data1", "auto")
    b = assert_restores_exactly(cluster, inc, copies)[0]
    assert b["backup_type"] == "incremental" and b["parent_backup_id"] == first["backup_id"], b
    assert b["bytes_transferred"] == 2 * BLOCK, b  # block 5 and the writer's block

    # Without the node's block hash list: a full read, and the job says why.
    shutil.rmtree(cluster.node_dir / "blockhash" / "data1")
    write(disk, "raw", 0, os.urandom(BLOCK))
    copies = snapshot([disk], tmp_path / "after-loss")
    job = cluster.backup("data1", "auto")
    b = assert_restores_exactly(cluster, job, copies)[0]
    assert job["disks"][0]["mode"] == "full", job
    assert "no block hash list for change id" in job["disks"][0]["fallback_reason"], job
    assert b["backup_type"] == "full" and b["bytes_transferred"] == 16 * MiB + BLOCK, (
        b
    )  # data + the writer block


def test_file_source_worker_killed_mid_copy_frees_the_image(tmp_path: Path) -> None:
    """The job's worker dies outright (SIGKILL) during a slowed copy: its
    image server dies with it (it is started with a parent-death signal), so
    the image is not left locked, and the job fails."""
    c = Cluster(
        tmp_path,
        node_env={"SENDENSE_NODE_MAX_RATE": str(2 * MiB), "SENDENSE_NODE_REQUEST_SIZE": str(MiB)},
    )
    c.start_node()
    c.start_hub()
    try:
        disk = tmp_path / "images" / "slow.raw"
        disk.parent.mkdir()
        make_image(disk, 32 * MiB, "raw", [(0, 24 * MiB)])
        token_file = str(c.node_dir / "node.token")
        cli(c, "node", "add", "node1", c.node_url, "--token-file", token_file, "--yes")
        cli(c, "source", "add-file", "files", "--node", "node1", f"--vm=slow1={disk}")
        cli(c, "vm", "discover", "files")
        started = c.start_backup("slow1", "full")
        auth = {"Authorization": f"Bearer {c.node_token}"}

        def node_status() -> dict[str, Any]:
            r = httpx.get(
                f"{c.node_url}/api/v1/status/{started['job_id']}",
                headers=auth,
                verify=c.node_verify,
            )
            status: dict[str, Any] = r.json()
            return status

        deadline = time.monotonic() + 30
        while not any(d.get("bytes_done", 0) >= MiB for d in node_status()["disks"].values()):
            assert time.monotonic() < deadline, node_status()
            time.sleep(0.1)
        assert server_of(disk), "the image is served while the copy runs"
        os.kill(node_status()["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server_of(disk):
            assert time.monotonic() < deadline, server_of(disk)
            time.sleep(0.05)
        write(disk, "raw", 0, os.urandom(BLOCK))  # nothing holds it: a writer may open it
        subprocess.run(["qemu-img", "info", str(disk)], check=True, capture_output=True)
        job = c.wait_job(started["job_id"], timeout=60)
        assert job["status"] == "failed", job
    finally:
        c.stop()


def server_of(path: Path) -> list[int]:
    """Pids of qemu-storage-daemon processes whose command line names ``path``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-storage-daemon" in cmdline and str(path).encode() in cmdline:
            found.append(int(entry))
    return found
