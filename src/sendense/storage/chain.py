"""A chain of restore points on disk: merge, replace, remove, inspect.

Thin functions over ``qemu-img`` (`sendense.qemu.img`) and the filesystem;
they know files, not the catalog. The engine's delete, consolidate and verify
jobs (``engine/``) decide what to call, in which order, and how to recover.

Files of one restore point (layout.py), all in its disk's folder::

    <stamp>-<full|incr>.qcow2    the image (backing file: its parent's, relative)
    <stamp>-<full|incr>.json     the sidecar (format sendense-backup/1)
    <stamp>-<full|incr>.blocks   block hash list of the last good verify
                                 (engine/verify.py), when there was one

A restore point's files go together: `remove_point` removes the three.

Crash safety of a rename or removal: the directory is fsynced after it, so a
power cut cannot bring back a removed file or lose a renamed one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sendense.qemu import img
from sendense.storage import immutability, layout

log = logging.getLogger(__name__)


def hash_list_path(qcow2: str | Path) -> Path:
    """Where the block hash list of a restore point's last good verify lives."""
    return Path(qcow2).with_suffix(".blocks")


def point_files(qcow2: str | Path) -> list[Path]:
    """The files of one restore point: image, sidecar, block hash list."""
    path = Path(qcow2)
    return [path, layout.sidecar_path(path), hash_list_path(path)]


def bytes_on_disk(qcow2: str | Path) -> int:
    """Bytes the restore point's files occupy (allocated blocks, not sizes)."""
    total = 0
    for p in point_files(qcow2):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(p).st_blocks * 512
    return total


def immutable_files(qcow2: str | Path) -> list[Path]:
    """The restore point's files that carry the immutable attribute."""
    return [p for p in point_files(qcow2) if immutability.is_locked(p)]


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_point(qcow2: str | Path) -> int:
    """Remove a restore point's files (missing ones are fine); bytes freed.

    The image goes first, so a crash never leaves an image without its
    sidecar. Empty disk and VM folders go too, never the repository itself.
    Raises `PermissionError` (EPERM) when the image has the immutable
    attribute: then nothing of this restore point was removed.
    """
    path = Path(qcow2)
    freed = 0
    for p in point_files(path):
        try:
            size = os.stat(p).st_blocks * 512
            os.unlink(p)
            freed += size
        except FileNotFoundError:
            continue
        except PermissionError:
            if p == path:
                raise  # nothing of this restore point was removed
            # The image is gone: the restore point is, too. A sidecar left
            # behind by a lock is only a file; say so rather than fail.
            log.warning("could not remove %s (immutable attribute?); left behind", p)
    with contextlib.suppress(FileNotFoundError):
        fsync_dir(path.parent)
    for folder in (path.parent, path.parent.parent):
        try:
            folder.rmdir()
        except OSError:
            break
    return freed


def backing_file(qcow2: str | Path) -> str | None:
    """The backing file named in the image's header (None for a full)."""
    backing: str | None = img.info(str(qcow2)).get("backing-filename")
    return backing


def merge_into_base(
    top: str | Path,
    base: str | Path,
    *,
    rate_limit: int | None = None,
    on_progress: Callable[[float], None] | None = None,
    key: img.ImageKey | None = None,
) -> None:
    """Write what ``top`` reads into ``base`` (the oldest image of its chain),
    durably. Afterwards ``base`` alone reads exactly as ``top`` does.

    Only clusters allocated above ``base`` are written, and every such
    cluster is one that ``top`` (and every image above it) reads from an image
    above ``base``: at any moment of the merge, interrupted or not, ``top``
    and everything newer read exactly as before. Only ``base`` and the images
    between change what they read. ``qemu-img commit -b`` (which implies
    ``-d``) leaves ``top`` as it was.
    """
    if key is None:
        img.commit(str(top), str(base), rate_limit=rate_limit, on_progress=on_progress)
    else:
        _merge_layer_by_layer(str(top), str(base), key, rate_limit, on_progress)
    fsync_file(base)


def _merge_layer_by_layer(
    top: str,
    base: str,
    key: img.ImageKey,
    rate_limit: int | None,
    on_progress: Callable[[float], None] | None,
) -> None:
    """`merge_into_base` for an encrypted chain, one layer at a time.

    ``qemu-img commit -b base`` finds ``base`` in the chain by file name, and
    qemu 7.2 names an image opened with a secret option by a ``json:{...}``
    string: the lookup never matches ("Did not find ... in the backing chain").
    Without ``-b`` commit goes into the image's own backing file, no lookup.
    So, oldest layer first, for each image between ``base`` (exclusive) and
    ``top`` (inclusive):

    1. if its backing file is not ``base`` yet, ``rebase -u`` it onto ``base``:
       ``base`` already holds everything its old backing read (step 2 of the
       layer below), so it reads the same;
    2. ``commit -d`` it into ``base`` (``-d``: the layer keeps its clusters).

    The invariant of `merge_into_base` holds at every step: only clusters
    that ``top`` and everything newer read from above ``base`` are written.
    Redone after a crash, the layers already merged are out of ``top``'s
    chain and the first still in it is merged again (idempotent). The cost:
    a cluster changed in several layers is written once per layer.
    """
    chain = [str(e["filename"]) for e in img.info(top, backing_chain=True)]
    real = [os.path.realpath(p) for p in chain]
    base_real = os.path.realpath(base)
    if base_real not in real:
        raise ValueError(f"{base} is not in the backing chain of {top}")
    layers = list(reversed(chain[: real.index(base_real)]))  # oldest first, top last
    for i, layer in enumerate(layers):
        if os.path.realpath(os.path.join(os.path.dirname(layer), backing_file(layer) or "")) != (
            base_real
        ):
            img.rebase(layer, os.path.relpath(base, os.path.dirname(layer)), unsafe=True, key=key)

        def progress(percent: float, i: int = i) -> None:
            if on_progress is not None:
                on_progress((i + percent / 100) * 100 / len(layers))

        img.commit_into_backing(layer, rate_limit=rate_limit, on_progress=progress, key=key)


def replace(src: str | Path, dst: str | Path) -> None:
    """Atomically put ``src`` at ``dst`` (same folder), durably."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def read_sidecar(qcow2: str | Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(layout.sidecar_path(Path(qcow2)).read_text())
    except FileNotFoundError:
        return None
    return data


def update_sidecar(qcow2: str | Path, **changes: Any) -> None:
    """Rewrite a restore point's sidecar with ``changes`` (atomic rename)."""
    data = read_sidecar(qcow2) or {}
    data.pop("format", None)
    data.update(changes)
    layout.write_sidecar(Path(qcow2), data)
