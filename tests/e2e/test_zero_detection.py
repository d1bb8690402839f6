"""Zeros a source sends as data are stored as zero clusters, not as data.

A fully written raw image (a block device, a thick disk: every byte is
"data" to the source, zeros included) backed up through the file source:
the restore point reads exactly as the image, and its QCOW2 file holds
about the random part only.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from fixtures.cluster import Cluster, cli
from sendense.qemu import img

MiB = 1 << 20


def test_zero_data_is_not_stored_as_data(cluster: Cluster, tmp_path: Path) -> None:
    image = tmp_path / "images" / "thick.raw"
    image.parent.mkdir()
    random_part = os.urandom(16 * MiB)
    with image.open("wb") as f:
        f.write(bytes(96 * MiB))  # zeros written out: allocated, not a hole
        f.write(random_part)
        f.write(bytes(16 * MiB))
    os.fsync(os.open(image, os.O_RDONLY))
    allocated = os.stat(image).st_blocks * 512
    assert allocated >= 128 * MiB, "the image must be fully allocated for this test"
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
    cli(cluster, "source", "add-file", "files", "--node", "node1", f"--vm=thick1={image}")
    cli(cluster, "vm", "discover", "files")
    job = cluster.backup("thick1", "full")
    assert job["status"] == "completed", job
    (backup_id,) = job["backups"]
    b = cluster.client.get(f"/api/v1/backups/{backup_id}")
    assert img.compare(b["file_path"], str(image))
    on_disk = Path(b["file_path"]).stat().st_blocks * 512
    assert on_disk < 24 * MiB, f"restore point takes {on_disk / MiB:.1f} MiB for 16 MiB of data"
    mapped = subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", b["file_path"]],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert '"zero": true' in mapped
