"""Thin wrappers around ``qemu-img``: one function per subcommand.

Each builds an argv list, runs it, and raises `QemuImgError` (with the
command, exit code and stderr) on failure. ``-U`` (force share) is used for
read-only inspection so that an image opened by a running qemu-nbd can still
be looked at.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from typing import Any

from sendense.core.errors import Cancelled, QemuImgError

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


def check(path: str, *, allow_leaks: bool = False) -> dict[str, Any]:
    """``qemu-img check``; raises on corruption (exit code 2) and, unless
    ``allow_leaks``, on leaked clusters (3: wasted space, reads unaffected)."""
    cmd = ["check", "--output=json", path]
    full = [QEMU_IMG, *cmd]
    proc = subprocess.run(full, capture_output=True, text=True, check=False)
    if proc.returncode not in ((0, 3) if allow_leaks else (0,)):
        raise QemuImgError(full, proc.returncode, proc.stderr or proc.stdout)
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def repair_leaks(path: str) -> None:
    """``qemu-img check -r leaks``: free clusters nothing references (what a
    write interrupted mid-way leaves). Touches refcounts only, never data."""
    run(["check", "-r", "leaks", "--output=json", path])


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


def commit(
    top: str,
    base: str,
    *,
    rate_limit: int | None = None,
    on_progress: Callable[[float], None] | None = None,
    die_with_parent: bool = True,
) -> None:
    """``qemu-img commit -b base top``: write what ``top`` reads (through the
    images between) into ``base``, which must be in ``top``'s backing chain.

    ``-b`` implies ``-d``: ``top`` is left as it was. The images between are
    invalid afterwards (their backing changed under them). ``qemu-img`` opens
    ``top`` and ``base`` for writing and so takes QEMU's write lock on them: it
    fails at once (nothing written) while another process has the chain open.
    ``rate_limit`` in bytes/s; ``on_progress`` gets the percentage done.

    ``die_with_parent``: qemu-img gets SIGKILL when its parent dies
    (``setpriv --pdeathsig``). A commit outliving a killed hub would keep the
    image locks that the hub's recovery needs to finish the merge.
    """
    args = ["commit", "-p", "-b", base]
    if rate_limit:
        args += ["-r", str(rate_limit)]
    run_with_progress([*args, top], on_progress, die_with_parent=die_with_parent)


def rebase(path: str, backing: str, *, backing_fmt: str = "qcow2", unsafe: bool = True) -> None:
    """Change ``path``'s backing file. ``unsafe`` (``-u``) only rewrites the
    header (the caller guarantees the new backing reads the same); ``""``
    removes the backing file."""
    args = ["rebase", "-q"]
    if unsafe:
        args.append("-u")
    args += ["-b", backing]
    if backing:
        args += ["-F", backing_fmt]
    run([*args, path])


_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def run_with_progress(
    args: list[str],
    on_progress: Callable[[float], None] | None,
    *,
    die_with_parent: bool = False,
    cancel: threading.Event | None = None,
) -> None:
    """Run ``qemu-img <args>`` (with ``-p``), reporting ``(12.34/100%)`` as it goes.

    ``cancel``: once set, qemu-img is killed and `Cancelled` raised."""
    cmd = [QEMU_IMG, *args]
    log.debug("run cmd=%s", cmd)
    prefix = (
        ["setpriv", "--pdeathsig", "KILL"] if die_with_parent and shutil.which("setpriv") else []
    )
    try:
        proc = subprocess.Popen([*prefix, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError as e:
        raise QemuImgError(cmd, 127, "qemu-img not found (install qemu-utils)") from e
    out, err = proc.stdout, proc.stderr
    assert out is not None and err is not None
    # stderr drained by a thread: a chatty stderr must not block the child.
    stderr: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr.append(err.read()), daemon=True)
    reader.start()
    done = threading.Event()
    if cancel is not None:

        def stop_when_cancelled() -> None:
            while not done.is_set():
                if cancel.wait(0.2):
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    return

        threading.Thread(target=stop_when_cancelled, daemon=True).start()
    buf = b""
    while chunk := os.read(out.fileno(), 4096):
        buf = (buf + chunk)[-256:]
        found = _PERCENT.findall(buf)
        if found and on_progress is not None:
            try:
                on_progress(float(found[-1]))
            except Exception:
                # Progress is a report: it must never leave qemu-img running
                # unwatched, nor stop it half way.
                log.exception("progress report failed cmd=%s", cmd[:2])
                on_progress = None
    rc = proc.wait()
    done.set()
    reader.join()
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled by user")
    if rc != 0:
        raise QemuImgError(cmd, rc, b"".join(stderr).decode(errors="replace"))
