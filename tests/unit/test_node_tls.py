"""sendense/tls.py: the node's certificate, fingerprints, the pinned context."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sendense.engine.node_client import (
    NodeCertificateInvalid,
    NodeCertificateMismatch,
    NodeClient,
)
from sendense.tls import (
    colon_form,
    ensure_node_certificate,
    fetch_certificate,
    fingerprint,
    is_loopback_host,
    make_self_signed,
    normalize_fingerprint,
    pinned_context,
)


def test_the_certificate_is_made_once_with_its_key_owner_only(tmp_path: Path) -> None:
    first = ensure_node_certificate(tmp_path, "127.0.0.1")
    assert first.created
    assert stat.S_IMODE(first.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    again = ensure_node_certificate(tmp_path, "127.0.0.1")
    assert not again.created and again.fingerprint == first.fingerprint
    cert = x509.load_pem_x509_certificate(first.cert_file.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    # The fingerprint is the SHA-256 of the DER, as openssl computes it.
    der = ssl.PEM_cert_to_DER_cert(first.cert_file.read_text())
    assert first.fingerprint == hashlib.sha256(der).hexdigest() == fingerprint(der)


def test_fingerprints_are_read_in_hex_or_colon_form() -> None:
    fp = "0f" * 32
    assert normalize_fingerprint(fp.upper()) == fp
    assert normalize_fingerprint(colon_form(fp)) == fp
    assert normalize_fingerprint(f"SHA256 Fingerprint={colon_form(fp)}") == fp
    for bad in ("", "0f" * 31, "zz" * 32, "0f" * 33):
        with pytest.raises(ValueError):
            normalize_fingerprint(bad)


@pytest.mark.parametrize(
    "host,loopback",
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("::ffff:127.0.0.1", True),
        ("192.0.2.10", False),
        ("10.0.0.1", False),
        ("node1.example.net", False),
        ("localhost.example.net", False),
        ("0.0.0.0", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def expired_self_signed() -> tuple[bytes, bytes]:
    """A self-signed certificate that expired yesterday, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old-node")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture(params=["fresh"])
def tls_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A TLS server on loopback presenting a new self-signed certificate
    (``expired``: one that expired yesterday)."""
    if request.param == "expired":
        cert, key = expired_self_signed()
    else:
        cert, key = make_self_signed("127.0.0.1")
    (tmp_path / "s.crt").write_bytes(cert)
    (tmp_path / "s.key").write_bytes(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "s.crt", tmp_path / "s.key")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.1)  # closing a socket does not wake a blocked accept
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n")
            except (OSError, ssl.SSLError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield sock.getsockname()[1], cert.decode()
    stop.set()
    sock.close()
    t.join(timeout=5)


def test_the_pinned_context_trusts_that_certificate_and_no_other(
    tls_server: tuple[int, str],
) -> None:
    port, pem = tls_server
    assert fetch_certificate(f"https://127.0.0.1:{port}") == pem
    # The pinned one: accepted, whatever the host name (none is checked).
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        pinned_context(pem).wrap_socket(raw, server_hostname="not-the-name"),
    ):
        pass
    # Another certificate pinned: refused in the handshake.
    other, _ = make_self_signed("127.0.0.1")
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        pinned_context(other.decode()).wrap_socket(raw, server_hostname="x")


def test_the_hubs_client_refuses_another_certificate_before_sending_the_token(
    tls_server: tuple[int, str],
) -> None:
    port, pem = tls_server
    other, _ = make_self_signed("127.0.0.1")
    client = NodeClient(
        f"https://127.0.0.1:{port}", "tok-secret", certificate=other.decode(), name="site1"
    )
    try:
        with pytest.raises(NodeCertificateMismatch) as caught:
            client.health()
    finally:
        client.close()
    e = caught.value
    assert e.code == "node_certificate_mismatch"
    assert "node site1" in e.message
    assert "certificate does not match the pinned fingerprint" in e.message
    assert e.details["pinned"] == fingerprint(other) and e.details["presented"] == fingerprint(pem)
    assert "tok-secret" not in e.message


@pytest.mark.parametrize("tls_server", ["expired"], indirect=True)
def test_an_expired_pinned_certificate_is_named_as_such(tls_server: tuple[int, str]) -> None:
    port, pem = tls_server
    client = NodeClient(f"https://127.0.0.1:{port}", "tok", certificate=pem, name="site1")
    try:
        with pytest.raises(NodeCertificateInvalid) as caught:
            client.health()
    finally:
        client.close()
    assert caught.value.code == "node_certificate_invalid"
    assert "expired" in caught.value.message and "re-pin" in caught.value.message
