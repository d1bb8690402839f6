"""Whole-disk restore (POST /api/v1/restores) and instant access (export over
NBD), end to end with real backups.

The reference of every comparison is a raw copy of the VM's own disk taken
right after each backup (the guest writes nothing meanwhile), never the
backup itself: a restored image must read as the VM's disk did.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest

from fixtures.cluster import Cluster, cli
from fixtures.lifecycle import (
    MiB,
    error_body,
    lifecycle_cluster,
    raw_copy,
    wait_for,
    write_random,
    write_zeroes,
)
from sendense.qemu import img

SIZE = 32 * MiB


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


def two_points(
    c: Cluster, make_vm: Any, tmp_path: Path, name: str
) -> list[tuple[dict[str, Any], Path]]:
    """A full and an incremental (with zeroes over old data), each with a raw
    copy of the VM's disk as it was backed up."""
    vm = make_vm(name, [SIZE])
    c.register(vm)
    out = []
    write_random(vm, 0, 0, 6 * MiB)
    write_random(vm, 0, SIZE - MiB, MiB)
    for kind in ("full", "incremental"):
        job = c.backup(name, kind)
        (backup_id,) = job["backups"]
        b = c.client.get(f"/api/v1/backups/{backup_id}")
        out.append((b, raw_copy(vm.disks[0], tmp_path / f"{name}-{kind}.raw")))
        write_random(vm, 0, 10 * MiB, 3 * MiB)
        write_zeroes(vm, 0, 0, 2 * MiB)  # zeroes over data the full holds
    return out


def restore(c: Cluster, backup_id: str, **destination: Any) -> dict[str, Any]:
    r = c.http(
        "POST", "/api/v1/restores", json={"backup_id": backup_id, "destination": destination}
    )
    assert r.status_code == 202, r.text
    job: dict[str, Any] = c.wait_job(r.json()["job_id"])
    return job


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)
def test_restore_points_to_qcow2_and_raw_files_read_as_the_vm_did(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    points = two_points(cluster, make_vm, tmp_path, "rest1")
    restores = cluster.hub_dir / "restores"
    for i, (b, reference) in enumerate(points):
        for fmt in ("qcow2", "raw"):
            path = restores / f"p{i}.{fmt}"
            job = restore(cluster, b["backup_id"], type="file", path=str(path), format=fmt)
            assert job["status"] == "completed", job
            assert job["kind"] == "restore" and job["percent"] == 100.0
            assert job["result"]["destination"]["path"] == str(path)
            assert img.compare(str(path), str(reference)), f"{fmt} of point {i} differs"
            info = img.info(str(path))
            assert info["format"] == fmt
            assert "backing-filename" not in info, "a restored image stands alone"
            if fmt == "raw":  # zeros are not written: the file is sparse
                assert img.disk_usage(str(path)) < SIZE // 2
    assert sorted(p.name for p in restores.iterdir()) == sorted(
        f"p{i}.{f}" for i in range(2) for f in ("qcow2", "raw")
    ), "no partial file left behind"


def test_refusals_name_what_is_wrong_and_write_nothing(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    ((b, _), _) = two_points(cluster, make_vm, tmp_path, "rest2")
    restores = cluster.hub_dir / "restores"
    (restores / "taken.qcow2").write_bytes(b"mine")
    os.symlink("/tmp", restores / "out")
    jobs_before = cluster.client.get("/api/v1/jobs", limit=1000)["total"]

    def post(backup_id: str = b["backup_id"], **dest: Any) -> Any:
        return cluster.http(
            "POST", "/api/v1/restores", json={"backup_id": backup_id, "destination": dest}
        )

    for path in ("/tmp/x.qcow2", str(restores / ".." / "x.qcow2"), str(restores / "out" / "x")):
        body = error_body(post(type="file", path=path), 400, "invalid_request")
        assert body["details"]["field"] == "destination.path", body
        assert "outside the restore directories" in body["message"]
    error_body(post(type="file", path="relative.qcow2"), 400, "invalid_request")
    error_body(post(type="file", path=str(restores / "no" / "x.qcow2")), 400, "invalid_request")
    body = error_body(post(type="file", path=str(restores / "taken.qcow2")), 409, "exists")
    assert body["details"]["path"] == str(restores / "taken.qcow2")
    error_body(post(type="file", path=str(restores / "a"), format="vmdk"), 400, "invalid_request")
    error_body(post(type="nbd", url="http://example.com/x"), 400, "invalid_request")
    error_body(post(type="tape"), 400, "invalid_request")
    error_body(post(backup_id="nope", type="file", path=str(restores / "a")), 404, "not_found")
    viewer = cluster.client.post("/api/v1/tokens", {"name": "v", "role": "viewer"})["token"]
    r = cluster.http(
        "POST",
        "/api/v1/restores",
        token=viewer,
        json={"backup_id": b["backup_id"], "destination": {"type": "file", "path": "/x"}},
    )
    error_body(r, 403, "forbidden")

    assert (restores / "taken.qcow2").read_bytes() == b"mine"
    assert sorted(p.name for p in restores.iterdir()) == ["out", "taken.qcow2"]
    assert cluster.client.get("/api/v1/jobs", limit=1000)["total"] == jobs_before


def test_restore_into_an_nbd_target(cluster: Cluster, make_vm: Any, tmp_path: Path) -> None:
    (_, (b, reference)) = two_points(cluster, make_vm, tmp_path, "rest3")
    target = tmp_path / "target.raw"
    img.create(str(target), SIZE, fmt="raw")
    sock = tmp_path / "target.sock"
    server = subprocess.Popen(
        ["qemu-nbd", "--format=raw", f"--socket={sock}", "--export-name=t", str(target)]
    )
    try:
        wait_for("the target to listen", sock.exists)
        job = restore(cluster, b["backup_id"], type="nbd", url=f"nbd+unix:///t?socket={sock}")
        assert job["status"] == "completed", job
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
    assert img.compare(str(target), str(reference))


def attach_and_read(url_host: str, port: int, export: str, reference: Path, tmp_path: Path) -> None:
    """Attach the export to a qemu-storage-daemon (as a hypervisor would) and
    read the whole disk through it."""
    sock = tmp_path / "qsd.sock"
    qsd = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=nbd,node-name=backup,server.type=inet,server.host={url_host},"
            f"server.port={port},export={export},read-only=on",
            "--nbd-server",
            f"addr.type=unix,addr.path={sock}",
            "--export",
            "type=nbd,id=e0,node-name=backup,name=attached",
        ]
    )
    try:
        wait_for("qemu-storage-daemon to attach", sock.exists)
        assert img.compare(f"nbd+unix:///attached?socket={sock}", str(reference))
    finally:
        qsd.send_signal(signal.SIGTERM)
        qsd.wait(timeout=10)


def split(url: str) -> tuple[str, int, str]:
    assert url.startswith("nbd://"), url
    hostport, _, export = url.removeprefix("nbd://").partition("/")
    host, _, port = hostport.rpartition(":")
    return host, int(port), export


@pytest.mark.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)
def test_export_serves_a_restore_point_and_holds_it(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    (full, (b, reference)) = two_points(cluster, make_vm, tmp_path, "exp1")
    backup_file = b["file_path"]
    before = sha256(backup_file)
    r = cluster.http("POST", f"/api/v1/backups/{b['backup_id']}/export", json={})
    assert r.status_code == 201, r.text
    export = r.json()
    assert export["status"] == "serving" and export["writable"] is False
    host, port, name = split(export["url"])
    attach_and_read(host, port, name, reference, tmp_path)

    shown = cluster.client.get(f"/api/v1/backups/{b['backup_id']}/export")
    assert shown["export_id"] == export["export_id"] and shown["url"] == export["url"]
    assert [e["export_id"] for e in cluster.client.get("/api/v1/exports")["exports"]] == [
        export["export_id"]
    ]
    again = cluster.http("POST", f"/api/v1/backups/{b['backup_id']}/export", json={})
    assert error_body(again, 409, "export_exists")["details"]["export_id"] == export["export_id"]
    # the chain is held: neither the exported point nor its parent can go
    for point in (b, full[0]):
        r = cluster.http("DELETE", f"/api/v1/backups/{point['backup_id']}?cascade=true")
        error_body(r, 409, "in_use")

    closed = cluster.client.request("DELETE", f"/api/v1/backups/{b['backup_id']}/export")
    assert closed["status"] == "closed" and closed["url"] is None
    assert not listening(host, port)
    error_body(cluster.http("GET", f"/api/v1/backups/{b['backup_id']}/export"), 404, "not_found")
    assert sha256(backup_file) == before
    assert cluster.client.get(f"/api/v1/jobs/{export['job_id']}")["status"] == "completed"
    cluster.client.request("DELETE", f"/api/v1/backups/{b['backup_id']}")  # free again


def test_writable_export_writes_to_an_overlay_never_the_backup(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    (_, (b, reference)) = two_points(cluster, make_vm, tmp_path, "exp2")
    before = sha256(b["file_path"])
    export = cluster.client.post(f"/api/v1/backups/{b['backup_id']}/export", {"writable": True})
    assert export["writable"] is True and export["status"] == "serving"
    overlays = list((cluster.hub_dir / "run" / "exports").glob("*.overlay.qcow2"))
    assert len(overlays) == 1

    data = os.urandom(MiB)
    h = nbd.NBD()
    h.connect_uri(export["url"])
    try:
        h.pwrite(data, 5 * MiB)
        h.flush()
        assert h.pread(MiB, 5 * MiB) == data  # the writer sees its write
    finally:
        h.shutdown()

    cluster.client.request("DELETE", f"/api/v1/backups/{b['backup_id']}/export")
    assert not overlays[0].exists(), "the overlay goes with the export"
    assert sha256(b["file_path"]) == before, "the backup file never changed"
    assert img.compare(b["file_path"], str(reference))
    assert img.check(b["file_path"])["check-errors"] == 0


def test_an_export_of_a_dead_hub_is_cleaned_up_at_restart(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    (_, (b, _)) = two_points(cluster, make_vm, tmp_path, "exp3")
    export = cluster.client.post(f"/api/v1/backups/{b['backup_id']}/export", {"writable": True})
    host, port, _ = split(export["url"])
    pidfile = cluster.hub_dir / "run" / "exports" / f"{export['job_id']}.pid"
    pid = int(pidfile.read_text())
    cluster.kill("hub")
    cluster.start_hub()

    job = cluster.client.get(f"/api/v1/jobs/{export['job_id']}")
    assert job["status"] == "failed" and job["error"]["code"] == "hub_restarted", job
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the export's qemu-nbd outlived its hub"
    assert not listening(host, port)
    assert not list((cluster.hub_dir / "run" / "exports").iterdir())
    # the holds went with the job
    deleted = cluster.client.request("DELETE", f"/api/v1/backups/{b['backup_id']}")["deleted"]
    assert b["backup_id"] in deleted


def test_cli_restore_disk_and_export(cluster: Cluster, make_vm: Any, tmp_path: Path) -> None:
    (_, (b, reference)) = two_points(cluster, make_vm, tmp_path, "cli6")
    path = cluster.hub_dir / "restores" / "cli.raw"
    out = cli(
        cluster, "restore", "disk", b["backup_id"], "--to", str(path), "--format", "raw", "--wait"
    )
    assert "completed" in out.stdout and str(path) in out.stdout
    assert img.compare(str(path), str(reference))
    refused = cli(cluster, "restore", "disk", b["backup_id"], "--to", "/etc/x.raw", ok=False)
    assert "outside the restore directories" in refused.stdout + refused.stderr

    export = json.loads(cli(cluster, "--json", "backup", "export", b["backup_id"]).stdout)
    assert export["status"] == "serving" and export["url"].startswith("nbd://")
    assert export["url"] in cli(cluster, "export", "ls").stdout.replace("\n", "")
    assert img.compare(export["url"], str(reference))
    out = cli(cluster, "backup", "unexport", b["backup_id"])
    assert "closed" in out.stdout
    assert cluster.client.get("/api/v1/exports")["exports"] == []
