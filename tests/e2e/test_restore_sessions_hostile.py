"""Hostile guest data through restore sessions, over HTTP, on a real backup.

One GPT disk: ext4 with names that are not UTF-8 (partition 1), an ext4
whose group descriptors are overwritten (2), and a FAT32 whose directory
cluster chain loops, so that the parser would allocate without bound (3).
Every request answers with a status and one of our error bodies, never a
500; the hub keeps serving the good partition meanwhile.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.cluster import Cluster, cli
from fixtures.disks import (
    PartitionSpec,
    build_ext4,
    build_fat,
    build_partitioned,
    fat_loop_directory,
    overwrite,
    tools_missing,
)
from fixtures.lifecycle import MiB, cluster_env, error_body, lifecycle_cluster

pytestmark = pytest.mark.skipif(
    bool(tools_missing()), reason=f"test disk tools missing: {tools_missing()}"
)

LATIN1 = b"caf\xe9.txt"  # "café" in Latin-1: not UTF-8
IN_DIR = b"in\xfe.bin"
RAW_DIR = b"dir\xff"


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


def build_disk(tmp: Path) -> Path:
    names = tmp / "names"
    names.mkdir()
    root = os.fsencode(names)
    with open(os.path.join(root, LATIN1), "wb") as f:
        f.write(b"a Latin-1 name\n")
    os.mkdir(os.path.join(root, RAW_DIR))
    with open(os.path.join(root, RAW_DIR, IN_DIR), "wb") as f:
        f.write(b"inside a directory whose name is not UTF-8\n")
    (names / "100%.txt").write_bytes(b"a percent sign, valid UTF-8\n")
    (names / "ok.txt").write_bytes(b"fine\n")
    os.symlink(LATIN1, os.path.join(root, b"link\xe9"))
    build_ext4(tmp / "names.ext4", names, size=16 * MiB)

    small = tmp / "small"
    (small / "nested").mkdir(parents=True)
    (small / "hello.txt").write_bytes(b"hello, world\n")
    (small / "other.txt").write_bytes(b"untouched\n")
    (small / "nested" / "deep.txt").write_bytes(b"deep\n")
    build_ext4(tmp / "corrupt.ext4", small, size=16 * MiB)
    overwrite(tmp / "corrupt.ext4", 2048, 4096)  # the group descriptors (1 KiB blocks)
    build_fat(tmp / "loop.fat", small, size=40 * MiB)
    fat_loop_directory(tmp / "loop.fat", "/nested", "/hello.txt")

    disk = tmp / "disk.raw"
    build_partitioned(
        disk,
        "gpt",
        [
            PartitionSpec(tmp / "names.ext4", "linux"),
            PartitionSpec(tmp / "corrupt.ext4", "linux"),
            PartitionSpec(tmp / "loop.fat", "uefi"),
        ],
    )
    return disk


def get(c: Cluster, mid: str, what: str, **params: Any) -> Any:
    return c.http("GET", f"/api/v1/restore/mounts/{mid}/{what}", params=params)


# A lower memory limit than the default 1 GiB: the hostile FAT reaches it
# sooner, well within the client's timeout on a loaded machine.
@cluster_env(hub={"SENDENSE_RESTORE_WORKER_MEMORY": str(512 * MiB)})
def test_names_that_are_not_utf8_corrupt_and_hostile_filesystems(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    raw = build_disk(tmp_path)
    vm = make_vm("hostile", [raw.stat().st_size], start=False)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(vm.disks[0])],
        check=True,
        capture_output=True,
    )
    vm.start()
    cluster.register(vm)
    (backup_id,) = cluster.backup("hostile", "full")["backups"]
    m = cluster.client.post("/api/v1/restore/mounts", {"backup_id": backup_id})
    mid = m["mount_id"]
    assert [p["filesystem"] for p in m["partitions"]] == ["ext", "ext", "fat"]

    # --- names that are not UTF-8: escaped (%XX) and flagged, never a 500
    r = get(cluster, mid, "files", path="/", partition=1)
    assert r.status_code == 200, r.text
    listing = r.json()
    assert listing["escaped"] is False
    entries = {e["name"]: e for e in listing["entries"]}
    assert set(entries) == {"caf%E9.txt", "dir%FF", "link%E9", "100%.txt", "ok.txt", "lost+found"}
    assert entries["caf%E9.txt"]["escaped"] and entries["caf%E9.txt"]["path"] == "/caf%E9.txt"
    assert entries["dir%FF"]["escaped"] and entries["dir%FF"]["type"] == "dir"
    assert entries["link%E9"]["escaped"] and entries["link%E9"]["target"] == "caf%E9.txt"
    assert entries["100%.txt"]["escaped"] is False  # valid UTF-8: as stored, '%' and all
    assert entries["ok.txt"]["escaped"] is False

    # an escaped path is given back with escaped=true
    info = get(cluster, mid, "files/info", path="/caf%E9.txt", partition=1, escaped="true")
    assert info.status_code == 200 and info.json()["size"] == len(b"a Latin-1 name\n")
    r = get(cluster, mid, "download", path="/caf%E9.txt", partition=1, escaped="true")
    assert r.status_code == 200 and r.content == b"a Latin-1 name\n"
    assert "caf%25E9.txt" in r.headers["content-disposition"]  # the escaped name, URL-quoted
    r = get(cluster, mid, "download", path="/link%E9", partition=1, escaped="true")
    assert r.status_code == 200 and r.content == b"a Latin-1 name\n"
    inner = get(cluster, mid, "files", path="/dir%FF", partition=1, escaped="true").json()
    assert inner["path"] == "/dir%FF" and inner["escaped"] is True
    assert [(e["name"], e["path"]) for e in inner["entries"]] == [
        ("in%FE.bin", "/dir%FF/in%FE.bin")
    ]
    r = get(cluster, mid, "download", path="/dir%FF/in%FE.bin", partition=1, escaped="true")
    assert r.content == b"inside a directory whose name is not UTF-8\n"
    r = get(cluster, mid, "download", path="/100%25.txt", partition=1, escaped="true")
    assert r.content == b"a percent sign, valid UTF-8\n"
    assert get(cluster, mid, "download", path="/100%.txt", partition=1).status_code == 200

    # without escaped=true the escaped form is just a name that does not exist;
    # raw bytes in the URL are not UTF-8 and match nothing either: 404, clearly
    error_body(get(cluster, mid, "download", path="/caf%E9.txt", partition=1), 404)
    r = cluster.http("GET", f"/api/v1/restore/mounts/{mid}/download?path=/caf%E9.txt&partition=1")
    error_body(r, 404, "path_not_found")
    # a missing escaped path is named escaped in the error; a bad escape is 400
    body = error_body(
        get(cluster, mid, "files/info", path="/nope%FF", partition=1, escaped="true"), 404
    )
    assert "%FF" in body["message"] or "%FF" in json.dumps(body["details"])
    body = error_body(
        get(cluster, mid, "download", path="/caf%E", partition=1, escaped="true"),
        400,
        "path_refused",
    )
    assert body["details"]["reason"] == "bad_escape"
    error_body(get(cluster, mid, "files", path="/caf%E9.txt", partition=1, escaped="true"), 400)

    # archives: tar.gz keeps the bytes, ZIP holds the escaped names (listed)
    r = get(cluster, mid, "download-directory", path="/", partition=1, format="tar.gz")
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        members = {m.name.encode("utf-8", "surrogateescape"): m for m in tar.getmembers()}
        assert {LATIN1, RAW_DIR, RAW_DIR + b"/" + IN_DIR, b"link\xe9"} <= set(members)
        f = tar.extractfile(members[LATIN1])
        assert f is not None and f.read() == b"a Latin-1 name\n"
        assert members[b"link\xe9"].linkname.encode("utf-8", "surrogateescape") == LATIN1
    r = get(cluster, mid, "download-directory", path="/", partition=1, format="zip")
    assert r.status_code == 200
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert z.read("caf%E9.txt") == b"a Latin-1 name\n"
    assert z.read("dir%FF/in%FE.bin") == b"inside a directory whose name is not UTF-8\n"
    assert z.read("link%E9") == LATIN1  # the link's target, its bytes kept
    manifest = z.read("SENDENSE-MANIFEST.txt").decode()
    assert "escaped caf%E9.txt" in manifest and "escaped dir%FF/in%FE.bin" in manifest
    r = get(cluster, mid, "download-directory", path="/dir%FF", partition=1, escaped="true")
    assert r.status_code == 200 and "dir%25FF.zip" in r.headers["content-disposition"]

    # the CLI shows them marked and takes them with --escaped
    out = cli(cluster, "restore", "ls", mid, "/", "--partition", "1").stdout
    assert "caf%E9.txt [escaped]" in out, out
    shown = json.loads(cli(cluster, "--json", "restore", "ls", mid, "/", "--partition", "1").stdout)
    assert {e["name"] for e in shown["entries"] if e["escaped"]} == {
        "caf%E9.txt",
        "dir%FF",
        "link%E9",
    }
    target = tmp_path / "got.txt"
    cli(
        cluster,
        "restore",
        "get",
        mid,
        "/caf%E9.txt",
        "--escaped",
        "--partition",
        "1",
        "-o",
        str(target),
    )
    assert target.read_bytes() == b"a Latin-1 name\n"

    # --- a corrupt filesystem: a clear error each time, the hub keeps serving
    for _ in range(2):
        body = error_body(get(cluster, mid, "files", path="/", partition=2), 409)
        assert body["error"] == "filesystem_corrupt"
        assert "Group descriptor" in body["message"], body
        assert get(cluster, mid, "files", path="/", partition=1).status_code == 200

    # --- a hostile one: the parser's allocation is stopped by the worker's limit
    assert {
        e["name"] for e in get(cluster, mid, "files", path="/", partition=3).json()["entries"]
    } >= {
        "hello.txt",
        "nested",
    }
    body = error_body(get(cluster, mid, "files", path="/nested", partition=3), 409, "parser_limit")
    assert body["details"]["limit"] in ("memory", "time"), body
    # hello.txt's cluster chain is part of the loop: a clear error, not a 200 cut short
    body = error_body(get(cluster, mid, "download", path="/hello.txt", partition=3), 409)
    assert body["error"] == "filesystem_corrupt" and "loops" in body["message"], body
    r = get(cluster, mid, "download", path="/other.txt", partition=3)
    assert r.status_code == 200 and r.content == b"untouched\n"
    # an archive of the whole filesystem: what can be read, the rest noted
    r = get(cluster, mid, "download-directory", path="/", partition=3, format="zip")
    assert r.status_code == 200, r.text
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert z.testzip() is None and z.read("other.txt") == b"untouched\n"
    manifest = z.read("SENDENSE-MANIFEST.txt").decode()
    assert "unreadable directory /nested" in manifest and "unreadable hello.txt" in manifest
    assert get(cluster, mid, "files", path="/", partition=1).status_code == 200
    assert cluster.client.get("/api/v1/restore/mounts")["mounts"][0]["status"] == "open"
    closed = cluster.client.request("DELETE", f"/api/v1/restore/mounts/{mid}")
    assert closed["status"] == "closed"
