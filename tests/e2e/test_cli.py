"""The CLI as a user runs it, against real hub and node processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fixtures.cluster import Cluster


def cli(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SENDENSE_URL": cluster.hub_url, "SENDENSE_TOKEN": cluster.admin_token}
    proc = subprocess.run(
        [sys.executable, "-m", "sendense.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_cli_register_backup_and_list(cluster: Cluster, make_vm) -> None:
    vm = make_vm("cli1", [16 << 20])
    g = vm.guest(0)
    g.pwrite(os.urandom(1 << 20), 0)
    g.flush()
    token_file = cluster.node_dir / "node.token"
    cli(cluster, "node", "add", "n1", cluster.node_url, "--token-file", str(token_file))
    cli(cluster, "source", "add-qemu", "lab", "--node", "n1", "--vm", f"cli1={vm.qmp_socket}")
    out = cli(cluster, "--json", "vm", "discover", "lab")
    assert json.loads(out.stdout)["vms"][0]["disks"][0]["disk_key"] == 2000

    out = cli(cluster, "backup", "start", "cli1", "--type", "full", "--wait")
    assert "completed" in out.stdout
    g.pwrite(os.urandom(65536), 4 << 20)
    g.flush()
    out = cli(cluster, "--json", "backup", "start", "cli1", "--wait")
    job = json.loads(out.stdout)
    assert job["status"] == "completed"
    assert job["disks"][0]["backup_type"] == "incremental"

    listed = json.loads(cli(cluster, "--json", "backup", "ls", "--vm", "cli1").stdout)
    assert listed["total"] == 2
    chain = json.loads(cli(cluster, "--json", "backup", "chain", "cli1").stdout)
    assert chain["disks"][0]["chain_length"] == 2
    jobs = json.loads(cli(cluster, "--json", "job", "ls").stdout)
    assert jobs["total"] == 2


def test_cli_errors_are_clear(cluster: Cluster) -> None:
    proc = cli(cluster, "backup", "start", "no-such-vm", check=False)
    assert proc.returncode == 1
    assert "404" in proc.stderr and "no-such-vm" in proc.stderr
    env = {**os.environ, "SENDENSE_URL": cluster.hub_url, "SENDENSE_TOKEN": "wrong"}
    proc = subprocess.run(
        [sys.executable, "-m", "sendense.cli.main", "repo", "ls"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1 and "401" in proc.stderr
