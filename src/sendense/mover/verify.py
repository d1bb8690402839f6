"""Recompute a restore point's digest from its QCOW2 chain (see `digest`)."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import nbd

from sendense.mover.copy import Mover
from sendense.mover.digest import DEFAULT_ALGORITHM, BlockHashList
from sendense.qemu.img import ImageKey
from sendense.qemu.nbd_server import QemuNbdServer


def digest_of_image(
    path: str | Path,
    *,
    fmt: str = "qcow2",
    algorithm: str = DEFAULT_ALGORITHM,
    key: ImageKey | None = None,
) -> str:
    """Digest of what ``path`` (with its backing chain) reads as.

    Pass ``algorithm=algorithm_of(recorded)`` to check a recorded digest.

    Served read-only by qemu-nbd on a private unix socket and read with the
    mover's own planner, so only allocated data is read and zero blocks are
    hashed as the constant they are. ``key``: an encrypted chain (qemu/img.py).
    """
    with tempfile.TemporaryDirectory(prefix="sendense-digest-") as tmp:
        sock = str(Path(tmp) / "nbd.sock")
        with QemuNbdServer(str(path), fmt=fmt, socket_path=sock, read_only=True, key=key) as server:
            h = nbd.NBD()
            try:
                h.add_meta_context("base:allocation")
                h.connect_uri(server.url)
                size = h.get_size()
                hashes = BlockHashList(Path(tmp) / "digest.list", size, algorithm=algorithm)
                result = Mover(h, None, size, hashes=hashes).run()
            finally:
                with contextlib.suppress(Exception):
                    h.shutdown()
    assert result.digest is not None
    return result.digest
