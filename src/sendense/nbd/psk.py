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
DH_FILE = "dh-params.pem"
# The RFC 7919 ffdhe2048 group (public). Without a dh-params.pem in its dir,
# qemu 7.2 generates 2048-bit DH parameters at every start (crypto/tlscreds.c,
# gnutls_dh_params_generate2): measured here, qemu-nbd took 0.1-0.75 s
# (median 0.23 s) to serve instead of 0.03 s. ECDHE-PSK is what gets
# negotiated; the group is only the DHE-PSK fallback.
FFDHE2048 = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""
# GnuTLS priority of the servers (qemu appends its PSK key exchanges). With
# GnuTLS 3.7.9 / nettle 3.8.1 (Debian 12) both ends agreed on
# CHACHA20-POLY1305, and a 512 MiB copy into a TLS target took 8-10 s
# against 1.8 s with AES-GCM (AES-NI): ChaCha20 is left out, so AES-GCM is
# chosen. Any TLS 1.2/1.3 client (libnbd, qemu) offers AES-GCM.
PRIORITY = "NORMAL:-CHACHA20-POLY1305"
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
    (path / DH_FILE).write_text(FFDHE2048)
    return path


def remove_dir(path: Path) -> None:
    """Remove a key directory made by `make_server_dir` (absent: nothing to do)."""
    with contextlib.suppress(FileNotFoundError):
        (path / SERVER_FILE).unlink()  # the key first, whatever else fails
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
    return (
        f"tls-creds-psk,id={object_id},endpoint=server,dir={directory.replace(',', ',,')},"
        f"priority={PRIORITY}"
    )
