"""The key store of encrypted repositories.

Each encrypted repository has a random 256-bit *data key*. Its images are
LUKS-encrypted QCOW2 (qemu/img.py) whose passphrase is the data key's base64
text (`ImageKey`). The catalog holds the data key only *wrapped*: encrypted
with the hub's *master key*, a file outside the catalog (setting
``master_key_file``, default ``<data_dir>/master.key``, mode 0600, made when
the first encrypted repository is created).

Formats::

    master key file    base64 of 32 random bytes, one line
    repository_keys.wrapped_key
                       "v1:" + base64(nonce[12] || AES-256-GCM(master key,
                       nonce, data key, aad="sendense-repository-key/" + repository id))
    repository_keys.key_id
                       id of the master key that wrapped it: the first 16 hex
                       digits of sha256("sendense-master-key/" + master key)

The additional data binds a wrapped key to its repository: a row copied onto
another repository does not unwrap. ``key_id`` tells a wrong master key
(another hub's, a re-generated one) from a damaged row.

Losing the master key file makes every encrypted repository unreadable: keep
a copy on other storage than the repositories and the catalog backups, or
export each repository's key (``sendense repo export-key``).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sendense.catalog.db import Database
from sendense.catalog.models import Backup, Repository, RepositoryKey
from sendense.core.errors import InvalidRequest, Unavailable
from sendense.qemu.img import ImageKey
from sendense.settings import HubSettings

log = logging.getLogger(__name__)

KEY_BYTES = 32
WRAP_VERSION = "v1"


class MasterKeyUnavailable(Unavailable):
    """The master key file is missing, unreadable, or not the key that
    wrapped a repository's data key: that repository's backups can be
    neither read nor written (503)."""

    code = "master_key_unavailable"


def master_key_id(master: bytes) -> str:
    return hashlib.sha256(b"sendense-master-key/" + master).hexdigest()[:16]


def _aad(repository_id: str) -> bytes:
    return b"sendense-repository-key/" + repository_id.encode()


def passphrase_of(data_key: bytes) -> bytes:
    """The LUKS passphrase of a data key (what `export` writes, what qemu reads)."""
    return base64.b64encode(data_key)


def data_key_of_passphrase(passphrase: str) -> bytes:
    """The data key of an exported passphrase (`passphrase_of`'s inverse)."""
    try:
        data_key = base64.b64decode(passphrase.strip(), validate=True)
    except ValueError:
        data_key = b""
    if len(data_key) != KEY_BYTES:
        raise InvalidRequest(
            "encryption_key is not a repository key (the base64 text of "
            f"{KEY_BYTES} bytes that `sendense repo export-key` writes)",
            field="encryption_key",
        )
    return data_key


class KeyStore:
    def __init__(self, master_key_file: Path) -> None:
        self.path = master_key_file

    # -- the master key ------------------------------------------------------

    def _read_master(self) -> bytes:
        try:
            text = self.path.read_bytes().strip()
        except FileNotFoundError:
            raise MasterKeyUnavailable(
                f"the master key file {self.path} is missing: encrypted repositories cannot be "
                "read or written without it (put the file back from its copy; see "
                "docs/security.md)",
                path=str(self.path),
            ) from None
        except OSError as e:
            raise MasterKeyUnavailable(
                f"the master key file {self.path} cannot be read: {e.strerror}",
                path=str(self.path),
            ) from None
        try:
            master = base64.b64decode(text, validate=True)
        except ValueError:
            master = b""
        if len(master) != KEY_BYTES:
            raise MasterKeyUnavailable(
                f"the master key file {self.path} does not hold a master key "
                f"(base64 of {KEY_BYTES} bytes)",
                path=str(self.path),
            )
        return master

    def _master_for_new_key(self, s: Session) -> bytes:
        """The master key; made (0600) if there is none and no key needs one yet."""
        if not self.path.exists():
            wrapped = s.scalar(select(func.count()).select_from(RepositoryKey)) or 0
            if wrapped:
                # Making a new one would hide that the old one is gone.
                return self._read_master()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another hub process made it meanwhile
                return self._read_master()
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n")
                f.flush()
                os.fsync(f.fileno())
            log.warning(
                "master key created path=%s: keep a copy apart from the repositories and "
                "the catalog; without it encrypted backups are unreadable",
                self.path,
            )
        return self._read_master()

    # -- data keys -----------------------------------------------------------

    def add_key(
        self, s: Session, repository_id: str, *, data_key: bytes | None = None
    ) -> RepositoryKey:
        """A data key for ``repository_id`` (new, or ``data_key``: one imported
        from an export), wrapped, added to the session."""
        master = self._master_for_new_key(s)
        if data_key is None:
            data_key = secrets.token_bytes(KEY_BYTES)
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(master).encrypt(nonce, data_key, _aad(repository_id))
        row = RepositoryKey(
            repository_id=repository_id,
            key_id=master_key_id(master),
            wrapped_key=f"{WRAP_VERSION}:{base64.b64encode(nonce + sealed).decode()}",
        )
        s.add(row)
        return row

    def data_key(self, s: Session, repository_id: str) -> bytes:
        row = s.get(RepositoryKey, repository_id)
        if row is None:
            raise MasterKeyUnavailable(
                f"repository {repository_id} is encrypted but the catalog has no key for it",
                repository_id=repository_id,
            )
        master = self._read_master()
        if row.key_id != master_key_id(master):
            raise MasterKeyUnavailable(
                f"the key of repository {repository_id} was wrapped with master key "
                f"{row.key_id}; the file {self.path} holds master key {master_key_id(master)} "
                "(another hub's, or a new one): put the right file back",
                repository_id=repository_id,
                path=str(self.path),
            )
        version, _, blob = row.wrapped_key.partition(":")
        try:
            raw = base64.b64decode(blob, validate=True)
            if version != WRAP_VERSION:
                raise ValueError(version)
            data_key = AESGCM(master).decrypt(raw[:12], raw[12:], _aad(repository_id))
        except (ValueError, InvalidTag):
            raise MasterKeyUnavailable(
                f"the wrapped key of repository {repository_id} does not open with the master "
                "key (damaged catalog row?)",
                repository_id=repository_id,
            ) from None
        return data_key

    def image_key(self, s: Session, repo: Repository | None) -> ImageKey | None:
        """The key of ``repo``'s images; None for a plain repository."""
        if repo is None or not repo.encrypted:
            return None
        return ImageKey(passphrase_of(self.data_key(s, repo.id)))

    def image_key_of(self, s: Session, repository_id: str | None) -> ImageKey | None:
        if repository_id is None:
            return None
        return self.image_key(s, s.get(Repository, repository_id))


def from_settings(settings: HubSettings) -> KeyStore:
    return KeyStore(settings.master_key_path)


def key_of_repository(
    s: Session, settings: HubSettings, repo: Repository | str | None
) -> ImageKey | None:
    """The key of a repository's images (a row or an id); None, without
    looking for the master key, when it is not encrypted."""
    if isinstance(repo, str):
        repo = s.get(Repository, repo)
    if repo is None or not repo.encrypted:
        return None
    return from_settings(settings).image_key(s, repo)


def key_of_backup_now(
    db: Database, settings: HubSettings, backup_id: str | None
) -> ImageKey | None:
    """`key_of_backup` in a short session of its own."""
    with db.session() as s:
        return key_of_backup(s, settings, backup_id)


def key_of_backup(s: Session, settings: HubSettings, backup_id: str | None) -> ImageKey | None:
    """The key of a restore point's images; None (without looking for the
    master key) when its repository is not encrypted."""
    if backup_id is None:
        return None
    repo = s.scalar(
        select(Repository)
        .join(Backup, Backup.repository_id == Repository.id)
        .where(Backup.id == backup_id)
    )
    if repo is None or not repo.encrypted:
        return None
    return from_settings(settings).image_key(s, repo)
