"""CPU levers of the push copy (issue 11), checked on real processes.

- Every qemu-nbd the project starts runs with the malloc settings that keep
  its request buffers (`nbd_server.MALLOC_TUNABLES` in its environment,
  before a GLIBC_TUNABLES the operator set, which wins), this glibc parses
  them, and a reference server started with ``tune_malloc=False`` has
  glibc's defaults.
- A copy into a TLS-PSK target (as the hub serves it) goes on with a handle
  as long as its socket lets it: a few trips through the mover's poll loop
  per request, not one per 16 KiB TLS record, and the restore point still
  reads back exactly as the source (``qemu-img compare``) with the source's
  digest.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from fixtures.processes import processes_under
from pgserver import free_port
from sendense.mover.copy import Mover, connect_uri
from sendense.mover.digest import BlockHashList
from sendense.mover.verify import digest_of_image
from sendense.nbd import psk
from sendense.qemu import img
from sendense.qemu.nbd_server import MALLOC_TUNABLES, QemuNbdServer, server_env

MiB = 1 << 20
SIZE = 64 * MiB + 4096
LOADER = "/lib64/ld-linux-x86-64.so.2"  # glibc's dynamic loader (x86-64)


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode().split("=", 1) for x in raw if b"=" in x)


def make_source(path: Path) -> None:
    rng = random.Random(5)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for mib in range(0, SIZE // MiB, 4):
            f.seek(mib * MiB)
            f.write(rng.randbytes(3 * MiB))
        f.seek(SIZE - 4096)
        f.write(rng.randbytes(4096))


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[QemuNbdServer, QemuNbdServer, Path]]:
    make_source(tmp_path / "src.raw")
    img.create(str(tmp_path / "dst.qcow2"), SIZE)
    keys = psk.make_server_dir(tmp_path / "tls", psk.new_key())
    src = QemuNbdServer(
        str(tmp_path / "src.raw"),
        fmt="raw",
        socket_path=str(tmp_path / "src.sock"),
        read_only=True,
    )
    dst = QemuNbdServer(
        str(tmp_path / "dst.qcow2"),
        port=free_port(),
        tls_psk_dir=str(keys),
        detect_zeroes="unmap",
    )
    src.start()
    try:
        dst.start()
        try:
            yield src, dst, keys / psk.SERVER_FILE
        finally:
            dst.stop()
    finally:
        src.stop()
        psk.remove_dir(keys)
    assert processes_under(tmp_path) == []


def test_servers_run_with_the_malloc_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This glibc takes the settings (its loader lists what it parsed).
    if not Path(LOADER).exists():
        pytest.skip(f"no {LOADER} on this machine")
    env = server_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == f"{MALLOC_TUNABLES}:glibc.malloc.arena_max=2"
    listed = subprocess.run(
        [LOADER, "--list-tunables"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "glibc.malloc.mmap_threshold: 0x2000000 " in listed
    assert "glibc.malloc.trim_threshold: 0x4000000 " in listed
    assert "glibc.malloc.arena_max: 0x2 " in listed
    # A qemu-nbd gets them. (glibc cuts the variable in the process's
    # original environment after the first value it parsed, which is what
    # /proc shows: only the start is checked there.)
    image = tmp_path / "a.qcow2"
    img.create(str(image), MiB)
    with QemuNbdServer(str(image), socket_path=str(tmp_path / "a.sock")) as s:
        assert s.pid is not None
        assert environ_of(s.pid)["GLIBC_TUNABLES"].startswith(MALLOC_TUNABLES.split(":")[0])
    # A benchmark's reference server: glibc's defaults, the caller's environment.
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    with QemuNbdServer(str(image), socket_path=str(tmp_path / "c.sock"), tune_malloc=False) as s:
        assert s.pid is not None
        assert environ_of(s.pid)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    assert processes_under(tmp_path) == []


def test_tls_copy_does_not_wake_per_record(
    servers: tuple[QemuNbdServer, QemuNbdServer, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src_server, dst_server, key_file = servers
    polls = 0
    real_poll = Mover._poll

    def counted(*args: object) -> bool:
        nonlocal polls
        polls += 1
        return real_poll(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(Mover, "_poll", staticmethod(counted))
    src = nbd.NBD()
    src.add_meta_context("base:allocation")
    connect_uri(src, src_server.url)
    dst = nbd.NBD()
    psk.use_key_file(dst, key_file)
    connect_uri(dst, dst_server.url)
    hashes = BlockHashList(tmp_path / "h.x3", SIZE)
    mover = Mover(src, dst, SIZE, hashes=hashes, request_size=4 * MiB)
    try:
        result = mover.run()
    finally:
        mover.close()
    assert result.data_bytes > 40 * MiB
    # One trip per 16 KiB record would be 256 per 4 MiB request; draining
    # the sockets leaves a handful (DRAIN_ROUNDS > 0).
    assert polls < 40 * mover.requests, (polls, mover.requests)
    dst_server.stop()
    assert img.compare(str(src_server.image), str(dst_server.image))
    assert result.digest == digest_of_image(str(src_server.image), fmt="raw")
