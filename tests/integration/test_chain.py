"""storage/chain.py on real qemu-img: merging a chain, replacing, removing.

Chains are built with ``qemu-img create -b`` and written with ``qemu-io``
(random data, zeroes over data, the last cluster); every assertion is what a
user would check: ``qemu-img compare`` against raw copies taken before.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sendense.core.errors import QemuImgError
from sendense.qemu import img
from sendense.qemu.nbd_server import QemuNbdServer
from sendense.storage import chain, layout

MiB = 1 << 20
SIZE = 64 * MiB


def qemu_io(path: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def raw_copy(path: Path, dest: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(path), str(dest)], check=True)
    return dest


def make_chain(folder: Path, points: int, *, seed: int = 1, size: int = SIZE) -> list[Path]:
    """A full and ``points - 1`` incrementals, each with its own writes."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(points):
        path = folder / f"p{i + 1}.qcow2"
        if i == 0:
            img.create(str(path), size, cluster_size=65536)
            qemu_io(path, f"write -P 0x11 0 {size // 2}")
        else:
            img.create(str(path), None, backing=files[-1].name, cluster_size=65536)
            cmds = []
            for _ in range(12):
                length = rng.choice([4096, 65536, 300 * 1024, MiB])
                offset = rng.randrange(0, size - length) // 512 * 512
                pattern = rng.randrange(1, 255)
                cmds.append(f"write -P {pattern} {offset} {length}")
            # zeroes over data the full wrote, and the disk's last cluster
            cmds.append(f"write -z {rng.randrange(0, size // 2 - MiB) // 65536 * 65536} {MiB}")
            cmds.append(f"write -P {i} {size - 65536} 65536")
            qemu_io(path, *cmds)
        files.append(path)
    return files


def test_merge_into_base_keeps_top_and_newer_reading_the_same(tmp_path: Path) -> None:
    files = make_chain(tmp_path / "c", 5)
    refs = {i: raw_copy(f, tmp_path / f"ref{i}.raw") for i, f in enumerate(files)}
    seen: list[float] = []
    chain.merge_into_base(files[3], files[0], on_progress=seen.append)
    assert seen and seen[-1] == 100.0
    # the base now reads as P4 did, alone; P4 and P5 still read the same
    assert chain.backing_file(files[0]) is None
    assert img.compare(str(files[0]), str(refs[3]))
    assert img.compare(str(files[3]), str(refs[3]))
    assert img.compare(str(files[4]), str(refs[4]))
    chain.replace(files[0], files[3])
    assert not files[0].exists()
    assert chain.backing_file(files[3]) is None
    assert img.compare(str(files[3]), str(refs[3]))
    assert img.compare(str(files[4]), str(refs[4]))
    assert img.check(str(files[3]))["check-errors"] == 0


def test_merge_killed_midway_leaves_top_readable_and_can_be_redone(tmp_path: Path) -> None:
    files = make_chain(tmp_path / "c", 4, seed=2, size=256 * MiB)
    # a big last increment so that the rate-limited commit is still running
    qemu_io(files[3], f"write -P 0x77 {8 * MiB} {96 * MiB}")
    ref3 = raw_copy(files[3], tmp_path / "ref3.raw")
    proc = subprocess.Popen(
        ["qemu-img", "commit", "-r", str(16 * MiB), "-b", str(files[0]), str(files[3])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.5)
    assert proc.poll() is None, "the commit ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # interrupted: the top still reads exactly as before ...
    assert img.compare(str(files[3]), str(ref3))
    # ... and the merge done again completes it
    chain.merge_into_base(files[3], files[0])
    chain.replace(files[0], files[3])
    assert img.compare(str(files[3]), str(ref3))


def test_merge_refused_while_a_reader_has_the_chain_open(tmp_path: Path) -> None:
    files = make_chain(tmp_path / "c", 3, seed=3)
    before = raw_copy(files[0], tmp_path / "base-before.raw")
    reader = QemuNbdServer(str(files[2]), socket_path=str(tmp_path / "s.sock"), read_only=True)
    with reader, pytest.raises(QemuImgError) as e:
        chain.merge_into_base(files[1], files[0])
    assert "lock" in e.value.stderr
    # nothing was written
    assert img.compare(str(files[0]), str(before))


def test_remove_point_removes_image_sidecar_and_hash_list(tmp_path: Path) -> None:
    folder = tmp_path / "repo" / "vm" / "2000"
    files = make_chain(folder, 2)
    for f in files:
        layout.write_sidecar(f, {"backup_id": f.stem})
        chain.hash_list_path(f).write_bytes(b"x" * 4096)
    expected = sum(os.stat(p).st_blocks * 512 for p in chain.point_files(files[1]))
    assert chain.remove_point(files[1]) == expected
    assert not any(p.exists() for p in chain.point_files(files[1]))
    assert files[0].exists()
    chain.remove_point(files[0])
    # empty disk and VM folders go, the repository stays
    assert not (tmp_path / "repo" / "vm").exists()
    assert (tmp_path / "repo").exists()
    assert chain.remove_point(files[0]) == 0  # already gone: fine


def test_sidecar_update_keeps_other_fields(tmp_path: Path) -> None:
    f = tmp_path / "a.qcow2"
    layout.write_sidecar(f, {"backup_id": "b1", "backup_type": "incremental", "digest": "d"})
    chain.update_sidecar(f, backup_type="full", synthetic=True, parent_backup_id=None)
    data = chain.read_sidecar(f)
    assert data == {
        "format": layout.SIDECAR_FORMAT,
        "backup_id": "b1",
        "backup_type": "full",
        "digest": "d",
        "synthetic": True,
        "parent_backup_id": None,
    }


def chattr(path: Path, flag: str) -> bool:
    r = subprocess.run(["chattr", flag, str(path)], capture_output=True, text=True)
    return r.returncode == 0


def test_immutable_attribute_is_seen_and_blocks_removal(tmp_path: Path) -> None:
    f = tmp_path / "p.qcow2"
    img.create(str(f), MiB)
    layout.write_sidecar(f, {"backup_id": "b"})
    if not chattr(f, "+i"):
        pytest.skip(
            f"IMMUTABLE ATTRIBUTE UNTESTED: chattr +i is not supported on {tmp_path} "
            "(filesystem or missing CAP_LINUX_IMMUTABLE)"
        )
    try:
        assert chain.immutable_files(f) == [f]
        with pytest.raises(PermissionError):
            chain.remove_point(f)
        assert f.exists() and layout.sidecar_path(f).exists()  # nothing removed
    finally:
        chattr(f, "-i")
    assert chain.immutable_files(f) == []
    assert chain.remove_point(f) > 0
    assert chain.immutable_files(tmp_path / "missing.qcow2") == []
