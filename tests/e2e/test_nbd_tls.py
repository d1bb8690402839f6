"""NBD targets over TLS with a pre-shared key per job and disk, end to end.

While a job copies (a rate-limited node keeps its target up for seconds), a
client without the target's key gets nothing from the hub's NBD port: plain
NBD is refused before any export is served, TLS with another key fails the
handshake, so nothing can read or write the restore point. The key exists
only in two files of mode 0600 (the hub's target folder, the node's job
folder) while the job runs, is gone after it (completed, cancelled, failed,
the hub killed and restarted), and appears in no log or other file.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import nbd
import pytest

from fixtures.cluster import Cluster, cli
from fixtures.processes import busy_ports, processes_under
from sendense.qemu import img
from sendense.qemu.qsd import QsdVm

MiB = 1 << 20
# 16 MiB at 4 MiB/s: about 4 s of copy (1 MiB requests).
SLOW_NODE = {"SENDENSE_NODE_MAX_RATE": str(4 * MiB), "SENDENSE_NODE_REQUEST_SIZE": str(MiB)}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, node_env=dict(SLOW_NODE))
    with ThreadPoolExecutor(1) as pool:
        node_started = pool.submit(c.start_node)
        try:
            c.start_hub()
        finally:
            node_started.result()
    yield c
    c.stop()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def write_random(vm: QsdVm, length: int) -> None:
    h = vm.guest(0)
    for at in range(0, length, 4 * MiB):
        h.pwrite(os.urandom(min(4 * MiB, length - at)), at)
    h.flush()
    h.shutdown()


def node_report(c: Cluster, job_id: str) -> dict[str, Any]:
    import httpx

    r = httpx.get(
        f"{c.node_url}/api/v1/status/{job_id}",
        headers={"Authorization": f"Bearer {c.node_token}"},
        timeout=5,
        verify=c.node_verify,
    )
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def wait_mid_copy(c: Cluster, job_id: str) -> None:
    def moving() -> bool:
        st = node_report(c, job_id)
        assert st["status"] == "running", st
        return any(d.get("bytes_done", 0) >= MiB for d in st["disks"].values())

    wait_for("the copy to move", moving)


def hub_key_files(c: Cluster) -> list[Path]:
    return sorted((c.hub_dir / "run").glob("tls-*/keys.psk"))


def node_key_files(c: Cluster) -> list[Path]:
    return sorted((c.node_dir / "jobs").glob("*/tls-*.psk"))


def worker_gone(c: Cluster, job_id: str) -> bool:
    pid = int((c.node_dir / "jobs" / job_id / "pid").read_text())
    return not any(p == pid for p, cmd in processes_under(c.root) if "sendense.node.worker" in cmd)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def files_containing(root: Path, secret: bytes) -> list[Path]:
    """Every file under ``root`` holding ``secret`` (logs, status files, catalog...)."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if secret in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found


def running_target(c: Cluster, job_id: str) -> tuple[str, int, str, Path]:
    """(backup id, port, export name, hub key file) of the job's one target."""
    job = c.client.get(f"/api/v1/jobs/{job_id}")
    (backup_id,) = job["backups"]
    b = c.client.get(f"/api/v1/backups/{backup_id}")
    (port,) = busy_ports(c.nbd_first, c.nbd_last)
    return (
        backup_id,
        port,
        b["nbd_export_name"],
        c.hub_dir / "run" / f"tls-{backup_id}" / "keys.psk",
    )


def nbdinfo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nbdinfo", *args], capture_output=True, text=True, timeout=30, check=False
    )


def start_mid_copy(cluster: Cluster, make_vm: Callable[..., QsdVm], name: str) -> tuple[QsdVm, str]:
    vm = make_vm(name, [32 * MiB])
    write_random(vm, 16 * MiB)
    cluster.register(vm)
    job_id = cluster.start_backup(name, "full")["job_id"]
    wait_mid_copy(cluster, job_id)
    return vm, job_id


def assert_keys_gone(c: Cluster, job_id: str) -> None:
    wait_for("the worker to exit", lambda: worker_gone(c, job_id))
    assert hub_key_files(c) == []
    assert list((c.hub_dir / "run").glob("tls-*")) == []
    wait_for("the node to drop its key files", lambda: not node_key_files(c), timeout=10)


def test_target_refuses_clients_without_its_key(cluster: Cluster, make_vm, tmp_path: Path) -> None:
    vm, job_id = start_mid_copy(cluster, make_vm, "tls1")
    backup_id, port, export, hub_file = running_target(cluster, job_id)

    # The key: in one file each side, mode 0600, the same key.
    assert mode(hub_file) == 0o600 and mode(hub_file.parent) == 0o700
    (node_file,) = node_key_files(cluster)
    assert node_file == cluster.node_dir / "jobs" / job_id / "tls-2000.psk"
    assert mode(node_file) == 0o600
    line = hub_file.read_text()
    assert node_file.read_text() == line
    username, key = line.strip().split(":")
    assert username == "sendense" and len(key) == 64
    int(key, 16)

    # Plain NBD: no export without TLS.
    r = nbdinfo(f"nbd://127.0.0.1:{port}/{export}")
    assert r.returncode != 0, r.stdout
    # TLS with another key: the handshake fails.
    wrong = tmp_path / "wrong.psk"
    wrong.write_text(f"sendense:{os.urandom(32).hex()}\n")
    wrong.chmod(0o600)
    r = nbdinfo(f"nbds://sendense@127.0.0.1:{port}/{export}?tls-psk-file={wrong}")
    assert r.returncode != 0, r.stdout
    assert "handshake" in r.stderr or "TLS" in r.stderr, r.stderr
    # A writer with another key never gets to write.
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_username("sendense")
    h.set_tls_psk_file(str(wrong))
    with pytest.raises(nbd.Error):
        h.connect_uri(f"nbds://127.0.0.1:{port}/{export}")
    with pytest.raises(nbd.Error):
        h.pwrite(b"\xff" * 4096, 0)
    # A writer without TLS does not either.
    plain = nbd.NBD()
    with pytest.raises(nbd.Error):
        plain.connect_uri(f"nbd://127.0.0.1:{port}/{export}")
    # The right key is what opens it (read the size only).
    r = nbdinfo("--size", f"nbds://sendense@127.0.0.1:{port}/{export}?tls-psk-file={hub_file}")
    assert r.returncode == 0 and int(r.stdout) == 32 * MiB, r.stderr

    job = cluster.wait_job(job_id)
    assert job["status"] == "completed", job
    b = cluster.client.get(f"/api/v1/backups/{backup_id}")
    assert img.compare(b["file_path"], str(vm.disks[0]))
    assert_keys_gone(cluster, job_id)
    # In no log, status file, catalog or other file of either side.
    assert files_containing(cluster.root, key.encode()) == []


def test_keys_go_when_a_job_is_cancelled(cluster: Cluster, make_vm) -> None:
    _vm, job_id = start_mid_copy(cluster, make_vm, "tls2")
    _, _, _, hub_file = running_target(cluster, job_id)
    key = hub_file.read_text().strip().split(":")[1]
    assert len(node_key_files(cluster)) == 1

    r = cluster.http("POST", f"/api/v1/jobs/{job_id}/cancel")
    assert r.status_code in (200, 202), r.text
    job = cluster.wait_job(job_id)
    assert job["status"] == "cancelled", job
    assert_keys_gone(cluster, job_id)
    assert files_containing(cluster.root, key.encode()) == []


def test_keys_go_when_the_worker_is_killed(cluster: Cluster, make_vm) -> None:
    """A worker killed with SIGKILL removes nothing: the node does, the hub fails the job."""
    _vm, job_id = start_mid_copy(cluster, make_vm, "tls3")
    _, _, _, hub_file = running_target(cluster, job_id)
    key = hub_file.read_text().strip().split(":")[1]
    pid = int((cluster.node_dir / "jobs" / job_id / "pid").read_text())
    os.kill(pid, signal.SIGKILL)

    job = cluster.wait_job(job_id)
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "worker_died", job
    assert_keys_gone(cluster, job_id)
    assert files_containing(cluster.root, key.encode()) == []


def test_hub_killed_mid_copy_adopts_the_tls_target(cluster: Cluster, make_vm) -> None:
    """A restarted hub takes back the job (its target still requires the key,
    the node still holds it) and removes the key when the job ends."""
    vm, job_id = start_mid_copy(cluster, make_vm, "tls4")
    backup_id, _, _, hub_file = running_target(cluster, job_id)
    key = hub_file.read_text().strip().split(":")[1]
    cluster.kill("hub", signal.SIGKILL)
    cluster.start_hub()

    job = cluster.wait_job(job_id)
    assert job["status"] == "completed", job
    b = cluster.client.get(f"/api/v1/backups/{backup_id}")
    assert img.compare(b["file_path"], str(vm.disks[0]))
    assert_keys_gone(cluster, job_id)
    assert files_containing(cluster.root, key.encode()) == []


def test_hub_restarted_after_its_targets_died_serves_them_with_their_keys(
    cluster: Cluster, make_vm
) -> None:
    """Recovery serves targets that died with the hub again, with the same key
    (the node's mover reconnects with the one it holds), and removes the key
    folders when the job ends."""
    vm, job_id = start_mid_copy(cluster, make_vm, "tls5")
    backup_id, _, _, hub_file = running_target(cluster, job_id)
    key = hub_file.read_text().strip().split(":")[1]
    cluster.kill("hub", signal.SIGKILL)
    for pid, cmd in processes_under(cluster.root):  # the machine lost them too
        if "qemu-nbd" in cmd:
            os.kill(pid, signal.SIGKILL)
    assert hub_file.exists()  # nobody removed it yet
    cluster.start_hub()

    job = cluster.wait_job(job_id)
    assert job["status"] == "completed", job
    assert any("served again" in m for m in job["messages"]), job["messages"]
    b = cluster.client.get(f"/api/v1/backups/{backup_id}")
    assert img.compare(b["file_path"], str(vm.disks[0]))
    assert_keys_gone(cluster, job_id)
    assert files_containing(cluster.root, key.encode()) == []


# ------------------------------------------------------ exports beyond loopback


@pytest.fixture
def open_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A hub whose NBD listens on every address (beyond loopback)."""
    c = Cluster(
        tmp_path,
        hub_env={"SENDENSE_NBD_BIND": "0.0.0.0", "SENDENSE_NBD_ADVERTISE_HOST": "127.0.0.1"},
    )
    with ThreadPoolExecutor(1) as pool:
        node_started = pool.submit(c.start_node)
        try:
            c.start_hub()
        finally:
            node_started.result()
    yield c
    c.stop()


def read_all(url: str, key_file: Path | None, size: int) -> bytes:
    h = nbd.NBD()
    if key_file is not None:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_username("sendense")
        h.set_tls_psk_file(str(key_file))
    h.connect_uri(url)
    try:
        return b"".join(h.pread(min(4 * MiB, size - at), at) for at in range(0, size, 4 * MiB))
    finally:
        h.shutdown()


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)


def console_signed_in(c: Cluster) -> httpx.Client:
    client = httpx.Client(base_url=c.hub_url, timeout=60, follow_redirects=False)
    form = client.get("/ui/signin")
    r = client.post("/ui/signin", data={"csrf": csrf_of(form.text), "token": c.admin_token})
    assert r.status_code == 303, r.text
    return client


def test_export_beyond_loopback_requires_its_key_shown_once(
    open_cluster: Cluster, make_vm, tmp_path: Path
) -> None:
    c = open_cluster
    vm = make_vm("tlsx", [8 * MiB])
    write_random(vm, 2 * MiB)
    c.register(vm)
    job = c.backup("tlsx", "full")
    (backup_id,) = job["backups"]
    b = c.client.get(f"/api/v1/backups/{backup_id}")
    reference = tmp_path / "ref.raw"
    subprocess.run(
        ["qemu-img", "convert", "-U", "-O", "raw", b["file_path"], str(reference)], check=True
    )

    r = c.http("POST", f"/api/v1/backups/{backup_id}/export", json={})
    assert r.status_code == 201, r.text
    export = r.json()
    assert export["status"] == "serving" and export["tls"] is True, export
    assert export["url"].startswith("nbds://127.0.0.1:"), export
    assert export["tls_username"] == "sendense"
    key = export["tls_psk"]
    assert len(key) == 64 and int(key, 16) >= 0
    key_file = c.hub_dir / "run" / "exports" / f"{export['job_id']}.tls" / "keys.psk"
    assert mode(key_file) == 0o600
    # Never shown again.
    shown = c.client.get(f"/api/v1/backups/{backup_id}/export")
    assert shown["tls"] is True and shown["tls_psk"] is None, shown
    assert all(e["tls_psk"] is None for e in c.client.get("/api/v1/exports")["exports"])

    # What a user does with the key: a psktool file.
    mine = tmp_path / "export.psk"
    mine.write_text(f"{export['tls_username']}:{key}\n")
    mine.chmod(0o600)
    assert read_all(export["url"], mine, 8 * MiB) == reference.read_bytes()
    plain_url = export["url"].replace("nbds://", "nbd://")
    with pytest.raises(nbd.Error):
        read_all(plain_url, None, 8 * MiB)
    r2 = nbdinfo(plain_url)
    assert r2.returncode != 0, r2.stdout
    wrong = tmp_path / "wrong.psk"
    wrong.write_text(f"sendense:{os.urandom(32).hex()}\n")
    with pytest.raises(nbd.Error):
        read_all(export["url"], wrong, 8 * MiB)

    closed = c.client.request("DELETE", f"/api/v1/backups/{backup_id}/export")
    assert closed["status"] == "closed"
    assert not key_file.parent.exists()

    # The CLI prints the key of a new export (a new key) once.
    out = cli(c, "backup", "export", backup_id).stdout
    line = next(x for x in out.splitlines() if x.startswith("sendense:"))
    key2 = line.split(":", 1)[1].strip()
    assert len(key2) == 64 and key2 != key
    assert "nbds://" in out
    cli(c, "backup", "unexport", backup_id)
    assert list((c.hub_dir / "run" / "exports").iterdir()) == []

    # The console shows a new export's key once too, on a page no cache keeps.
    admin = console_signed_in(c)
    page = admin.get(f"/ui/backups/{backup_id}")
    r = admin.post(f"/ui/backups/{backup_id}/export", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 200 and "no-store" in r.headers["cache-control"], r.text
    url = re.search(r'id="export-url">(nbds://[^<]+)<', r.text)
    psk = re.search(r'id="export-psk">sendense:([0-9a-f]{64})<', r.text)
    assert url and psk, r.text
    key3 = psk.group(1)
    assert key3 not in (key, key2)
    mine.write_text(f"sendense:{key3}\n")
    assert read_all(url.group(1), mine, 8 * MiB) == reference.read_bytes()
    page = admin.get(f"/ui/backups/{backup_id}")
    assert url.group(1) in page.text and key3 not in page.text
    r = admin.post(f"/ui/backups/{backup_id}/export/close", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303, r.text
    assert list((c.hub_dir / "run" / "exports").iterdir()) == []
    for k in (key, key2, key3):  # the user's own file aside
        assert [p for p in files_containing(c.root, k.encode()) if p != mine] == []
