"""File-level restore sessions through the API, on real backups.

A VM disk carries a GPT with an ext4 partition (the test tree: nested and
Unicode names, empty, sparse and big files, a 3,000-entry directory,
symlinks inside and pointing out) and a FAT partition. It is backed up
through the real path (full), then files change inside the ext4 image and
an incremental is taken. Everything read through a session is compared
with the source tree of that point in time (sha256 from the manifest),
never with the parser's own output.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.cluster import Cluster, cli
from fixtures.disks import (
    BIG_FILE,
    BIG_SIZE,
    MANY_COUNT,
    MANY_DIR,
    UNICODE_FILE,
    Manifest,
    PartitionSpec,
    build_ext4,
    build_fat,
    build_partitioned,
    make_tree,
    manifest_of,
    tools_missing,
)
from fixtures.lifecycle import MiB, cluster_env, error_body, lifecycle_cluster

pytestmark = pytest.mark.skipif(
    bool(tools_missing()), reason=f"test disk tools missing: {tools_missing()}"
)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


def build_disk(tmp_path: Path, tree: Path) -> tuple[Path, int]:
    """A GPT disk: ext4 of ``tree`` (partition 1) and a small FAT (2); the
    disk image and the byte offset of the ext4 partition."""
    ext4, fat = tmp_path / "p1.ext4", tmp_path / "p2.fat"
    build_ext4(ext4, tree)
    small = tmp_path / "fat-tree"
    small.mkdir(exist_ok=True)
    (small / "readme.txt").write_bytes(b"on fat\n")
    build_fat(fat, small)
    disk = tmp_path / "disk.raw"
    offsets = build_partitioned(
        disk, "gpt", [PartitionSpec(ext4, "linux"), PartitionSpec(fat, "linux")]
    )
    return disk, offsets[0]


def vm_with(make_vm: Any, name: str, built: tuple[Path, int]) -> Any:
    raw = built[0]
    vm = make_vm(name, [raw.stat().st_size], start=False)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(vm.disks[0])],
        check=True,
        capture_output=True,
    )
    vm.start()
    return vm


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def two_points(
    c: Cluster, make_vm: Any, tmp_path: Path, name: str
) -> tuple[tuple[str, Manifest], tuple[str, Manifest]]:
    """A full of the test tree, then an incremental after files changed in the
    ext4 partition (the rebuilt filesystem written over the old one through
    the guest's NBD, as a guest writes), with both manifests."""
    tree = tmp_path / "tree"
    first = make_tree(tree)
    built = build_disk(tmp_path, tree)
    vm = vm_with(make_vm, name, built)
    c.register(vm)
    full = c.backup(name, "full")["backups"][0]
    (tree / "hello.txt").write_bytes(b"hello again, changed\n")
    (tree / "new.txt").write_bytes(os.urandom(100_000))
    (tree / "empty.txt").unlink()
    second = manifest_of(tree)
    ext4 = tmp_path / "p1-changed.ext4"
    build_ext4(ext4, tree)
    h = vm.guest(0)
    try:
        with ext4.open("rb") as f:
            at = built[1]
            while chunk := f.read(4 * MiB):
                h.pwrite(chunk, at)
                at += len(chunk)
        h.flush()
    finally:
        h.shutdown()
    incr = c.backup(name, "incremental")["backups"][0]
    return (full, first), (incr, second)


def open_session(c: Cluster, backup_id: str) -> dict[str, Any]:
    r = c.http("POST", "/api/v1/restore/mounts", json={"backup_id": backup_id})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def socket_of(c: Cluster, mount_id: str) -> Path:
    """The unix socket an open session's qemu-nbd listens on."""
    url = c.client.get(f"/api/v1/jobs/{mount_id}")["result"]["url"]
    return Path(url.split("socket=", 1)[1])


def get(c: Cluster, mount: str, what: str, **params: Any) -> Any:
    r = c.http("GET", f"/api/v1/restore/mounts/{mount}/{what}", params=params)
    return r


@pytest.mark.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)
def test_sessions_list_and_download_what_each_point_held(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    (full, first), (second_id, second) = two_points(cluster, make_vm, tmp_path, "fs1")
    for backup_id, manifest in ((full, first), (second_id, second)):
        m = open_session(cluster, backup_id)
        assert m["status"] == "open" and m["backup_id"] == backup_id
        parts = {p["index"]: p for p in m["partitions"]}
        assert parts[1]["filesystem"] == "ext" and parts[2]["filesystem"] == "fat"
        # two filesystems: the partition must be named
        r = get(cluster, m["mount_id"], "files", path="/")
        assert error_body(r, 400, "invalid_request")["details"]["field"] == "partition"

        root = get(cluster, m["mount_id"], "files", path="/", partition=1).json()
        names = {e["name"] for e in root["entries"]} - {"lost+found"}
        assert names == manifest.children("/")
        for f, item in manifest.files().items():
            if f.startswith(f"/{MANY_DIR}/"):
                continue
            r = get(cluster, m["mount_id"], "download", path=f, partition=1)
            assert r.status_code == 200, (f, r.text)
            assert sha(r.content) == item.sha256, f
            assert int(r.headers["content-length"]) == item.size
        info = get(cluster, m["mount_id"], "files/info", path="/links/inside", partition=1).json()
        assert info["type"] == "symlink" and info["target"] == "../hello.txt"
        cluster.client.request("DELETE", f"/api/v1/restore/mounts/{m['mount_id']}")


def test_listing_paging_ranges_archives_and_refusals(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    manifest = make_tree(tree)
    vm = vm_with(make_vm, "fs2", build_disk(tmp_path, tree))
    cluster.register(vm)
    backup_id = cluster.backup("fs2", "full")["backups"][0]
    m = open_session(cluster, backup_id)
    mid = m["mount_id"]

    # a 3,000-entry directory, paged
    seen: list[str] = []
    offset = 0
    while True:
        page = get(
            cluster, mid, "files", path=f"/{MANY_DIR}", partition=1, offset=offset, limit=700
        )
        body = page.json()
        assert body["total"] == MANY_COUNT
        seen += [e["name"] for e in body["entries"]]
        offset += len(body["entries"])
        if offset >= body["total"]:
            break
    assert seen == sorted(manifest.children(f"/{MANY_DIR}"))

    # ranges of the big file
    data = (tree / BIG_FILE).read_bytes()
    whole = get(cluster, mid, "download", path=f"/{BIG_FILE}", partition=1)
    etag = whole.headers["etag"]
    for spec, (a, b) in (
        ("bytes=0-99", (0, 99)),
        (f"bytes={BIG_SIZE - 10}-", (BIG_SIZE - 10, BIG_SIZE - 1)),
        ("bytes=-5", (BIG_SIZE - 5, BIG_SIZE - 1)),
        ("bytes=5000000-9000000", (5_000_000, 9_000_000)),
    ):
        r = cluster.http(
            "GET",
            f"/api/v1/restore/mounts/{mid}/download",
            params={"path": f"/{BIG_FILE}", "partition": 1},
            headers={"Range": spec},
        )
        assert r.status_code == 206, (spec, r.status_code)
        assert r.headers["content-range"] == f"bytes {a}-{b}/{BIG_SIZE}"
        assert r.content == data[a : b + 1], spec
        assert r.headers["etag"] == etag
    r = cluster.http(
        "GET",
        f"/api/v1/restore/mounts/{mid}/download",
        params={"path": f"/{BIG_FILE}", "partition": 1},
        headers={"Range": f"bytes={BIG_SIZE}-"},
    )
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{BIG_SIZE}"
    r = cluster.http(  # not a valid range (last before first): ignored, the whole file
        "GET",
        f"/api/v1/restore/mounts/{mid}/download",
        params={"path": f"/{BIG_FILE}", "partition": 1},
        headers={"Range": "bytes=500-100"},
    )
    assert r.status_code == 200 and len(r.content) == BIG_SIZE
    # several ranges: multipart/byteranges (overlapping ones merged)
    r = cluster.http(
        "GET",
        f"/api/v1/restore/mounts/{mid}/download",
        params={"path": f"/{BIG_FILE}", "partition": 1},
        headers={"Range": "bytes=0-99, 5000000-5000999, -10, 50-149"},
    )
    assert r.status_code == 206, r.text
    media, _, boundary = r.headers["content-type"].partition("; boundary=")
    assert media == "multipart/byteranges" and boundary
    assert int(r.headers["content-length"]) == len(r.content)
    parts = r.content.split(f"--{boundary}".encode())
    assert parts[0] == b"" and parts[-1] == b"--\r\n"
    got = []
    for p in parts[1:-1]:
        head, _, body = p.partition(b"\r\n\r\n")
        assert body.endswith(b"\r\n")
        ranges = [h for h in head.decode().split("\r\n") if h.startswith("Content-Range: ")]
        first, _, last = (
            ranges[0].removeprefix("Content-Range: bytes ").split("/")[0].partition("-")
        )
        got.append((int(first), int(last), body[:-2]))
    assert [(a, b) for a, b, _ in got] == [
        (0, 149),
        (5_000_000, 5_000_999),
        (BIG_SIZE - 10, BIG_SIZE - 1),
    ]
    for a, b, body in got:
        assert body == data[a : b + 1]
    # HEAD: the same headers, nothing read
    params = {"path": f"/{BIG_FILE}", "partition": 1}
    r = cluster.http("HEAD", f"/api/v1/restore/mounts/{mid}/download", params=params)
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["content-length"]) == BIG_SIZE and r.headers["etag"] == etag
    r = cluster.http(
        "HEAD",
        f"/api/v1/restore/mounts/{mid}/download",
        params=params,
        headers={"Range": "bytes=0-99"},
    )
    assert r.status_code == 206 and r.headers["content-range"] == f"bytes 0-99/{BIG_SIZE}"
    assert (
        cluster.http(
            "HEAD",
            f"/api/v1/restore/mounts/{mid}/download",
            params={"path": "/nope", "partition": 1},
        ).status_code
        == 404
    )

    # archives, unpacked and compared with the source tree
    for fmt in ("zip", "tar.gz"):
        r = get(cluster, mid, "download-directory", path="/nested", partition=1, format=fmt)
        assert r.status_code == 200, r.text
        out = tmp_path / f"unpacked-{fmt}"
        if fmt == "zip":
            zipfile.ZipFile(io.BytesIO(r.content)).extractall(out)
        else:
            with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
                tar.extractall(out)
        for path, item in manifest.items.items():
            if path.startswith("/nested/") and item.type == "file":
                got = (out / path.removeprefix("/nested/")).read_bytes()
                assert sha(got) == item.sha256, (fmt, path)
    r = get(cluster, mid, "download-directory", path="/links", partition=1, format="tar.gz")
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as links:
        inside = links.getmember("inside")
        assert inside.issym() and inside.linkname == "../hello.txt"

    # hostile paths
    for bad, reason in (
        ("/../../etc/passwd", "dotdot"),
        ("/nested/../../etc", "dotdot"),
        ("nested/..", "dotdot"),
        ("/links/outside", "link_escapes"),
        ("/links/outside_absolute", "link_escapes"),
        ("/links/dir/../../etc", "dotdot"),
        ("/hello.txt\x00x", "nul"),
    ):
        for what in ("download", "files/info", "files", "download-directory"):
            r = get(cluster, mid, what, path=bad, partition=1)
            if what == "files/info" and reason == "link_escapes":
                assert r.status_code == 200  # the link itself, not followed
                continue
            body = error_body(r, 400, "path_refused")
            assert body["details"]["reason"] == reason, (bad, what, body)
            assert "root:" not in r.text
    error_body(get(cluster, mid, "download", path="/nested", partition=1), 400)
    error_body(get(cluster, mid, "files", path="/hello.txt", partition=1), 400)
    error_body(get(cluster, mid, "files", path="/nope", partition=1), 404)
    error_body(get(cluster, mid, "files", path="/", partition=9), 404)
    assert get(cluster, mid, "files", path=f"/{UNICODE_FILE}", partition=1).status_code == 400

    # the session holds the restore point; a viewer cannot read files
    error_body(cluster.http("DELETE", f"/api/v1/backups/{backup_id}"), 409, "in_use")
    viewer = cluster.client.post("/api/v1/tokens", {"name": "v", "role": "viewer"})["token"]
    r = cluster.http(
        "GET", f"/api/v1/restore/mounts/{mid}/files", token=viewer, params={"partition": 1}
    )
    error_body(r, 403, "forbidden")
    assert cluster.http("GET", f"/api/v1/restore/mounts/{mid}", token=viewer).status_code == 200

    sock = socket_of(cluster, mid)
    assert sock.exists() and oct(sock.parent.stat().st_mode & 0o777) == "0o700"
    closed = cluster.client.request("DELETE", f"/api/v1/restore/mounts/{mid}")
    assert closed["status"] == "closed"
    error_body(get(cluster, mid, "files", path="/", partition=1), 404)
    assert not sock.exists()
    assert cluster.client.request("DELETE", f"/api/v1/backups/{backup_id}")["deleted"]


def test_idle_sessions_close_and_a_dead_hubs_sessions_are_cleaned_up(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    make_tree(tree, many=False)
    vm = vm_with(make_vm, "fs3", build_disk(tmp_path, tree))
    cluster.register(vm)
    backup_id = cluster.backup("fs3", "full")["backups"][0]
    m = open_session(cluster, backup_id)
    pid = int((cluster.hub_dir / "run" / "mounts" / f"{m['mount_id']}.pid").read_text())
    cluster.kill("hub")
    cluster.hub_env["SENDENSE_RESTORE_IDLE_TIMEOUT"] = "3"
    cluster.start_hub()
    job = cluster.client.get(f"/api/v1/jobs/{m['mount_id']}")
    assert job["status"] == "failed" and job["error"]["code"] == "hub_restarted"
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the session's qemu-nbd outlived its hub"

    m2 = open_session(cluster, backup_id)
    assert get(cluster, m2["mount_id"], "files", path="/", partition=1).status_code == 200
    deadline = time.monotonic() + 30
    while cluster.client.get(f"/api/v1/restore/mounts/{m2['mount_id']}")["status"] == "open":
        assert time.monotonic() < deadline, "an idle session stayed open"
        time.sleep(0.5)
    assert cluster.client.get(f"/api/v1/restore/mounts/{m2['mount_id']}")["closed"] == "idle"
    assert cluster.client.get("/api/v1/restore/mounts")["mounts"] == []


def test_cli_restore_session(
    cluster: Cluster, make_vm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    manifest = make_tree(tree, many=False)
    vm = vm_with(make_vm, "fs4", build_disk(tmp_path, tree))
    cluster.register(vm)
    backup_id = cluster.backup("fs4", "full")["backups"][0]
    out = cli(cluster, "--json", "restore", "mount", backup_id).stdout
    mid = json.loads(out)["mount_id"]
    listing = cli(cluster, "restore", "ls", mid, "/", "--partition", "1").stdout
    assert "hello.txt" in listing and "nested" in listing
    target = tmp_path / "got.bin"
    cli(cluster, "restore", "get", mid, f"/{BIG_FILE}", "--partition", "1", "-o", str(target))
    assert sha(target.read_bytes()) == manifest.items[f"/{BIG_FILE}"].sha256
    # without -o: the file's (the directory's) name, in the current directory
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    cli(cluster, "restore", "get", mid, "/nested/a/mid.txt", "--partition", "1")
    assert sha((here / "mid.txt").read_bytes()) == manifest.items["/nested/a/mid.txt"].sha256
    cli(cluster, "restore", "get-dir", mid, "/nested/", "--partition", "1", "--format", "tar.gz")
    with tarfile.open(here / "nested.tar.gz") as tar:
        assert "a/b/c/deep.txt" in tar.getnames()
    # nothing is overwritten
    again = cli(cluster, "restore", "get", mid, "/nested/a/mid.txt", "--partition", "1", ok=False)
    assert "exists" in again.stderr
    assert sha((here / "mid.txt").read_bytes()) == manifest.items["/nested/a/mid.txt"].sha256
    cli(cluster, "restore", "close", mid)
    assert cluster.client.get(f"/api/v1/restore/mounts/{mid}")["status"] == "closed"
    shutil.rmtree(tree)


def test_a_stopped_hub_leaves_no_session_or_export_behind(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    """Stopping the hub (SIGTERM, whichever API process owns them) stops the
    sessions' and exports' qemu-nbd; the next start shows them ended."""
    tree = tmp_path / "tree"
    make_tree(tree, many=False)
    vm = vm_with(make_vm, "fs5", build_disk(tmp_path, tree))
    cluster.register(vm)
    backup_id = cluster.backup("fs5", "full")["backups"][0]
    mounts = [open_session(cluster, backup_id) for _ in range(3)]
    socks = [socket_of(cluster, m["mount_id"]) for m in mounts]
    export = cluster.client.post(f"/api/v1/backups/{backup_id}/export", {"writable": True})
    assert export["status"] == "serving"
    cluster.stop()
    for sock in socks:
        assert not sock.exists()
    assert not list((cluster.hub_dir / "run" / "exports").iterdir())
    left = subprocess.run(["pgrep", "-af", "qemu-nbd"], capture_output=True, text=True).stdout
    assert str(cluster.hub_dir) not in left, left
    cluster.start_hub()
    for m in mounts:
        assert cluster.client.get(f"/api/v1/restore/mounts/{m['mount_id']}")["status"] != "open"
    assert cluster.http("GET", f"/api/v1/backups/{backup_id}/export").status_code == 404
    assert cluster.client.request("DELETE", f"/api/v1/backups/{backup_id}")["deleted"]


@cluster_env(hub={"SENDENSE_RESTORE_IDLE_TIMEOUT": "2"})
def test_a_download_longer_than_the_idle_timeout_keeps_its_session(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    """A transfer that outlasts the idle timeout is activity: its session
    stays open until the last byte (it closes when idle afterwards)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.txt").write_bytes(b"hello\n")
    size = 96 * MiB
    with (tree / "holes.bin").open("wb") as f:  # sparse: costs nothing to store or read
        f.truncate(size)
        f.seek(size - 6)
        f.write(b"the end")
    want = sha((tree / "holes.bin").read_bytes())
    vm = vm_with(make_vm, "fs6", build_disk(tmp_path, tree))
    cluster.register(vm)
    backup_id = cluster.backup("fs6", "full")["backups"][0]
    mid = open_session(cluster, backup_id)["mount_id"]
    digest = hashlib.sha256()
    started = time.monotonic()
    with httpx.stream(
        "GET",
        f"{cluster.hub_url}/api/v1/restore/mounts/{mid}/download",
        params={"path": "/holes.bin", "partition": 1},
        headers={"Authorization": f"Bearer {cluster.admin_token}"},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        for chunk in r.iter_bytes(1 * MiB):
            digest.update(chunk)
            time.sleep(0.08)  # ~12 MiB/s: about 8 s, four idle timeouts
    took = time.monotonic() - started
    assert took > 6, took
    assert digest.hexdigest() == want
    deadline = time.monotonic() + 20
    while cluster.client.get(f"/api/v1/restore/mounts/{mid}")["status"] == "open":
        assert time.monotonic() < deadline, "the session did not close once idle"
        time.sleep(0.5)
    assert cluster.client.get(f"/api/v1/restore/mounts/{mid}")["closed"] == "idle"
