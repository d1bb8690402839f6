"""``sendense backup rm | consolidate | verify`` as a user runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from fixtures.cluster import Cluster, cli
from fixtures.lifecycle import MiB, by_disk, write_random


def test_cli_verify_consolidate_and_rm(cluster: Cluster, make_vm) -> None:
    vm = make_vm("clil", [8 * MiB])
    cluster.register(vm)
    points = []
    for i in range(4):
        write_random(vm, 0, i * MiB, MiB)
        points.append(by_disk(cluster, cluster.backup("clil", "full" if i == 0 else "auto"))[0])

    out = cli(cluster, "backup", "verify", points[-1]["backup_id"], "--wait")
    assert "ok" in out.stdout
    job = json.loads(
        cli(cluster, "--json", "backup", "verify", points[0]["backup_id"], "--wait").stdout
    )
    assert job["status"] == "completed" and job["result"]["verify_status"] == "ok"

    plan = json.loads(
        cli(cluster, "--json", "backup", "consolidate", "clil", "--keep", "2", "--dry-run").stdout
    )
    assert [r["backup_id"] for r in plan["disks"][0]["remove"]] == [
        p["backup_id"] for p in points[:2]
    ]
    out = cli(cluster, "backup", "consolidate", "clil", "--keep", "2", "--dry-run")
    assert points[2]["backup_id"] in out.stdout
    out = cli(cluster, "backup", "consolidate", "clil", "--keep", "2", "--wait")
    assert "completed" in out.stdout and "2 left" in out.stdout
    chain = cluster.client.get("/api/v1/backups/clil/chain")["disks"][0]
    assert [x["backup_id"] for x in chain["chain"]] == [p["backup_id"] for p in points[2:]]

    # rm refuses a point others depend on, with the API's reason and exit 1
    refused = cli(cluster, "backup", "rm", points[2]["backup_id"], ok=None)
    assert refused.returncode == 1
    assert "has_dependents" in refused.stderr
    refused = cli(cluster, "--json", "backup", "rm", points[2]["backup_id"], ok=None)
    body = json.loads(refused.stdout)
    assert body["status"] == 409 and body["details"]["dependents"] == [points[3]["backup_id"]]
    done = json.loads(
        cli(cluster, "--json", "backup", "rm", points[2]["backup_id"], "--cascade").stdout
    )
    assert done["deleted"] == [points[3]["backup_id"], points[2]["backup_id"]]
    assert not Path(points[3]["file_path"]).exists()

    # a damaged restore point: verify says so and exits 1
    write_random(vm, 0, 0, MiB)
    last = by_disk(cluster, cluster.backup("clil", "full"))[0]
    mapped = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", last["file_path"]],
        check=True,
        capture_output=True,
    ).stdout
    where = next(e["offset"] for e in json.loads(mapped) if e["data"])  # a data cluster
    with open(last["file_path"], "r+b") as f:
        f.seek(where)
        data = f.read(16)
        f.seek(where)
        f.write(bytes(b ^ 0xFF for b in data))
    failed = cli(cluster, "backup", "verify", last["backup_id"], "--wait", ok=None)
    assert failed.returncode == 1
    assert "failed" in failed.stdout and "digest mismatch" in failed.stdout
