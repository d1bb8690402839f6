"""Thin wrappers around ``qemu-img``: one function per subcommand.

Each builds an argv list, runs it, and raises `QemuImgError` (with the
command, exit code and stderr) on failure. ``-U`` (force share) is used for
read-only inspection so that an image opened by a running qemu-nbd can still
be looked at.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from typing import Any

from sendense.core.errors import QemuImgError

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"


def run(args: list[str], *, timeout: float | None = None) -> str:
    cmd = [QEMU_IMG, *args]
    log.debug("run cmd=%s", cmd)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise QemuImgError(cmd, 127, "qemu-img not found (install qemu-utils)") from e
    if proc.returncode != 0:
        raise QemuImgError(cmd, proc.returncode, proc.stderr)
    return proc.stdout


def create(
    path: str,
    size: int | None = None,
    *,
    fmt: str = "qcow2",
    backing: str | None = None,
    backing_fmt: str = "qcow2",
    cluster_size: int | None = None,
    extra_options: dict[str, str] | None = None,
) -> None:
    """Create an image. ``backing`` is written as given (use a relative path)."""
    options: dict[str, str] = dict(extra_options or {})
    if cluster_size is not None:
        options["cluster_size"] = str(cluster_size)
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    if options:
        args += ["-o", ",".join(f"{k}={v}" for k, v in options.items())]
    args.append(path)
    if size is not None:
        args.append(str(size))
    run(args)


def info(path: str, *, backing_chain: bool = False) -> Any:
    args = ["info", "-U", "--output=json"]
    if backing_chain:
        args.append("--backing-chain")
    return json.loads(run([*args, path]))


def check(path: str) -> dict[str, Any]:
    """``qemu-img check``; raises on corruption or leaks (exit code 2/3)."""
    cmd = ["check", "--output=json", path]
    full = [QEMU_IMG, *cmd]
    proc = subprocess.run(full, capture_output=True, text=True, check=False)
    if proc.returncode not in (0,):
        raise QemuImgError(full, proc.returncode, proc.stderr or proc.stdout)
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def compare(a: str, b: str, *, strict: bool = False) -> bool:
    """True when both images read the same (exit 0), False when they differ (1)."""
    cmd = [QEMU_IMG, "compare", "-U", *(["-s"] if strict else []), a, b]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return True
    if proc.returncode == 1:
        return False
    raise QemuImgError(cmd, proc.returncode, proc.stderr)


def map_extents(path: str) -> list[dict[str, Any]]:
    extents: list[dict[str, Any]] = json.loads(run(["map", "-U", "--output=json", path]))
    return extents


def convert(src: str, dst: str, *, src_fmt: str | None = None, dst_fmt: str = "qcow2") -> None:
    args = ["convert", "-U"]
    if src_fmt:
        args += ["-f", src_fmt]
    run([*args, "-O", dst_fmt, src, dst])


def disk_usage(path: str) -> int:
    """Bytes the file really occupies on its filesystem (st_blocks)."""
    return os.stat(path).st_blocks * 512
