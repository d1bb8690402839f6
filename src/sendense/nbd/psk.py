"""TLS pre-shared keys for NBD (TLS-PSK, RFC 4279 as GnuTLS implements it).

Every NBD target the hub serves to a node, and every export it serves beyond
loopback, has a key of its own: 32 random bytes, written as 64 hex digits.
Both ends read it from a file in GnuTLS's ``psktool`` format, one line per
user::

    <username>:<key as hex>\\n

qemu-nbd reads ``<dir>/keys.psk`` of its ``tls-creds-psk`` object (qemu
7.2 crypto/tlscredspsk.c; GnuTLS opens the file again at each handshake, so
it must exist for as long as the server runs); libnbd reads the file given
to ``nbd_set_tls_psk_file`` and looks up the name set by
``nbd_set_tls_username``. A key file is created with ``O_EXCL`` and mode
0600 (never widened by the umask, never an existing file reused) and is
removed when its server or job ends. Keys are never logged and never stored
in the catalog.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
from pathlib import Path

import nbd

# The TLS-PSK identity; sent in clear during the handshake, so it names no
# job or disk. The key is what authenticates.
USERNAME = "sendense"
KEY_BYTES = 32
# What qemu's tls-creds-psk reads in its ``dir``.
SERVER_FILE = "keys.psk"
HEX_KEY = re.compile(r"^[0-9a-f]{32,256}$")


def new_key() -> str:
    """A fresh key, as hex (what psktool writes)."""
    return secrets.token_hex(KEY_BYTES)


def write_key_file(path: Path, username: str, key: str) -> Path:
    """Write ``username:key`` to a new file of mode 0600 (fails if it exists)."""
    if not HEX_KEY.match(key) or ":" in username or "\n" in username:
        raise ValueError("a PSK is hex and a PSK username has no ':' or newline")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, f"{username}:{key}\n".encode())
    finally:
        os.close(fd)
    return path


def make_server_dir(path: Path, key: str, username: str = USERNAME) -> Path:
    """A new directory (0700) holding ``keys.psk`` for qemu-nbd's tls-creds-psk."""
    path.mkdir(mode=0o700)
    write_key_file(path / SERVER_FILE, username, key)
    return path


def remove_dir(path: Path) -> None:
    """Remove a key directory made by `make_server_dir` (absent: nothing to do)."""
    with contextlib.suppress(FileNotFoundError):
        (path / SERVER_FILE).unlink()
    shutil.rmtree(path, ignore_errors=True)


def use_key_file(h: nbd.NBD, path: str | Path, username: str = USERNAME) -> None:
    """Make a libnbd handle (not yet connected) require TLS with this key file.

    TLS_REQUIRE: a server that does not offer TLS is refused, the connection
    never falls back to plain text.
    """
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_username(username)
    h.set_tls_psk_file(str(path))


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: may resolve to anything
        return False


def qemu_object(object_id: str, directory: str) -> str:
    """``--object`` value of a server-side PSK credential reading ``directory``.

    A comma in a QemuOpts value is written doubled (qemu-options(7)).
    """
    return f"tls-creds-psk,id={object_id},endpoint=server,dir={directory.replace(',', ',,')}"
