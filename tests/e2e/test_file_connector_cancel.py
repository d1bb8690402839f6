"""The file source's hash pass (inside freeze) shows its progress and stops
on cancel (needs the worker to hand the connector its cancel flag)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from fixtures.cluster import Cluster, cli

GiB = 1 << 30


def test_file_source_hash_pass_reports_progress_and_cancels(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Compressed clusters: the hash pass reads them through NBD (about
    # 1 GiB/s here, seconds for this image), slow enough to catch it running;
    # plain clusters are hashed straight from the file, too fast to cancel.
    raw = tmp_path / "big.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "1536M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "raw"]
        + [a for n in range(2) for a in ("-c", f"write -P {171 + n} {n * 768}M 768M")]
        + [str(raw)],
        check=True,
        capture_output=True,
    )
    disk = tmp_path / "images" / "big.qcow2"
    disk.parent.mkdir()
    subprocess.run(
        ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], check=True
    )
    raw.unlink()
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
    cli(cluster, "source", "add-file", "files", "--node", "node1", f"--vm=big1={disk}")
    cli(cluster, "vm", "discover", "files")
    cluster.backup("big1", "full")
    started = cluster.start_backup("big1", "incremental")
    auth = {"Authorization": f"Bearer {cluster.node_token}"}

    def node_status() -> dict[str, Any]:
        r = httpx.get(
            f"{cluster.node_url}/api/v1/status/{started['job_id']}",
            headers=auth,
            verify=cluster.node_verify,
        )
        st: dict[str, Any] = r.json()
        return st

    deadline = time.monotonic() + 30
    while not node_status().get("step", "").startswith("hashing disk 2000: "):
        assert time.monotonic() < deadline, node_status()
        assert node_status()["status"] == "running", node_status()
        time.sleep(0.05)
    t0 = time.monotonic()
    cluster.client.post(f"/api/v1/jobs/{started['job_id']}/cancel", {})
    job = cluster.wait_job(started["job_id"])
    assert job["status"] == "cancelled", job
    assert time.monotonic() - t0 < 5
    subprocess.run(
        ["qemu-io", "-c", "write -P 1 0 64k", str(disk)], check=True, capture_output=True
    )
