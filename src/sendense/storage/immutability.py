"""The immutable attribute (``chattr +i``) on a restore point's files.

A file with the attribute cannot be written, renamed, linked or removed, not
even by root, until someone with ``CAP_LINUX_IMMUTABLE`` clears it: the
defence of an immutable repository against a compromised account or a
ransomware run on the hub, beyond the API's own refusal.

Set and read with the ``FS_IOC_GETFLAGS`` / ``FS_IOC_SETFLAGS`` ioctls, as
``chattr`` and ``lsattr`` do (linux/fs.h; the kernel reads and writes an
``int`` although the ioctl numbers say ``long``). ext4, XFS, btrfs and tmpfs
(Linux 6.0 and later) have the attribute; NFS and CIFS do not, and there the
lock lives only in the catalog (the API refuses deletion; the file server's
own snapshots or WORM settings are the storage-side defence).

What is locked: a restore point's image and its sidecar (layout.py). Not the
block hash list of a verify (``.blocks``, rewritten by each verify), not the
folders (new restore points go into the same disk folder).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sendense.storage import layout

log = logging.getLogger(__name__)

# linux/fs.h: _IOR('f', 1, long) and _IOW('f', 2, long) on 64-bit.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
# The filesystem has no such attributes (tmpfs before 6.0, NFS, CIFS, ...).
UNSUPPORTED = (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


@dataclass(frozen=True)
class Support:
    """Whether files in a folder can carry the immutable attribute, and why not."""

    supported: bool
    reason: str


def point_files(qcow2: str | Path) -> list[Path]:
    """The files of a restore point that are locked: image and sidecar."""
    path = Path(qcow2)
    return [path, layout.sidecar_path(path)]


def _flags(fd: int) -> int:
    buf = fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))
    (flags,) = struct.unpack("i", buf[:4])
    return int(flags)


def _open(path: str | Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)


def is_locked(path: str | Path) -> bool:
    """True when ``path`` carries the immutable attribute (False if missing or unsupported)."""
    try:
        fd = _open(path)
    except OSError:
        return False
    try:
        return bool(_flags(fd) & FS_IMMUTABLE_FL)
    except OSError:
        return False
    finally:
        os.close(fd)


def set_locked(path: str | Path, locked: bool) -> bool:
    """Set or clear the attribute; True when it changed.

    Raises `OSError`: ``FileNotFoundError``, ``EPERM`` without
    ``CAP_LINUX_IMMUTABLE``, or one of `UNSUPPORTED` when the filesystem has
    no attributes.
    """
    fd = _open(path)
    try:
        flags = _flags(fd)
        new = flags | FS_IMMUTABLE_FL if locked else flags & ~FS_IMMUTABLE_FL
        if new == flags:
            return False
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", new) + bytes(4))
        return True
    finally:
        os.close(fd)


def lock_point(qcow2: str | Path) -> list[Path]:
    """Lock a restore point's files where the filesystem allows; the files now locked.

    A missing file or a filesystem without the attribute is not an error
    (the catalog's lock still holds); a permission error is logged.
    """
    done = []
    for p in point_files(qcow2):
        try:
            set_locked(p, True)
            done.append(p)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                log.warning("lock path=%s failed: %s", p, e.strerror)
    return done


def unlock_point(qcow2: str | Path) -> list[Path]:
    """Clear the attribute on a restore point's files; the files that had it."""
    done = []
    for p in point_files(qcow2):
        try:
            if set_locked(p, False):
                done.append(p)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                log.warning("unlock path=%s failed: %s", p, e.strerror)
    return done


def locked_files(paths: Iterable[str | Path]) -> list[Path]:
    return [Path(p) for p in paths if is_locked(p)]


def probe(folder: str | Path) -> Support:
    """Try the attribute on a scratch file in ``folder`` (then remove it)."""
    try:
        fd, scratch = tempfile.mkstemp(prefix=".sendense-immutable-probe-", dir=folder)
    except OSError as e:
        return Support(False, f"cannot create a file in {folder}: {e.strerror}")
    os.close(fd)
    try:
        try:
            set_locked(scratch, True)
        except OSError as e:
            if e.errno in UNSUPPORTED:
                return Support(False, f"the filesystem of {folder} has no immutable attribute")
            if e.errno == errno.EPERM:
                return Support(
                    False, "setting the immutable attribute needs root (CAP_LINUX_IMMUTABLE)"
                )
            return Support(False, f"chattr +i failed: {e.strerror}")
        ok = is_locked(scratch)
        with contextlib.suppress(OSError):
            set_locked(scratch, False)
        if not ok:
            return Support(False, f"the filesystem of {folder} ignores the immutable attribute")
        return Support(True, "ok")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(scratch)
