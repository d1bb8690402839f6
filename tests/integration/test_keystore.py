"""Encrypted repositories below the API: the key store (wrapping, master key
file, errors) and qemu-img/qemu-nbd on LUKS-encrypted QCOW2 chains (real
qemu 7.2)."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from pathlib import Path

import nbd
import pytest

from sendense import keystore
from sendense.catalog.db import Database
from sendense.catalog.models import Repository, RepositoryKey
from sendense.core.errors import QemuImgError
from sendense.keystore import KeyStore, MasterKeyUnavailable
from sendense.qemu import img
from sendense.qemu.img import ImageKey
from sendense.qemu.nbd_server import QemuNbdServer
from sendense.storage import chain

MIB = 1 << 20
SIZE = 8 * MIB


def _repo(db: Database, *, encrypted: bool = True) -> str:
    with db.session() as s:
        repo = Repository(name=f"r{os.urandom(3).hex()}", path="/nowhere", encrypted=encrypted)
        s.add(repo)
        s.flush()
        return repo.id


def test_master_key_made_0600_and_key_wrapped(database: Database, tmp_path: Path) -> None:
    ks = KeyStore(tmp_path / "keys" / "master.key")
    repo_id = _repo(database)
    with database.session() as s:
        ks.add_key(s, repo_id)
    assert stat.S_IMODE(os.stat(ks.path).st_mode) == 0o600
    with database.session() as s:
        key = ks.image_key_of(s, repo_id)
        row = s.get(RepositoryKey, repo_id)
        assert row is not None and row.wrapped_key.startswith("v1:")
    assert key is not None
    data_key = base64.b64decode(key.passphrase)
    assert len(data_key) == 32
    # The catalog row holds neither the key nor its passphrase.
    assert key.passphrase.decode() not in row.wrapped_key
    assert data_key.hex() not in row.wrapped_key
    assert "***" in repr(key) and key.passphrase.decode() not in repr(key)
    # A plain repository has no key.
    plain = _repo(database, encrypted=False)
    with database.session() as s:
        assert ks.image_key_of(s, plain) is None


def test_missing_or_wrong_master_key_is_a_clear_error(database: Database, tmp_path: Path) -> None:
    ks = KeyStore(tmp_path / "master.key")
    repo_id = _repo(database)
    with database.session() as s:
        ks.add_key(s, repo_id)
    saved = ks.path.read_bytes()
    ks.path.unlink()
    with database.session() as s, pytest.raises(MasterKeyUnavailable, match="is missing"):
        ks.image_key_of(s, repo_id)
    # A new encrypted repository does not quietly make a new master key while
    # keys wrapped by the lost one exist.
    other = _repo(database)
    with database.session() as s, pytest.raises(MasterKeyUnavailable, match="is missing"):
        ks.add_key(s, other)
    assert not ks.path.exists()
    # Another master key: named as such, not a crash.
    ks.path.write_bytes(base64.b64encode(os.urandom(32)))
    with database.session() as s, pytest.raises(MasterKeyUnavailable, match="wrapped with master"):
        ks.image_key_of(s, repo_id)
    ks.path.write_text("not a key")
    with database.session() as s, pytest.raises(MasterKeyUnavailable, match="does not hold"):
        ks.image_key_of(s, repo_id)
    ks.path.write_bytes(saved)
    with database.session() as s:
        assert ks.image_key_of(s, repo_id) is not None


def test_imported_key_reads_the_same(database: Database, tmp_path: Path) -> None:
    """Disaster recovery: a key exported from one hub, imported on another."""
    first = KeyStore(tmp_path / "a.key")
    repo_a = _repo(database)
    with database.session() as s:
        first.add_key(s, repo_a)
        exported = first.image_key_of(s, repo_a)
    assert exported is not None
    with database.session() as s:  # the old hub's catalog is gone
        s.delete(s.get(RepositoryKey, repo_a))
    second = KeyStore(tmp_path / "b.key")
    repo_b = _repo(database)
    with database.session() as s:
        data_key = keystore.data_key_of_passphrase(exported.passphrase.decode())
        second.add_key(s, repo_b, data_key=data_key)
    with database.session() as s:
        assert second.image_key_of(s, repo_b) == exported


# ---------------------------------------------------------------- qemu-img


def _key() -> ImageKey:
    return ImageKey(base64.b64encode(os.urandom(32)))


def _write(path: Path, key: ImageKey, offset: int, data: bytes, tmp: Path) -> None:
    """Write through qemu-nbd (the way a backup target is written)."""
    sock = str(tmp / "w.sock")
    with QemuNbdServer(str(path), socket_path=sock, key=key) as server:
        h = nbd.NBD()
        h.connect_uri(server.url)
        h.pwrite(data, offset)
        h.flush()
        h.shutdown()


def _read(path: Path, key: ImageKey, offset: int, length: int, tmp: Path) -> bytes:
    sock = str(tmp / "r.sock")
    with QemuNbdServer(str(path), socket_path=sock, read_only=True, key=key) as server:
        h = nbd.NBD()
        h.connect_uri(server.url)
        # LUKS sectors are 512 bytes: qemu-nbd advertises that minimum block size.
        start = offset - offset % 512
        end = -(-(offset + length) // 512) * 512
        data = h.pread(end - start, start)[offset - start : offset - start + length]
        h.shutdown()
    return bytes(data)


@pytest.fixture
def encrypted_chain(tmp_path: Path) -> tuple[ImageKey, list[Path]]:
    """A 3-deep encrypted chain: full <- incr1 <- incr2, 1 MiB written in each."""
    key = _key()
    folder = tmp_path / "disk"
    folder.mkdir()
    paths = [folder / "a-full.qcow2", folder / "b-incr.qcow2", folder / "c-incr.qcow2"]
    img.create(str(paths[0]), SIZE, key=key)
    img.create(str(paths[1]), SIZE, backing=paths[0].name, key=key)
    img.create(str(paths[2]), SIZE, backing=paths[1].name, key=key)
    for i, p in enumerate(paths):
        _write(
            p,
            key,
            i * MIB,
            (b"SENDENSE-MARKER-%d-" % i) * (MIB // 18) + b"\0" * (MIB % 18),
            tmp_path,
        )
    return key, paths


def test_encrypted_chain_reads_through_three_layers(
    encrypted_chain: tuple[ImageKey, list[Path]], tmp_path: Path
) -> None:
    key, paths = encrypted_chain
    for p in paths:
        info = img.info(str(p))
        assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"
        assert info["format-specific"]["data"]["encrypt"]["cipher-alg"] == "aes-256"
        assert info["format-specific"]["data"]["encrypt"]["cipher-mode"] == "xts"
        # The guest's bytes are not in the file.
        assert b"SENDENSE-MARKER" not in p.read_bytes()
    for i in range(3):
        assert _read(paths[2], key, i * MIB, 18, tmp_path) == b"SENDENSE-MARKER-%d-" % i
    assert img.check(str(paths[2]), key=key)["check-errors"] == 0
    extents = img.map_extents(str(paths[2]), key=key)
    assert {e["depth"] for e in extents if e["data"]} == {0, 1, 2}
    # Without the key, or with another, qemu-img refuses to open the chain.
    with pytest.raises(QemuImgError):
        img.check(str(paths[2]))
    with pytest.raises(QemuImgError):
        img.check(str(paths[2]), key=_key())


def test_convert_commit_rebase_compare(
    encrypted_chain: tuple[ImageKey, list[Path]], tmp_path: Path
) -> None:
    key, paths = encrypted_chain
    raw = tmp_path / "restored.raw"
    img.convert(str(paths[2]), str(raw), dst_fmt="raw", key=key)
    data = raw.read_bytes()
    assert data[2 * MIB : 2 * MIB + 18] == b"SENDENSE-MARKER-2-"  # the output is the user's disk
    assert img.compare(str(paths[2]), str(raw), key=key)
    # Consolidation's merge: the top's content into the base, then the base alone reads the same.
    chain.merge_into_base(paths[2], paths[0], key=key)
    # Its invariant: the top reads as before at every step (here: after).
    assert img.compare(str(paths[2]), str(raw), key=key)
    img.rebase(str(paths[0]), "", key=key)
    assert img.compare(str(paths[0]), str(raw), key=key)
    assert img.chain_depth(str(paths[0])) == 1
    # A full-mode incremental made a full: rebase -u to no backing.
    img.rebase(str(paths[1]), "", key=key)
    assert img.info(str(paths[1])).get("backing-filename") is None


def test_secret_never_in_argv_and_file_removed(
    encrypted_chain: tuple[ImageKey, list[Path]], tmp_path: Path
) -> None:
    key, paths = encrypted_chain
    sock = str(tmp_path / "s.sock")
    with QemuNbdServer(str(paths[2]), socket_path=sock, read_only=True, key=key) as server:
        assert server.pid is not None
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert key.passphrase not in cmdline
        assert b"secret,id=sec0,file=" in cmdline
        # The secret file went as soon as qemu-nbd was serving.
        secret = cmdline.split(b"secret,id=sec0,file=")[1].split(b",format=raw")[0].decode()
        assert not os.path.exists(secret)
        assert not os.path.exists(os.path.dirname(secret))
    # And the image served reads as written (not ciphertext).
    assert _read(paths[2], key, MIB, 18, tmp_path) == b"SENDENSE-MARKER-1-"


def test_secret_file_is_private(tmp_path: Path) -> None:
    key = _key()
    with img.secret_file(key) as path:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert Path(path).read_bytes() == key.passphrase
    assert not os.path.exists(path)


def test_export_key_opens_an_image_with_plain_qemu_img(
    encrypted_chain: tuple[ImageKey, list[Path]], tmp_path: Path
) -> None:
    """What docs/security.md tells an administrator to type."""
    key, paths = encrypted_chain
    keyfile = tmp_path / "repo.key"
    keyfile.write_bytes(key.passphrase)
    keyfile.chmod(0o600)
    opts = (
        f"driver=qcow2,file.filename={paths[1]},encrypt.key-secret=sec0,"
        "backing.encrypt.key-secret=sec0"
    )
    out = subprocess.run(
        [
            "qemu-img",
            "convert",
            "--object",
            f"secret,id=sec0,file={keyfile},format=raw",
            "--image-opts",
            opts,
            "-O",
            "raw",
            str(tmp_path / "by-hand.raw"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    data = (tmp_path / "by-hand.raw").read_bytes()
    assert data[MIB : MIB + 18] == b"SENDENSE-MARKER-1-"
