"""The CLI as a user runs it, against real hub and node processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.cluster import Cluster, cli


def test_cli_register_backup_and_list(cluster: Cluster, make_vm) -> None:
    vm = make_vm("cli1", [16 << 20])
    g = vm.guest(0)
    g.pwrite(os.urandom(1 << 20), 0)
    g.flush()
    token_file = cluster.node_dir / "node.token"
    cli(cluster, "node", "add", "n1", cluster.node_url, "--token-file", str(token_file), "--yes")
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


def test_cli_output_not_a_terminal_keeps_digests_and_paths_whole(cluster: Cluster, make_vm) -> None:
    """Piped output (not a TTY) is not folded at 80 columns: a digest and a
    file path each appear whole on one line; disks are named by index and key;
    progress shows no ``?`` for figures not known yet."""
    vm = make_vm("cli-wide", [16 << 20, 8 << 20])
    g = vm.guest(0)
    g.pwrite(os.urandom(1 << 20), 0)
    g.flush()
    token_file = cluster.node_dir / "node.token"
    cli(cluster, "node", "add", "n1", cluster.node_url, "--token-file", str(token_file), "--yes")
    cli(cluster, "source", "add-qemu", "lab", "--node", "n1", "--vm", f"{vm.name}={vm.qmp_socket}")

    discovered = cli(cluster, "vm", "discover", "lab").stdout
    assert "0 (key 2000)" in discovered and "1 (key 2001)" in discovered, discovered
    assert "0-based index" in discovered  # the key is explained

    started = cli(cluster, "backup", "start", vm.name, "--type", "full", "--wait").stdout
    assert "disk 0 (key 2000) full" in started and "disk 1 (key 2001) full" in started, started
    assert "?" not in started, started

    listed = json.loads(cli(cluster, "--json", "backup", "ls", "--vm", vm.name).stdout)
    b = next(b for b in listed["backups"] if b["disk_id"] == 0)
    assert b["digest"] and len(b["file_path"]) > 80, b

    shown = cli(cluster, "backup", "show", b["backup_id"]).stdout
    lines = shown.splitlines()
    assert any(b["digest"] in line for line in lines), shown
    assert any(b["file_path"] in line for line in lines), shown
    assert any("disk 0 (key 2000)" in line for line in lines), shown

    table = cli(cluster, "backup", "ls", "--vm", vm.name).stdout
    assert any(b["backup_id"] in line and "0 (key 2000)" in line for line in table.splitlines())
    assert "0-based index" in table

    chain = cli(cluster, "backup", "chain", vm.name).stdout
    assert "1 (key 2001)" in chain, chain
    job = cli(cluster, "job", "show", b["job_id"]).stdout
    assert "0 (key 2000)" in job and "completed" in job, job
    shown_vm = cli(cluster, "vm", "show", vm.name).stdout
    disk0 = str(vm.disks[0])
    assert any(disk0 in line and "0 (key 2000)" in line for line in shown_vm.splitlines()), shown_vm


def test_cli_errors_are_clear(cluster: Cluster) -> None:
    proc = cli(cluster, "backup", "start", "no-such-vm", ok=None)
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


@pytest.mark.timeout(720)  # two demos, each waits for its policy's one-minute schedule
def test_demo_passes_and_every_check_counts(tmp_path: Path, monkeypatch) -> None:
    """``sendense demo`` exits 0 with every check passed; a check that fails
    (here: the full restore point no longer reading as recorded) makes it 1."""
    argv = ["demo", "--workdir", str(tmp_path / "ok"), "--disk-mib", "32"]
    proc = subprocess.run(
        [sys.executable, "-m", "sendense.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every check passed" in proc.stdout and "FAILED" not in proc.stdout, proc.stdout
    assert "True" not in proc.stdout and "False" not in proc.stdout, proc.stdout

    from sendense.cli import demo

    real = demo.digest_of_image
    fulls: set[str] = set()

    def digest_of_image(path: str, algorithm: str) -> str:
        digest = real(path, algorithm=algorithm)
        if path.endswith("-full.qcow2"):
            fulls.add(path)
            return digest[:-4] + ("0000" if digest[-4:] != "0000" else "1111")
        return digest

    monkeypatch.setattr(demo, "digest_of_image", digest_of_image)
    assert demo.run_demo(tmp_path / "bad", 32) == 1
    assert len(fulls) == 3  # every disk's full restore point was checked
