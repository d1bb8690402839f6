"""The immutable attribute on real files, and the lock sweeper on a real catalog.

The attribute needs a filesystem that has it (ext4, XFS, btrfs, tmpfs on
Linux 6.0+) and root (``CAP_LINUX_IMMUTABLE``): where either is missing,
the tests say so and skip. ``lsattr`` (e2fsprogs) is the independent check.
Every test lifts what it set: a file with the attribute cannot be removed
by pytest's tmp cleanup.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sendense.catalog.db import Database
from sendense.catalog.models import Backup, BackupJob, Node, Repository, Source, Vm, VmDisk
from sendense.engine.locks import sweep
from sendense.storage import immutability, layout


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """A folder whose filesystem takes the attribute (else the test skips)."""
    where = tmp_path / "repo"
    where.mkdir()
    support = immutability.probe(where)
    if not support.supported:
        pytest.skip(f"IMMUTABLE ATTRIBUTE TEST SKIPPED on {where}: {support.reason}")
    try:
        yield where
    finally:
        subprocess.run(["chattr", "-R", "-i", str(where)], capture_output=True)


def lsattr_i(path: Path) -> bool:
    if shutil.which("lsattr") is None:
        pytest.skip("lsattr (e2fsprogs) is missing: no independent check of the attribute")
    out = subprocess.run(["lsattr", "-d", str(path)], capture_output=True, text=True, check=True)
    return "i" in out.stdout.split()[0]


def make_point(folder: Path, name: str = "20260101T000000.000000Z-full.qcow2") -> Path:
    image = folder / "vm" / "2000" / name
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"QFI\xfb" + bytes(60))
    layout.write_sidecar(image, {"backup_id": "b"})
    return image


def test_lock_and_unlock_a_restore_point(folder: Path) -> None:
    image = make_point(folder)
    sidecar = layout.sidecar_path(image)
    blocks = image.with_suffix(".blocks")
    blocks.write_bytes(b"hashes")

    assert immutability.lock_point(image) == [image, sidecar]
    assert lsattr_i(image) and lsattr_i(sidecar) and not lsattr_i(blocks)
    assert immutability.is_locked(image) and immutability.locked_files([image, blocks]) == [image]
    with pytest.raises(PermissionError):
        image.unlink()
    with pytest.raises(PermissionError):
        image.write_bytes(b"overwritten")
    with pytest.raises(PermissionError):
        image.rename(folder / "elsewhere.qcow2")
    # A new restore point can still be written in the same folder.
    make_point(folder, "20260102T000000.000000Z-incr.qcow2")
    blocks.write_bytes(b"a verify rewrites its hash list")

    assert immutability.unlock_point(image) == [image, sidecar]
    assert not lsattr_i(image) and not lsattr_i(sidecar)
    assert immutability.unlock_point(image) == [], "nothing left to lift"
    image.unlink()
    # Missing files are no error either way.
    assert immutability.lock_point(image) == [sidecar]
    immutability.unlock_point(image)


def test_probe_says_why_not(tmp_path: Path) -> None:
    missing = immutability.probe(tmp_path / "absent")
    assert not missing.supported and "cannot create a file" in missing.reason
    assert not list(tmp_path.iterdir()), "the probe leaves nothing behind"


# ------------------------------------------------------------------ sweeper


def catalog_point(
    db: Database, image: Path, until: datetime | None, status: str = "completed"
) -> str:
    """Catalog rows for one restore point at ``image`` (node, source, VM, disk, repository, job)."""
    with db.session() as s:
        node = Node(name=f"n-{image.name}", url="http://127.0.0.1:1", token_encrypted="x")
        s.add(node)
        s.flush()
        source = Source(name=f"s-{image.name}", node_id=node.id, type="qemu", config={})
        s.add(source)
        s.flush()
        vm = Vm(name=f"vm-{image.name}", source_id=source.id, path="/x.qmp")
        vm.disks.append(
            VmDisk(disk_index=0, disk_key=2000, label="d", capacity_bytes=1 << 20, size_gb=0.001)
        )
        s.add(vm)
        repo = s.get(Repository, "r") or Repository(
            id="r", name="r", path=str(image.parent.parent.parent), immutable=True, retention_days=1
        )
        s.add(repo)
        s.flush()
        job = BackupJob(
            vm_id=vm.id, repository_id=repo.id, status="completed", requested_type="full"
        )
        s.add(job)
        s.flush()
        b = Backup(
            job_id=job.id,
            vm_id=vm.id,
            vm_disk_id=vm.disks[0].id,
            disk_index=0,
            disk_key=2000,
            repository_id=repo.id,
            backup_type="full",
            status=status,
            file_path=str(image),
            nbd_export_name="",
            immutable_until=until,
        )
        s.add(b)
        s.flush()
        return b.id


def test_sweeper_makes_the_files_follow_the_catalog(database: Database, folder: Path) -> None:
    now = datetime.now(UTC)
    expired = make_point(folder, "20260101T000000.000000Z-full.qcow2")
    live = make_point(folder, "20260102T000000.000000Z-full.qcow2")
    unlocked = make_point(folder, "20260103T000000.000000Z-full.qcow2")
    never = make_point(folder, "20260104T000000.000000Z-full.qcow2")
    catalog_point(database, expired, now - timedelta(minutes=1))
    catalog_point(database, live, now + timedelta(days=1))
    catalog_point(database, unlocked, now + timedelta(days=1))
    catalog_point(database, never, None)
    immutability.lock_point(expired)  # its lock ended while the hub was down
    immutability.lock_point(live)
    # `unlocked`: a crash between the catalog write and the chattr.

    counts = sweep(database, now)
    assert counts == {"lifted": 1, "restored": 1, "checked": 3}
    assert not lsattr_i(expired) and not lsattr_i(layout.sidecar_path(expired))
    assert lsattr_i(live) and lsattr_i(unlocked) and lsattr_i(layout.sidecar_path(unlocked))
    assert not lsattr_i(never)
    assert sweep(database, now) == {"lifted": 0, "restored": 0, "checked": 3}, "idempotent"

    # Time passes: every lock has ended.
    assert sweep(database, now + timedelta(days=2))["lifted"] == 2
    assert not immutability.locked_files([expired, live, unlocked, never])
