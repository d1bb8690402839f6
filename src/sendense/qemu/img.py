"""Thin wrappers around ``qemu-img``: one function per subcommand.

Each builds an argv list, runs it, and raises `QemuImgError` (with the
command, exit code and stderr) on failure. ``-U`` (force share) is used for
read-only inspection so that an image opened by a running qemu-nbd can still
be looked at.

Encrypted images (an encrypted repository, keystore.py): every QCOW2 of such
a repository is LUKS-encrypted (``encrypt.format=luks``, AES-256-XTS, qemu
7.2's qcow2 driver) with the repository's passphrase, an `ImageKey`. Every
function here takes ``key=``; with a key:

- the passphrase reaches qemu-img/qemu-nbd as ``--object
  secret,id=sec0,file=<path>,format=raw``: ``<path>`` is a mode 0600 file in a
  private (0700) temporary folder, preferably on tmpfs, removed as soon as the
  command ends (`secret_file`). The passphrase is never in argv, so never in
  /proc/<pid>/cmdline nor in a logged command line.
- images are named by ``--image-opts`` (`image_spec`): ``driver=qcow2,
  file.filename=<path>,encrypt.key-secret=sec0`` plus
  ``backing.encrypt.key-secret=sec0``, ``backing.backing.encrypt...`` for
  each layer below: qemu opens backing files implicitly and each needs its
  secret, one option per depth (qemu 7.2 refuses an option for a layer that
  does not exist, and accepts a key-secret on a layer that is not encrypted).
  The depth comes from ``qemu-img info --backing-chain``, which reads the
  headers without the key.
- ``qemu-img info`` needs no key (headers are not encrypted); ``rebase -u``
  does (qemu opens the image to write its header).

LUKS needs a passphrase, not raw key bytes (qemu: "Data from secret sec0 is
not valid UTF-8"): the passphrase is the base64 text of the repository's
256-bit data key. Its PBKDF2 stretching (``encrypt.iter-time``) protects weak
passphrases only; ours has 256 bits of entropy, so the iteration time is
set to `LUKS_ITER_TIME_MS` instead of qemu's default 2 s, which every open of
every layer of a chain would pay again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sendense.core.errors import Cancelled, QemuImgError

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"

# The id of the secret object in every keyed command line.
SECRET_ID = "sec0"
# LUKS key slot PBKDF2 time (ms) when creating an image: see the module docstring.
LUKS_ITER_TIME_MS = 10
# qemu-img create of a LUKS image fails "Unable to get accurate CPU usage" when
# its first PBKDF2 round (about 3 ms) reads 0 ms of thread CPU time. Where the
# kernel samples thread time in 4 ms ticks (getrusage on this kind of VM) that
# is 28 of 100 creates on a quiet machine, more under load: five attempts
# failed once in a full CI run. Forty make it about 0.5**40.
LUKS_CREATE_ATTEMPTS = 40
# What an encrypted image is made with (qemu 7.2 ``qemu-img create -f qcow2 -o help``).
LUKS_OPTIONS = {
    "encrypt.format": "luks",
    "encrypt.cipher-alg": "aes-256",
    "encrypt.cipher-mode": "xts",
    "encrypt.ivgen-alg": "plain64",
    "encrypt.hash-alg": "sha256",
    "encrypt.iter-time": str(LUKS_ITER_TIME_MS),
    "encrypt.key-secret": SECRET_ID,
}


@dataclass(frozen=True, repr=False)
class ImageKey:
    """The LUKS passphrase of an encrypted repository's images (ASCII).
    Never shown: its repr is a placeholder, so a log line or a traceback
    printing it leaks nothing."""

    passphrase: bytes

    def __repr__(self) -> str:
        return "ImageKey(***)"

    __str__ = __repr__


def _secret_parent() -> str | None:
    """tmpfs when there is one: the passphrase never reaches a disk."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


@contextlib.contextmanager
def secret_file(key: ImageKey) -> Iterator[str]:
    """A file holding ``key``'s passphrase (mode 0600, in a fresh 0700
    folder), removed with its folder when the block ends."""
    folder = tempfile.mkdtemp(prefix="sendense-key-", dir=_secret_parent())
    path = os.path.join(folder, "key")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key.passphrase)
        finally:
            os.close(fd)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _opt(value: str) -> str:
    """A value inside a QEMU option string: commas are doubled."""
    return value.replace(",", ",,")


def secret_args(path: str) -> list[str]:
    """``--object secret,...`` reading the passphrase from ``path``."""
    return ["--object", f"secret,id={SECRET_ID},file={_opt(path)},format=raw"]


def chain_depth(path: str) -> int:
    """Images in ``path``'s chain, itself included (headers only: no key)."""
    return len(info(path, backing_chain=True))


def image_spec(path: str, *, depth: int | None = None) -> str:
    """The ``--image-opts`` spec of an encrypted QCOW2 and its backing chain."""
    if depth is None:
        depth = chain_depth(path)
    opts = ["driver=qcow2", f"file.filename={_opt(path)}"]
    opts += [f"{'backing.' * level}encrypt.key-secret={SECRET_ID}" for level in range(depth)]
    return ",".join(opts)


def plain_spec(path: str) -> str:
    """An unencrypted file in a command that uses ``--image-opts`` (format probed)."""
    return f"file.filename={_opt(path)}"


@contextlib.contextmanager
def keyed(key: ImageKey | None) -> Iterator[list[str]]:
    """The ``--object`` arguments for ``key`` (none without a key), valid
    while the block runs."""
    if key is None:
        yield []
        return
    with secret_file(key) as path:
        yield secret_args(path)


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
    key: ImageKey | None = None,
) -> None:
    """Create an image. ``backing`` is written as given (use a relative path).

    ``key``: a LUKS-encrypted QCOW2. Its backing file is then not opened
    (``-u``: qemu-img create cannot give a backing file its secret), so
    ``size`` is needed."""
    options: dict[str, str] = dict(extra_options or {})
    if cluster_size is not None:
        options["cluster_size"] = str(cluster_size)
    args = ["create", "-q", "-f", fmt]
    if key is not None:
        if fmt != "qcow2" or size is None:
            raise ValueError("an encrypted image is a qcow2 of a given size")
        options.update(LUKS_OPTIONS)
        if backing is not None:
            args.append("-u")
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    if options:
        args += ["-o", ",".join(f"{k}={_opt(v)}" for k, v in options.items())]
    args.append(path)
    if size is not None:
        args.append(str(size))
    if key is None:
        run(args)
        return
    with keyed(key) as obj:
        for attempt in range(LUKS_CREATE_ATTEMPTS):
            try:
                run([args[0], *obj, *args[1:]])
                return
            except QemuImgError as e:
                # qemu 7.2 crypto/pbkdf.c times a first PBKDF2 round by the
                # thread's CPU time in whole ms and gives up when it reads 0
                # ("Unable to get accurate CPU usage"): a coarse clock, not a
                # fault. Another try measures again.
                if "accurate CPU usage" not in e.stderr or attempt == LUKS_CREATE_ATTEMPTS - 1:
                    raise
                log.debug("luks create attempt=%d coarse cpu clock, again", attempt + 1)


def info(path: str, *, backing_chain: bool = False) -> Any:
    args = ["info", "-U", "--output=json"]
    if backing_chain:
        args.append("--backing-chain")
    return json.loads(run([*args, path]))


def check(path: str, *, allow_leaks: bool = False, key: ImageKey | None = None) -> dict[str, Any]:
    """``qemu-img check``; raises on corruption (exit code 2) and, unless
    ``allow_leaks``, on leaked clusters (3: wasted space, reads unaffected)."""
    with keyed(key) as obj:
        image = ["--image-opts", image_spec(path)] if key else [path]
        full = [QEMU_IMG, "check", *obj, "--output=json", *image]
        proc = subprocess.run(full, capture_output=True, text=True, check=False)
    if proc.returncode not in ((0, 3) if allow_leaks else (0,)):
        raise QemuImgError(full, proc.returncode, proc.stderr or proc.stdout)
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def repair_leaks(path: str, *, key: ImageKey | None = None) -> None:
    """``qemu-img check -r leaks``: free clusters nothing references (what a
    write interrupted mid-way leaves). Touches refcounts only, never data."""
    with keyed(key) as obj:
        image = ["--image-opts", image_spec(path)] if key else [path]
        run(["check", *obj, "-r", "leaks", "--output=json", *image])


def compare(a: str, b: str, *, strict: bool = False, key: ImageKey | None = None) -> bool:
    """True when both images read the same (exit 0), False when they differ (1).

    ``key``: ``a`` is an encrypted QCOW2 (with its chain); ``b`` then is a
    plain file (its format probed), not a URL."""
    with keyed(key) as obj:
        images = ["--image-opts", image_spec(a), plain_spec(b)] if key else [a, b]
        cmd = [QEMU_IMG, "compare", *obj, "-U", *(["-s"] if strict else []), *images]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return True
    if proc.returncode == 1:
        return False
    raise QemuImgError(cmd, proc.returncode, proc.stderr)


def map_extents(path: str, *, key: ImageKey | None = None) -> list[dict[str, Any]]:
    with keyed(key) as obj:
        image = ["--image-opts", image_spec(path)] if key else [path]
        extents: list[dict[str, Any]] = json.loads(
            run(["map", *obj, "-U", "--output=json", *image])
        )
    return extents


def source_args(src: str, *, src_fmt: str | None = None, key: ImageKey | None = None) -> list[str]:
    """The source image of a ``convert`` (or ``measure``): ``-f fmt src``, or
    with ``key`` ``--image-opts <spec>``. Use inside `keyed`."""
    if key is not None:
        return ["--image-opts", image_spec(src)]
    return [*(["-f", src_fmt] if src_fmt else []), src]


def convert(
    src: str,
    dst: str,
    *,
    src_fmt: str | None = None,
    dst_fmt: str = "qcow2",
    key: ImageKey | None = None,
) -> None:
    """``qemu-img convert``; ``key`` decrypts the source (the output is plain)."""
    with keyed(key) as obj:
        run(
            ["convert", *obj, "-U", *source_args(src, src_fmt=src_fmt, key=key), "-O", dst_fmt, dst]
        )


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
    key: ImageKey | None = None,
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
    if key is not None:
        # qemu 7.2 finds -b by file name, and an image opened with a secret is
        # named json:{...}: never found. storage/chain.py merges layer by layer.
        raise ValueError("commit -b cannot name an image of an encrypted chain")
    with keyed(key) as obj:
        args = ["commit", *obj, "-p", "-b", base]
        if rate_limit:
            args += ["-r", str(rate_limit)]
        image = ["--image-opts", image_spec(top)] if key else [top]
        run_with_progress([*args, *image], on_progress, die_with_parent=die_with_parent)


def commit_into_backing(
    top: str,
    *,
    rate_limit: int | None = None,
    on_progress: Callable[[float], None] | None = None,
    die_with_parent: bool = True,
    key: ImageKey | None = None,
) -> None:
    """``qemu-img commit -d top``: write ``top``'s own clusters into its
    backing file; ``top`` keeps them (``-d``). Same locks and
    ``die_with_parent`` as `commit`."""
    with keyed(key) as obj:
        args = ["commit", *obj, "-p", "-d"]
        if rate_limit:
            args += ["-r", str(rate_limit)]
        image = ["--image-opts", image_spec(top)] if key else [top]
        run_with_progress([*args, *image], on_progress, die_with_parent=die_with_parent)


def rebase(
    path: str,
    backing: str,
    *,
    backing_fmt: str = "qcow2",
    unsafe: bool = True,
    key: ImageKey | None = None,
) -> None:
    """Change ``path``'s backing file. ``unsafe`` (``-u``) only rewrites the
    header (the caller guarantees the new backing reads the same); ``""``
    removes the backing file. With ``key`` only ``unsafe`` is offered (a safe
    rebase would open the new backing, which qemu-img cannot give a secret)."""
    if key is not None and not unsafe:
        raise ValueError("an encrypted image is only rebased with -u")
    with keyed(key) as obj:
        args = ["rebase", *obj, "-q"]
        if unsafe:
            args.append("-u")
        args += ["-b", backing]
        if backing:
            args += ["-F", backing_fmt]
        # -u opens the image alone (no backing), so one secret is enough.
        image = ["--image-opts", image_spec(path, depth=1)] if key else [path]
        run([*args, *image])


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
