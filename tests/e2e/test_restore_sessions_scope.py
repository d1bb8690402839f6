"""Restore sessions and tenants: a scoped token (POST /api/v1/tokens with a
scope) sees only the sessions of its own VMs. Another tenant's backup
cannot be opened, its sessions are not listed, and every route of them
answers 404 word for word as for an id that does not exist."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.cluster import Cluster
from fixtures.disks import build_ext4, tools_missing
from fixtures.lifecycle import MiB, error_body, lifecycle_cluster

pytestmark = pytest.mark.skipif(
    bool(tools_missing()), reason=f"test disk tools missing: {tools_missing()}"
)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


def vm_with_ext4(make_vm: Any, tmp_path: Path, name: str) -> Any:
    """A VM whose one disk is an ext4 filesystem (no partition table)."""
    tree = tmp_path / f"{name}-tree"
    tree.mkdir()
    (tree / "owner.txt").write_bytes(f"{name}\n".encode())
    image = tmp_path / f"{name}.ext4"
    build_ext4(image, tree, size=16 * MiB)
    vm = make_vm(name, [image.stat().st_size], start=False)
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(vm.disks[0])],
        check=True,
        capture_output=True,
    )
    vm.start()
    return vm


@pytest.mark.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)
def test_a_scoped_token_sees_only_its_own_sessions(
    cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    cluster.register(
        vm_with_ext4(make_vm, tmp_path, "tenant-a-web"),
        vm_with_ext4(make_vm, tmp_path, "tenant-b-db"),
    )
    (backup_a,) = cluster.backup("tenant-a-web", "full")["backups"]
    (backup_b,) = cluster.backup("tenant-b-db", "full")["backups"]
    token = cluster.client.post(
        "/api/v1/tokens",
        {
            "name": "tenant-a",
            "role": "operator",
            "scope": {"vms": ["tenant-a-web"], "repositories": ["default"]},
        },
    )["token"]

    def as_a(method: str, path: str, **kw: Any) -> Any:
        return cluster.http(method, path, token=token, **kw)

    # the other tenant's backup cannot be opened: as if it did not exist
    r1 = as_a("POST", "/api/v1/restore/mounts", json={"backup_id": backup_b})
    r2 = as_a("POST", "/api/v1/restore/mounts", json={"backup_id": "no-such-backup"})
    error_body(r1, 404, "not_found")
    error_body(r2, 404, "not_found")
    assert r1.text.replace(backup_b, "ID") == r2.text.replace("no-such-backup", "ID")

    # its own works, with files
    r = as_a("POST", "/api/v1/restore/mounts", json={"backup_id": backup_a})
    assert r.status_code == 201, r.text
    mine = r.json()["mount_id"]
    r = as_a("GET", f"/api/v1/restore/mounts/{mine}/download", params={"path": "/owner.txt"})
    assert r.status_code == 200 and r.content == b"tenant-a-web\n"

    # the admin opens one on each VM; A sees its VM's two only
    theirs = cluster.client.post("/api/v1/restore/mounts", {"backup_id": backup_b})["mount_id"]
    admin_on_a = cluster.client.post("/api/v1/restore/mounts", {"backup_id": backup_a})["mount_id"]
    listed = as_a("GET", "/api/v1/restore/mounts").json()["mounts"]
    assert {m["mount_id"] for m in listed} == {mine, admin_on_a}
    assert all(m["vm_name"] == "tenant-a-web" for m in listed)
    everything = cluster.client.get("/api/v1/restore/mounts")["mounts"]
    assert {m["mount_id"] for m in everything} == {mine, admin_on_a, theirs}

    # every route of the other tenant's session: 404, as for an unknown id
    missing = "00000000-0000-0000-0000-000000000000"
    routes: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/api/v1/restore/mounts/{}", {}),
        ("GET", "/api/v1/restore/mounts/{}/files", {"path": "/"}),
        ("GET", "/api/v1/restore/mounts/{}/files/info", {"path": "/owner.txt"}),
        ("GET", "/api/v1/restore/mounts/{}/download", {"path": "/owner.txt"}),
        ("GET", "/api/v1/restore/mounts/{}/download-directory", {"path": "/", "format": "zip"}),
        ("DELETE", "/api/v1/restore/mounts/{}", {}),
    ]
    for method, template, params in routes:
        r1 = as_a(method, template.format(theirs), params=params)
        r2 = as_a(method, template.format(missing), params=params)
        error_body(r1, 404, "not_found")
        error_body(r2, 404, "not_found")
        assert "tenant-b" not in r1.text
        assert r1.text.replace(theirs, "ID") == r2.text.replace(missing, "ID"), (r1.text, r2.text)
    # ... and the DELETE did not close it
    assert cluster.client.get(f"/api/v1/restore/mounts/{theirs}")["status"] == "open"

    # closed sessions stay hidden too; the job behind a session as well
    cluster.client.request("DELETE", f"/api/v1/restore/mounts/{theirs}")
    closed = as_a("GET", "/api/v1/restore/mounts", params={"include_closed": "true"}).json()
    assert theirs not in {m["mount_id"] for m in closed["mounts"]}
    error_body(as_a("GET", f"/api/v1/jobs/{theirs}"), 404, "not_found")
    jobs = as_a("GET", "/api/v1/jobs").json()["jobs"]
    assert theirs not in {j["job_id"] for j in jobs}

    # A closes its own (and the admin's on its VM: an operator of that VM may)
    for mid in (mine, admin_on_a):
        r = as_a("DELETE", f"/api/v1/restore/mounts/{mid}")
        assert r.status_code == 200 and r.json()["status"] == "closed", r.text
