"""Where a repository's folder lives: a local directory, or an NFS or CIFS share.

Knows paths, mounts and free space; nothing of backups or the catalog. The
hub's repository rules (``engine/inventory.py``) call it.

Three types: `check` makes sure a folder is usable (it exists, is the right
kind of filesystem, the hub can write it); `mount` / `unmount` handle the
shares the hub mounts itself.

- ``local``: an absolute path; created when missing (mode 0700, the hub's
  data is nobody else's), must be a directory the hub can write (a probe
  file is created and removed).
- ``nfs`` / ``cifs``, two ways:

  1. **mounted by the administrator** (fstab, autofs, systemd): ``path`` is
     where the share is mounted and ``config`` is empty. The hub checks that
     ``path`` is a mount point of that filesystem type in
     ``/proc/self/mountinfo`` (nfs: ``nfs``/``nfs4``; cifs: ``cifs``/``smb3``),
     then that it can write there.
  2. **mounted by the hub** (needs root): ``config`` holds
     ``{"server", "export"}`` (nfs) or ``{"server", "share", "username"?,
     "password"?, "domain"?}`` (cifs), plus ``"options"?`` (a mount option
     string, ``vers=4.2,hard``). The hub runs ``mount -t nfs
     server:/export path`` or ``mount -t cifs //server/share path`` at
     creation and at every start. A CIFS password never appears in an argv
     (it would show in ``ps``): it goes into a credentials file of mode 0600
     (``credentials=FILE``) that is removed once ``mount`` returns.

Every field that reaches ``mount``'s argv or the credentials file is checked
first (`validate_config`): a hostname or an IP address for ``server``, an
absolute path for ``export``, no commas, spaces, newlines or control
characters where they would split options or lines, and no credential in
``options`` (use the fields: the password must stay out of argv).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sendense.core.errors import InvalidRequest

log = logging.getLogger(__name__)

TYPES = ("local", "nfs", "cifs")
# Filesystem types in /proc/self/mountinfo that count as each repository type.
FSTYPES = {"nfs": ("nfs", "nfs4"), "cifs": ("cifs", "smb3")}
CONFIG_KEYS = {
    "local": set(),
    "nfs": {"server", "export", "options"},
    "cifs": {"server", "share", "options", "username", "password", "domain"},
}
# Options that would carry a credential or change how credentials are read:
# they must come through the fields (the password into a 0600 file).
CREDENTIAL_OPTIONS = {"credentials", "password", "pass", "password2", "user", "username", "domain"}
MOUNT_TIMEOUT = 60.0

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_OPTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*(=[A-Za-z0-9_.:/@+-]*)?$")
_EXPORT = re.compile(r"^/[A-Za-z0-9_.@+/-]*$")
_SHARE = re.compile(r"^[A-Za-z0-9_.$-][A-Za-z0-9_.$ -]*(/[A-Za-z0-9_.$ -]+)*$")
_ACCOUNT = re.compile(r"^[A-Za-z0-9_.@-]{1,256}$")


@dataclass(frozen=True)
class Capacity:
    """Space of the filesystem holding a repository, in bytes.

    ``available_bytes`` is what the hub can still write (``f_bavail``: blocks
    reserved for root are not counted, as ``df`` shows them).
    """

    total_bytes: int
    used_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (proc(5))."""

    mount_point: str
    fstype: str
    source: str
    options: str


def capacity(path: str | Path) -> Capacity | None:
    """The space of the filesystem at ``path``; None when it cannot be read."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    total = st.f_blocks * st.f_frsize
    return Capacity(
        total_bytes=total,
        used_bytes=total - st.f_bfree * st.f_frsize,
        available_bytes=st.f_bavail * st.f_frsize,
    )


# ------------------------------------------------------------------ mounts


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: str | Path = "/proc/self/mountinfo") -> list[MountEntry]:
    """The mount table in order (a later mount on the same point hides earlier ones)."""
    out = []
    for line in Path(mountinfo).read_text().splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 2:
            continue
        out.append(
            MountEntry(
                mount_point=_unescape(fields[4]),
                fstype=tail[0],
                source=_unescape(tail[1]),
                options=tail[2] if len(tail) > 2 else "",
            )
        )
    return out


def mount_at(path: str | Path, mountinfo: str | Path = "/proc/self/mountinfo") -> MountEntry | None:
    """The filesystem mounted exactly at ``path`` (the top one), or None."""
    real = os.path.realpath(path)
    found = None
    for m in mounts(mountinfo):
        if m.mount_point == real:
            found = m
    return found


def is_mounted(kind: str, path: str | Path) -> bool:
    """``path`` is a mount point of ``kind``'s filesystem type."""
    entry = mount_at(path)
    return entry is not None and entry.fstype in FSTYPES[kind]


def check_mounted(kind: str, path: Path) -> MountEntry:
    """``path`` must be a mount point of ``kind``'s filesystem type."""
    entry = mount_at(path)
    wanted = FSTYPES[kind]
    if entry is None:
        raise InvalidRequest(
            f"path {path} is not an {kind} mount (not a mount point); mount the share there "
            "first, or give config with the server and "
            f"{'export' if kind == 'nfs' else 'share'} for the hub to mount it",
            fields=["path"],
        )
    if entry.fstype not in wanted:
        raise InvalidRequest(
            f"path {path} is a {entry.fstype} mount, not an {kind} mount "
            f"(expected filesystem type {' or '.join(wanted)})",
            fields=["path"],
        )
    return entry


# -------------------------------------------------------------- validation


def check_path(path: str) -> Path:
    if not path.startswith("/"):
        raise InvalidRequest(f"path must be absolute, got {path!r}", fields=["path"])
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise InvalidRequest("path must not contain control characters", fields=["path"])
    parts = Path(path).parts
    if ".." in parts:
        raise InvalidRequest("path must not contain '..'", fields=["path"])
    return Path(os.path.normpath(path))


def _bad(field: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"config.{field} {why}", fields=[f"config.{field}"])


def _text(config: dict[str, Any], key: str, *, required: bool) -> str | None:
    value = config.get(key)
    if value is None:
        if required:
            raise InvalidRequest(f"config.{key} is required", fields=[f"config.{key}"])
        return None
    if not isinstance(value, str):
        raise _bad(key, "must be a string")
    return value


def check_server(value: str) -> str:
    try:
        ipaddress.ip_address(value.strip("[]"))
        return value.strip("[]")
    except ValueError:
        pass
    name = value.removesuffix(".")
    if not name or len(name) > 253 or not all(_LABEL.match(x) for x in name.split(".")):
        raise _bad("server", f"must be a hostname or an IP address, got {value[:100]!r}")
    return name


def check_options(value: str) -> str:
    """A comma-separated list of ``key`` or ``key=value``, nothing else."""
    if not value:
        return ""
    for item in value.split(","):
        if not _OPTION.match(item):
            raise _bad(
                "options",
                f"has an invalid option {item[:60]!r} (expected key or key=value, "
                "letters, digits and _ . : / @ + - only; no spaces or newlines)",
            )
        key = item.partition("=")[0].lower()
        if key in CREDENTIAL_OPTIONS:
            raise _bad(
                "options",
                f"must not set {key}: give credentials as config.username / config.password "
                "(the hub passes them in a file, never on a command line)",
            )
    return value


def validate_config(kind: str, config: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Check a repository's ``config``: (what is stored in clear, the password).

    An empty config for nfs/cifs means "already mounted at path".
    """
    if kind not in TYPES:
        raise InvalidRequest(f"type must be one of {', '.join(TYPES)}", fields=["type"])
    unknown = sorted(set(config) - CONFIG_KEYS[kind])
    if unknown:
        allowed = ", ".join(sorted(CONFIG_KEYS[kind])) or "nothing"
        raise InvalidRequest(
            f"config.{unknown[0]} is not a setting of a {kind} repository (allowed: {allowed})",
            fields=[f"config.{k}" for k in unknown],
        )
    if kind == "local" or not config:
        return {}, None
    public: dict[str, Any] = {}
    server = _text(config, "server", required=True)
    assert server is not None
    public["server"] = check_server(server)
    if kind == "nfs":
        export = _text(config, "export", required=True)
        assert export is not None
        if not export.startswith("/"):
            raise _bad("export", f"must be an absolute path starting with '/', got {export!r}")
        if not _EXPORT.match(export) or ".." in export.split("/"):
            raise _bad("export", "may only use letters, digits and _ . @ + - / (no spaces, commas)")
        public["export"] = export
    else:
        share = _text(config, "share", required=True)
        assert share is not None
        share = share.strip("/")
        if not share or not _SHARE.match(share) or ".." in share.split("/"):
            raise _bad(
                "share",
                "must be a share name (and optional folder: share/dir), letters, digits, "
                "spaces and _ . $ - only",
            )
        public["share"] = share
        for key in ("username", "domain"):
            value = _text(config, key, required=False)
            if value is not None:
                if not _ACCOUNT.match(value):
                    raise _bad(key, "may only use letters, digits and _ . @ -")
                public[key] = value
    options = _text(config, "options", required=False)
    if options:
        public["options"] = check_options(options)
    password = _text(config, "password", required=False) if kind == "cifs" else None
    if password is not None:
        # The credentials file is line based: a newline would add a line.
        if not password or any(c in password for c in "\r\n\0"):
            raise _bad("password", "must be non-empty and on one line (no newline or NUL)")
        if "username" not in public:
            raise InvalidRequest(
                "config.username is required with config.password", fields=["config.username"]
            )
    return public, password


def hub_mounted(kind: str, config: dict[str, Any]) -> bool:
    """True when the hub mounts the share itself (``config`` names the server)."""
    return kind in FSTYPES and bool(config.get("server"))


# ------------------------------------------------------------------- checks


def prepare_local(path: Path) -> None:
    """Create the folder (owner only) when missing; it must then be a directory."""
    if path.exists() and not path.is_dir():
        raise InvalidRequest(f"path {path} exists and is not a directory", fields=["path"])
    if not path.exists():
        try:
            path.mkdir(parents=True, mode=0o700)
        except OSError as e:
            raise InvalidRequest(f"cannot create {path}: {e.strerror}", fields=["path"]) from e


def check_writable(path: Path) -> None:
    """Create and remove a probe file: the hub must be able to write there."""
    if not path.is_dir():
        raise InvalidRequest(f"path {path} is not a directory", fields=["path"])
    try:
        fd, probe = tempfile.mkstemp(prefix=".sendense-write-probe-", dir=path)
        try:
            os.write(fd, b"sendense")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise InvalidRequest(
            f"the hub cannot write in {path}: {e.strerror}", fields=["path"]
        ) from e


def check(kind: str, path: Path, config: dict[str, Any]) -> None:
    """``path`` is usable now for a repository of ``kind`` (mounted first if the hub mounts it)."""
    if kind == "local":
        prepare_local(path)
    else:
        check_mounted(kind, path)
    check_writable(path)


# ----------------------------------------------------------------- mounting


class MountFailed(InvalidRequest):
    code = "mount_failed"


def mount_argv(kind: str, path: Path, config: dict[str, Any], credentials: str | None) -> list[str]:
    """The ``mount`` command for a share (no password in it: see `mount`)."""
    options = [o for o in (config.get("options") or "").split(",") if o]
    if kind == "nfs":
        source = f"{config['server']}:{config['export']}"
    else:
        server = config["server"]
        if ":" in server:  # IPv6 in a UNC name
            server = f"[{server}]"
        source = f"//{server}/{config['share']}"
        if credentials is not None:
            options.insert(0, f"credentials={credentials}")
        elif "guest" not in options:
            options.insert(0, "guest")
    argv = ["mount", "-t", kind]
    if options:
        argv += ["-o", ",".join(options)]
    return [*argv, "--", source, str(path)]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=MOUNT_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def mount(
    kind: str,
    path: Path,
    config: dict[str, Any],
    password: str | None,
    *,
    run_dir: Path,
) -> MountEntry:
    """Mount the share at ``path`` (created when missing) unless it already is.

    Needs root (``mount``). A CIFS password is written to a credentials file
    (mode 0600, in ``run_dir``, removed afterwards): never in an argv.
    """
    entry = mount_at(path)
    if entry is not None and entry.fstype in FSTYPES[kind]:
        return entry
    if os.geteuid() != 0:
        raise MountFailed(
            f"mounting {kind} shares needs the hub to run as root; mount it at {path} "
            "yourself and create the repository with path only",
            fields=["config"],
        )
    if shutil.which("mount") is None:
        raise MountFailed("the mount command is missing on the hub", fields=["config"])
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    cred_file: str | None = None
    try:
        if kind == "cifs" and config.get("username"):
            run_dir.mkdir(parents=True, exist_ok=True)
            fd, cred_file = tempfile.mkstemp(prefix="cifs-", suffix=".cred", dir=run_dir)
            os.fchmod(fd, 0o600)
            lines = [f"username={config['username']}"]
            if password is not None:
                lines.append(f"password={password}")
            if config.get("domain"):
                lines.append(f"domain={config['domain']}")
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines) + "\n")
        argv = mount_argv(kind, path, config, cred_file)
        log.info("mount type=%s source=%s path=%s", kind, argv[-2], path)
        try:
            proc = _run(argv)
        except subprocess.TimeoutExpired as e:
            raise MountFailed(
                f"mount of {argv[-2]} at {path} did not finish within {MOUNT_TIMEOUT:g}s",
                fields=["config"],
            ) from e
    finally:
        if cred_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cred_file)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-500:]
        if password:
            detail = detail.replace(password, "***")
        raise MountFailed(
            f"mount of {argv[-2]} at {path} failed (exit {proc.returncode}): {detail}",
            fields=["config"],
        )
    entry = mount_at(path)
    if entry is None or entry.fstype not in FSTYPES[kind]:
        raise MountFailed(f"mount of {argv[-2]} at {path} left no {kind} mount there")
    return entry


def unmount(path: Path) -> None:
    """Unmount ``path`` if something is mounted there (logged, never raised)."""
    if mount_at(path) is None:
        return
    try:
        proc = _run(["umount", "--", str(path)])
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("umount path=%s failed: %s", path, e)
        return
    if proc.returncode != 0:
        log.warning("umount path=%s failed: %s", path, proc.stderr.strip())
