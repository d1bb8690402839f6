"""``sendense source add-vmware`` against a vCenter *simulator* (govmomi's
vcsim with Sendense's CBT double, tests/vcsim), not a real vCenter: the
password comes from a file, the environment or the terminal, never from a
command-line argument, and is never printed or answered back."""

from __future__ import annotations

import json
from pathlib import Path

from fixtures.cluster import Cluster, cli
from vcsim.kit import Vcsim
from vcsim.kit import vcsim as vcsim  # the fixture


def test_vmware_source_added_from_the_cli_with_a_password_file_on_a_vcenter_simulator(
    cluster: Cluster, vcsim: Vcsim, tmp_path: Path
) -> None:
    vcsim.create_vm("web1", [(64 << 20, True)])
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
    secret = tmp_path / "vc.password"
    secret.write_text(vcsim.password + "\n")
    added = cli(
        cluster,
        "--json",
        "source",
        "add-vmware",
        "vc1",
        "--node",
        "node1",
        "--host",
        vcsim.host,
        "--port",
        str(vcsim.port),
        "--user",
        vcsim.user,
        "--password-file",
        str(secret),
        "--insecure",
    )
    assert vcsim.password not in added.stdout + added.stderr
    source = json.loads(added.stdout)
    assert source["type"] == "vmware"
    assert vcsim.password not in json.dumps(cluster.client.get("/api/v1/sources"))
    found = cli(cluster, "--json", "vm", "discover", "vc1")
    names = [v["name"] for v in json.loads(found.stdout)["vms"]]
    assert "web1" in names
    job = cluster.backup("web1", "full")
    assert job["status"] == "completed", job
    assert vcsim.password not in cluster.log("hub") + cluster.log("node")


def test_vmware_cli_refuses_an_unreadable_password_file(cluster: Cluster, tmp_path: Path) -> None:
    """No vCenter is contacted: the CLI stops on the missing file, naming it."""
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
    missing = tmp_path / "nope"
    r = cli(
        cluster,
        "source",
        "add-vmware",
        "vc1",
        "--node",
        "node1",
        "--host",
        "vc.example",
        "--user",
        "u",
        "--password-file",
        str(missing),
        ok=False,
    )
    assert r.returncode == 2
    assert "--password-file" in r.stderr and str(missing) in r.stderr.replace("\n", "")
    assert cluster.client.get("/api/v1/sources")["sources"] == []
