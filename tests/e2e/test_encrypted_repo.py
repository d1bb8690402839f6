"""An encrypted repository end to end (real hub, node, qemu-img, qemu-nbd).

A VM disk holds a GPT with an ext4 filesystem in which a marker file sits.
It goes through full -> incremental -> incremental -> incremental ->
consolidate -> verify -> file restore -> whole-disk restore -> export, and
at each step the test checks what a user would: the images on disk are LUKS
(``qemu-img info``) and do not contain the guest's bytes, every restore
point reads as the VM's disk did (``qemu-img compare`` with the exported
key), the file downloaded has the source's sha256, the key is in no catalog
row, no log, no command line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.cluster import Cluster, cli
from fixtures.disks import PartitionSpec, build_ext4, build_partitioned, manifest_of, tools_missing
from fixtures.lifecycle import (
    MiB,
    catalog_exec,
    error_body,
    lifecycle_cluster,
    raw_copy,
    write_random,
)
from sendense.qemu import img

pytestmark = pytest.mark.skipif(
    bool(tools_missing()), reason=f"test disk tools missing: {tools_missing()}"
)

MARKER = b"SENDENSE-PLAINTEXT-MARKER-5c1e"


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tree(tree: Path, generation: int) -> None:
    tree.mkdir(parents=True, exist_ok=True)
    (tree / "marker.txt").write_bytes((MARKER + b"\n") * 2000)
    (tree / "hello.txt").write_bytes(b"hello, generation %d\n" % generation)
    (tree / f"gen-{generation}.bin").write_bytes(os.urandom(300_000))


def put_ext4(vm: Any, ext4: Path, at: int) -> None:
    """Write a filesystem image into the guest's disk (as a guest writes)."""
    h = vm.guest(0)
    try:
        with ext4.open("rb") as f:
            while chunk := f.read(4 * MiB):
                h.pwrite(chunk, at)
                at += len(chunk)
        h.flush()
    finally:
        h.shutdown()


def qemu_nbd_cmdlines(needle: str) -> list[bytes]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"qemu-nbd\0") and needle.encode() in cmdline:
            found.append(cmdline)
    return found


class Watch:
    """Collects the command lines of qemu-nbd processes serving a folder
    while a job runs (polled every few ms)."""

    def __init__(self, needle: str) -> None:
        self.needle = needle
        self.seen: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.seen += qemu_nbd_cmdlines(self.needle)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def open_with_key(image: str, keyfile: Path, raw: Path) -> None:
    """What docs/security.md tells an administrator: plain qemu-img and the
    exported key file, the chain's backing layers given the same secret."""
    depth = len(img.info(image, backing_chain=True))
    opts = ",".join(
        ["driver=qcow2", f"file.filename={image}"]
        + [f"{'backing.' * i}encrypt.key-secret=sec0" for i in range(depth)]
    )
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "--object",
            f"secret,id=sec0,file={keyfile},format=raw",
            "--image-opts",
            opts,
            "-O",
            "raw",
            str(raw),
        ],
        check=True,
        capture_output=True,
    )


def host_offset(qcow2: str, guest_offset: int) -> int:
    """Where a guest offset's cluster is in a QCOW2 file (qcow2.txt: the
    header's cluster_bits and L1 table, 8-byte L1/L2 entries, standard L2)."""
    mask = 0x00FF_FFFF_FFFF_FE00
    with open(qcow2, "rb") as f:
        header = f.read(48)
        bits = int.from_bytes(header[20:24], "big")
        l1_offset = int.from_bytes(header[40:48], "big")
        l2_bits = bits - 3
        f.seek(l1_offset + 8 * (guest_offset >> (bits + l2_bits)))
        l2_offset = int.from_bytes(f.read(8), "big") & mask
        f.seek(l2_offset + 8 * ((guest_offset >> bits) & ((1 << l2_bits) - 1)))
        cluster = int.from_bytes(f.read(8), "big") & mask
    assert cluster, f"offset {guest_offset} is not allocated in {qcow2}"
    return cluster + guest_offset % (1 << bits)


def files_under(root: Path) -> Iterator[Path]:
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                yield p


@pytest.mark.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)
def test_encrypted_repository_end_to_end(cluster: Cluster, make_vm: Any, tmp_path: Path) -> None:
    c = cluster
    vault = tmp_path / "vault"
    # ------------------------------------------------------------ repository
    r = c.http(
        "POST",
        "/api/v1/repositories",
        json={"name": "vault", "path": str(vault), "encrypted": True},
    )
    assert r.status_code == 201, r.text
    repo = r.json()
    assert repo["encrypted"] is True
    repo_id = repo["repository_id"]
    assert c.client.get(f"/api/v1/repositories/{repo_id}")["encrypted"] is True
    master = c.hub_dir / "master.key"
    assert stat.S_IMODE(master.stat().st_mode) == 0o600
    refused = c.http("PATCH", f"/api/v1/repositories/{repo_id}", json={"encrypted": False})
    assert (
        "chosen when a repository is created"
        in error_body(refused, 409, "encryption_fixed")["message"]
    )
    # The default repository stays plain.
    assert c.client.get("/api/v1/repositories/default")["encrypted"] is False

    # ------------------------------------------------------------ the VM
    tree = tmp_path / "tree"
    write_tree(tree, 0)
    manifests = [manifest_of(tree)]
    ext4 = tmp_path / "p1.ext4"
    build_ext4(ext4, tree, size=32 * MiB)
    disk = tmp_path / "disk.raw"
    (offset,) = build_partitioned(disk, "gpt", [PartitionSpec(ext4, "linux")])
    vm = make_vm("enc1", [disk.stat().st_size], start=False)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(vm.disks[0])],
        check=True,
        capture_output=True,
    )
    vm.start()
    c.register(vm)

    # ------------------------------------------------------------ backups
    points: list[dict[str, Any]] = []
    snapshots: list[Path] = []
    with Watch(str(vault)) as watch:
        for i, kind in enumerate(["full", "incremental", "incremental", "incremental"]):
            if i:
                write_tree(tree, i)
                manifests.append(manifest_of(tree))
                build_ext4(ext4, tree, size=32 * MiB)
                put_ext4(vm, ext4, offset)
            job = c.backup("enc1", kind, repository_id=repo_id)
            assert job["status"] == "completed", job
            (backup_id,) = job["backups"]
            b = c.client.get(f"/api/v1/backups/{backup_id}")
            assert b["backup_type"] == kind and b["repository_id"] == repo_id
            points.append(b)
            snapshots.append(raw_copy(vm.disks[0], tmp_path / f"snap-{i}.raw"))
    assert watch.seen, "no qemu-nbd target of the vault was seen while the backups ran"

    # The key, through the admin route (audited) and the CLI.
    exported = c.client.post(f"/api/v1/repositories/{repo_id}/key/export", {})
    assert exported["format"] == "luks-passphrase" and exported["repository_id"] == repo_id
    passphrase = exported["passphrase"]
    data_key = base64.b64decode(passphrase)
    assert len(data_key) == 32
    secrets = [passphrase.encode(), data_key.hex().encode(), data_key]
    keyfile = tmp_path / "vault.key"
    out = cli(c, "repo", "export-key", "vault", "--output", str(keyfile))
    assert str(keyfile) in out.stdout
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert keyfile.read_bytes() == passphrase.encode()
    again = cli(c, "repo", "export-key", "vault", "--output", str(keyfile), ok=False)
    assert "never overwritten" in again.stdout + again.stderr
    assert keyfile.read_bytes() == passphrase.encode()
    audit = c.client.get(
        "/api/v1/audit", params={"route": "/api/v1/repositories/{repository_id}/key/export"}
    )
    assert len(audit["entries"]) >= 2

    # No key in the command line of a qemu-nbd target; the secret went by file.
    for cmdline in watch.seen:
        assert b"secret,id=sec0,file=" in cmdline
        assert not any(s in cmdline for s in secrets)

    # ------------------------------------------------------------ at rest
    for b, snap in zip(points, snapshots, strict=True):
        encrypt = img.info(b["file_path"])["format-specific"]["data"]["encrypt"]
        assert (encrypt["format"], encrypt["cipher-alg"], encrypt["cipher-mode"]) == (
            "luks",
            "aes-256",
            "xts",
        )
        assert MARKER not in Path(b["file_path"]).read_bytes()
        assert img.compare(b["file_path"], str(snap), key=img.ImageKey(passphrase.encode()))
    assert MARKER in snapshots[0].read_bytes()  # the marker is really in the guest's disk
    # Plain qemu-img and the exported key file open a backup by hand.
    by_hand = tmp_path / "by-hand.raw"
    open_with_key(points[2]["file_path"], keyfile, by_hand)
    assert img.compare(str(by_hand), str(snapshots[2]))

    # ------------------------------------------------------------ consolidate
    started = c.client.post(
        "/api/v1/backups/consolidate", {"vm_name": "enc1", "disk_id": 0, "keep": 2}
    )
    job = c.wait_job(started["job_id"])
    assert job["status"] == "completed", job
    chain = c.client.get("/api/v1/backups/enc1/chain", params={"disk_id": 0})
    kept = [p["backup_id"] for p in chain["disks"][0]["chain"]]
    assert kept == [points[2]["backup_id"], points[3]["backup_id"]], chain
    key = img.ImageKey(passphrase.encode())
    for b, snap in ((points[2], snapshots[2]), (points[3], snapshots[3])):
        current = c.client.get(f"/api/v1/backups/{b['backup_id']}")
        assert img.info(current["file_path"])["encrypted"] is True
        assert img.compare(current["file_path"], str(snap), key=key)
        assert MARKER not in Path(current["file_path"]).read_bytes()

    # ------------------------------------------------------------ verify
    for b in (points[2], points[3]):
        started = c.client.post(f"/api/v1/backups/{b['backup_id']}/verify", {})
        job = c.wait_job(started["job_id"])
        assert job["status"] == "completed", job
        shown = c.client.get(f"/api/v1/backups/{b['backup_id']}")
        assert shown["verify_status"] == "ok", shown

    last = points[3]
    # ------------------------------------------------------------ file restore
    with Watch(str(vault)) as watch:
        r = c.http("POST", "/api/v1/restore/mounts", json={"backup_id": last["backup_id"]})
        assert r.status_code == 201, r.text
        mount = r.json()
        try:
            assert {p["filesystem"] for p in mount["partitions"]} == {"ext"}
            for name in ("/marker.txt", "/hello.txt", "/gen-3.bin"):
                got = c.http(
                    "GET",
                    f"/api/v1/restore/mounts/{mount['mount_id']}/download",
                    params={"path": name},
                )
                assert got.status_code == 200, got.text
                assert sha(got.content) == manifests[3].items[name].sha256, name
        finally:
            c.client.request("DELETE", f"/api/v1/restore/mounts/{mount['mount_id']}")
    assert watch.seen
    for cmdline in watch.seen:
        assert not any(s in cmdline for s in secrets)

    # ------------------------------------------------------------ whole disk
    restored = c.hub_dir / "restores" / "enc1.raw"
    r = c.http(
        "POST",
        "/api/v1/restores",
        json={
            "backup_id": last["backup_id"],
            "destination": {"type": "file", "path": str(restored), "format": "raw"},
        },
    )
    assert r.status_code == 202, r.text
    job = c.wait_job(r.json()["job_id"])
    assert job["status"] == "completed", job
    # The user's disk, in clear (not encrypted), as the VM's disk was.
    assert img.compare(str(restored), str(snapshots[3]))
    assert MARKER in restored.read_bytes()

    # ------------------------------------------------------------ export
    export = c.client.post(f"/api/v1/backups/{last['backup_id']}/export", {})
    try:
        assert export["status"] == "serving"
        served = tmp_path / "served.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", export["url"], str(served)],
            check=True,
            capture_output=True,
        )
        assert img.compare(str(served), str(snapshots[3]))
    finally:
        c.client.request("DELETE", f"/api/v1/backups/{last['backup_id']}/export")

    # ------------------------------------------------------------ no key anywhere
    rows = catalog_exec(c, "SELECT repository_id, key_id, wrapped_key FROM repository_keys")
    assert len(rows) == 1 and rows[0][0] == repo_id
    assert not any(s.decode(errors="replace") in repr(rows) for s in secrets[:2])
    places = [*files_under(c.hub_dir), c.root / "hub.log", c.root / "node.log"]
    for p in places:
        if p == master:
            continue
        data = p.read_bytes()
        for s in secrets:
            assert s not in data, f"the repository key is in {p}"
    assert (c.hub_dir / "catalog.db").exists() or c.database_url
    # Nothing left in the private secret folders either.
    for leftover in Path("/dev/shm").glob("sendense-key-*/key"):
        assert leftover.read_bytes() != passphrase.encode()


def test_master_key_missing_or_wrong_is_a_clear_error(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    c = cluster
    repo = c.client.post(
        "/api/v1/repositories",
        {"name": "vault2", "path": str(tmp_path / "vault2"), "encrypted": True},
    )
    vm = make_vm("enc2", [16 * MiB])
    c.register(vm)
    first = c.backup("enc2", "full", repository_id=repo["repository_id"])
    assert first["status"] == "completed", first
    second = c.backup("enc2", "incremental", repository_id=repo["repository_id"])
    assert second["status"] == "completed", second
    master = c.hub_dir / "master.key"
    saved = master.read_bytes()

    master.unlink()
    r = c.http(
        "POST",
        "/api/v1/backups",
        json={"vm_name": "enc2", "repository_id": repo["repository_id"], "backup_type": "auto"},
    )
    body = error_body(r, 503, "master_key_unavailable")
    assert "master key file" in body["message"] and "missing" in body["message"]
    # A new encrypted repository does not quietly make another master key.
    r = c.http(
        "POST",
        "/api/v1/repositories",
        json={"name": "vault3", "path": str(tmp_path / "vault3"), "encrypted": True},
    )
    error_body(r, 503, "master_key_unavailable")
    assert not master.exists()
    # A verify runs as a job: it fails saying why, the hub keeps serving.
    started = c.client.post(f"/api/v1/backups/{first['backups'][0]}/verify", {})
    job = c.wait_job(started["job_id"])
    assert job["status"] == "failed" and "master key" in json.dumps(job["error"]), job
    # A consolidation fails before it changes anything: its points stay restore points.
    started = c.client.post(
        "/api/v1/backups/consolidate", {"vm_name": "enc2", "disk_id": 0, "keep": 1}
    )
    job = c.wait_job(started["job_id"])
    assert job["status"] == "failed" and "master key" in json.dumps(job["error"]), job
    for backup_id in (*first["backups"], *second["backups"]):
        assert c.client.get(f"/api/v1/backups/{backup_id}")["status"] == "completed"

    master.write_bytes(base64.b64encode(os.urandom(32)))
    master.chmod(0o600)
    r = c.http(
        "POST",
        "/api/v1/backups",
        json={"vm_name": "enc2", "repository_id": repo["repository_id"], "backup_type": "auto"},
    )
    assert "wrapped with master key" in error_body(r, 503, "master_key_unavailable")["message"]

    master.write_bytes(saved)
    again = c.backup("enc2", "incremental", repository_id=repo["repository_id"])
    assert again["status"] == "completed", again
    # A plain repository's key export is refused.
    error_body(
        c.http("POST", "/api/v1/repositories/default/key/export", json={}), 409, "not_encrypted"
    )


def test_export_key_needs_admin_and_key_import_on_a_new_hub(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    """Disaster recovery: the catalog is gone, the exported key and the
    folder are left; a new repository with that key and a rescan bring the
    backups back, readable."""
    c = cluster
    vault = tmp_path / "vault4"
    repo = c.client.post(
        "/api/v1/repositories", {"name": "vault4", "path": str(vault), "encrypted": True}
    )
    vm = make_vm("enc4", [16 * MiB])
    c.register(vm)
    job = c.backup("enc4", "full", repository_id=repo["repository_id"])
    (backup_id,) = job["backups"]
    snap = raw_copy(vm.disks[0], tmp_path / "snap.raw")
    viewer = c.client.post("/api/v1/tokens", {"name": "ro", "role": "operator"})["token"]
    r = c.http(
        "POST", f"/api/v1/repositories/{repo['repository_id']}/key/export", json={}, token=viewer
    )
    error_body(r, 403, "forbidden")
    keyfile = tmp_path / "vault4.key"
    cli(c, "repo", "export-key", repo["repository_id"], "-o", str(keyfile))

    # A copy of the folder outlives the catalog's records (the backup is
    # deleted through the API, its files with it).
    copy = tmp_path / "vault4-copy"
    subprocess.run(["cp", "-a", str(vault), str(copy)], check=True)
    c.client.request("DELETE", f"/api/v1/backups/{backup_id}")

    bad = c.http(
        "POST",
        "/api/v1/repositories",
        json={"name": "back", "path": str(copy), "encrypted": True, "encryption_key": "nope"},
    )
    assert error_body(bad, 400, "invalid_request")["details"]["field"] == "encryption_key"
    out = cli(c, "--json", "repo", "add", "back", str(copy), "--key-file", str(keyfile))
    back = json.loads(out.stdout)
    assert back["encrypted"] is True
    started = c.client.post(f"/api/v1/repositories/{back['repository_id']}/rescan", {})
    job = c.wait_job(started["job_id"])
    assert job["status"] == "completed" and job["result"]["imported"] >= 1, job
    found = c.client.get("/api/v1/backups", params={"repository_id": back["repository_id"]})
    (b,) = found["backups"]
    started = c.client.post(f"/api/v1/backups/{b['backup_id']}/verify", {})
    assert c.wait_job(started["job_id"])["status"] == "completed"
    assert c.client.get(f"/api/v1/backups/{b['backup_id']}")["verify_status"] == "ok"
    assert img.compare(b["file_path"], str(snap), key=img.ImageKey(keyfile.read_bytes()))

    # The console marks which repository is encrypted.
    console = httpx.Client(base_url=c.hub_url, timeout=60, follow_redirects=False)
    form = console.get("/ui/signin")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert csrf, form.text
    console.post("/ui/signin", data={"csrf": csrf.group(1), "token": c.admin_token})
    page = console.get("/ui/repositories").text
    section = page[page.index(f'id="repo-{back["repository_id"]}"') :]
    assert '<span class="tag">encrypted</span>' in section.split("</section>")[0]
    plain = page[page.index('id="repo-default"') :].split("</section>")[0]
    assert "encrypted</span>" not in plain and "<dt>Encrypted</dt><dd>no</dd>" in plain


def test_verify_names_the_damaged_range_in_an_encrypted_chain(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    """Ciphertext damaged in a data cluster of an incremental: the verify
    reads through the key (qemu-img map with the secret) and names the 64 KiB
    block and the image that holds it."""
    c = cluster
    repo = c.client.post(
        "/api/v1/repositories",
        {"name": "vault5", "path": str(tmp_path / "vault5"), "encrypted": True},
    )
    vm = make_vm("enc5", [16 * MiB])
    c.register(vm)
    write_random(vm, 0, 0, 4 * MiB)
    c.backup("enc5", "full", repository_id=repo["repository_id"])
    write_random(vm, 0, 9 * MiB, MiB)
    job = c.backup("enc5", "incremental", repository_id=repo["repository_id"])
    (inc_id,) = job["backups"]
    inc = c.client.get(f"/api/v1/backups/{inc_id}")
    started = c.client.post(f"/api/v1/backups/{inc_id}/verify", {})
    assert c.wait_job(started["job_id"])["status"] == "completed"
    assert c.client.get(f"/api/v1/backups/{inc_id}")["verify_status"] == "ok"

    key = img.ImageKey(
        c.client.post(f"/api/v1/repositories/{repo['repository_id']}/key/export", {})[
            "passphrase"
        ].encode()
    )
    own = [
        e
        for e in img.map_extents(inc["file_path"], key=key)
        if e["data"] and e["depth"] == 0 and e["start"] >= 9 * MiB
    ]
    assert own, "the incremental holds no data of its own"
    # qemu-img map gives no host offset for encrypted clusters: read the L1/L2 tables.
    disk_offset = own[0]["start"]
    file_offset = host_offset(inc["file_path"], disk_offset)
    with open(inc["file_path"], "r+b") as f:
        f.seek(file_offset + 100)
        byte = f.read(1)
        f.seek(file_offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))

    started = c.client.post(f"/api/v1/backups/{inc_id}/verify", {})
    job = c.wait_job(started["job_id"])
    assert job["status"] == "completed", job
    b = c.client.get(f"/api/v1/backups/{inc_id}")
    assert b["verify_status"] == "failed"
    block = 64 * 1024
    start = disk_offset // block * block
    assert f"byte offsets {start}-{start + block - 1}" in b["verify_error"], b["verify_error"]
    assert Path(inc["file_path"]).name in b["verify_error"]
