"""The data mover between real qemu-nbd exports."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import nbd
import pytest

from sendense.core.errors import Cancelled
from sendense.mover.copy import Mover
from sendense.mover.digest import BlockHashList
from sendense.mover.verify import digest_of_image
from sendense.qemu import img
from sendense.qemu.nbd_server import QemuNbdServer

SIZE = (32 << 20) + 4096  # not a multiple of the 64 KiB block


def make_source(tmp_path: Path, fmt: str, rng: random.Random) -> Path:
    src = tmp_path / f"src.{fmt}"
    img.create(str(src), SIZE, fmt=fmt)
    with QemuNbdServer(str(src), fmt=fmt, socket_path=str(tmp_path / "w.sock")) as s:
        h = nbd.NBD()
        h.connect_uri(s.url)
        for _ in range(30):
            length = rng.choice([512, 4096, 65536, 1 << 20])
            offset = rng.randrange(0, SIZE - length) // 512 * 512
            h.pwrite(rng.randbytes(length), offset)
        h.pwrite(rng.randbytes(4096), SIZE - 4096)
        h.pwrite(bytes(1 << 20), 1 << 20)  # explicit zeroes
        h.flush()
        h.shutdown()
    return src


def connect(url: str, *contexts: str) -> nbd.NBD:
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(url)
    return h


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("in_flight,request_size", [(1, 65536), (8, 4 << 20)])
def test_copy_reads_back_identical_with_digest(
    tmp_path: Path, fmt: str, in_flight: int, request_size: int
) -> None:
    src = make_source(tmp_path, fmt, random.Random(fmt + str(in_flight)))
    dst = tmp_path / "dst.qcow2"
    img.create(str(dst), SIZE)
    with (
        QemuNbdServer(str(src), fmt=fmt, socket_path=str(tmp_path / "s.sock"), read_only=True) as s,
        QemuNbdServer(str(dst), socket_path=str(tmp_path / "d.sock")) as d,
    ):
        hashes = BlockHashList(tmp_path / "h.b3", SIZE)
        seen = []
        result = Mover(
            connect(s.url, "base:allocation"),
            connect(d.url),
            SIZE,
            hashes=hashes,
            in_flight=in_flight,
            request_size=request_size,
            on_progress=lambda p: seen.append(p.bytes_done),
        ).run()
    assert img.compare(str(dst), str(src))
    assert result.digest == digest_of_image(str(src), fmt=fmt)
    assert result.data_bytes < SIZE // 2  # holes were not copied
    assert seen and seen[-1] == result.data_bytes
    # The target holds no more than the data (zero runs are not written).
    assert img.disk_usage(str(dst)) < result.data_bytes + (4 << 20)


def test_cancel_stops_between_requests(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(16 << 20))
    dst = tmp_path / "dst.qcow2"
    img.create(str(dst), 16 << 20)
    cancel = threading.Event()
    with (
        QemuNbdServer(
            str(src), fmt="raw", socket_path=str(tmp_path / "s.sock"), read_only=True
        ) as s,
        QemuNbdServer(str(dst), socket_path=str(tmp_path / "d.sock")) as d,
    ):
        hashes = BlockHashList(tmp_path / "h.b3", 16 << 20)

        def progress(p) -> None:
            if p.bytes_done > 0:
                cancel.set()

        mover = Mover(
            connect(s.url, "base:allocation"),
            connect(d.url),
            16 << 20,
            hashes=hashes,
            in_flight=1,
            request_size=65536,
            cancel_event=cancel,
            on_progress=progress,
            max_rate=float(4 << 20),
        )
        with pytest.raises(Cancelled):
            mover.run()
    assert mover.progress.bytes_done < 16 << 20
    assert not list(tmp_path.glob("h.*"))  # the hash list is not left behind
