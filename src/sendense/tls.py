"""Node certificates and pinning (hub <-> node HTTPS).

The node makes itself a self-signed certificate on first start
(`ensure_node_certificate`): EC P-256, ten years, SubjectAltName with
``localhost``, its host names and addresses, basicConstraints CA:TRUE so that
the certificate can be its own trust anchor. The hub pins it at registration:
it reads what the node presents (`fetch_certificate`, a handshake without a
request, so no token leaves the hub), compares its SHA-256 with the
fingerprint the administrator gave, and stores the PEM.

Every later connection to the node trusts that PEM only (`pinned_context`):
an ``ssl.SSLContext`` with ``cadata=<pinned PEM>`` and ``check_hostname``
off. Why a context and not a digest check of the peer after connecting:
httpx sends the request (with the node's bearer token) right after the
handshake, so a check after connecting would hand the token to an impostor
first; the context refuses the handshake itself. The hostname is not
checked because the pinned certificate, not the name in the URL, is what
identifies the node (the URL may be an address the node did not put in its
SubjectAltName, e.g. behind NAT).

Fingerprint: SHA-256 of the certificate's DER, written as 64 lowercase hex
digits (`fingerprint`); input accepts upper case and the colon form
``AB:CD:...`` (`normalize_fingerprint`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CERT_NAME = "node.crt"
KEY_NAME = "node.key"
VALID_DAYS = 3650
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def fingerprint(pem_or_der: str | bytes) -> str:
    """SHA-256 (64 lowercase hex digits) of a certificate's DER encoding."""
    if isinstance(pem_or_der, str):
        der = ssl.PEM_cert_to_DER_cert(pem_or_der)
    elif pem_or_der.lstrip().startswith(b"-----BEGIN"):
        der = ssl.PEM_cert_to_DER_cert(pem_or_der.decode())
    else:
        der = pem_or_der
    return hashlib.sha256(der).hexdigest()


def colon_form(fp: str) -> str:
    """``AB:CD:...``, as openssl and browsers show it."""
    return ":".join(fp[i : i + 2] for i in range(0, len(fp), 2)).upper()


def normalize_fingerprint(value: str) -> str:
    """64 lowercase hex digits from hex or colon form; ValueError otherwise."""
    text = value.strip().lower().replace(":", "")
    if text.startswith("sha256"):  # "SHA256 Fingerprint=..." pasted from openssl
        text = text.split("=", 1)[-1].strip()
    if not _HEX64.match(text):
        raise ValueError("must be a SHA-256 fingerprint: 64 hex digits, with or without colons")
    return text


@dataclass(frozen=True)
class NodeCertificate:
    cert_file: Path
    key_file: Path
    fingerprint: str
    created: bool  # made just now (first start)


def _names(host: str) -> list[x509.GeneralName]:
    dns: list[str] = ["localhost"]
    ips: list[str] = ["127.0.0.1", "::1"]
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in dns:
            dns.append(name)
    candidates = [host]
    try:
        candidates += [str(a[4][0]) for a in socket.getaddrinfo(socket.gethostname(), None)]
    except OSError:
        pass
    for c in candidates:
        try:
            ip = ipaddress.ip_address(c.split("%", 1)[0])
        except ValueError:
            if c and c not in dns:
                dns.append(c)
            continue
        if not ip.is_unspecified and str(ip) not in ips:
            ips.append(str(ip))
    return [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]


def make_self_signed(host: str) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a new self-signed certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Sendense node"),
            x509.NameAttribute(NameOID.COMMON_NAME, socket.gethostname() or "sendense-node"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(_names(host)), critical=False)
        # CA:TRUE: clients may use this certificate as its own trust anchor
        # (the hub's pinned context, curl --cacert).
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_node_certificate(data_dir: Path, host: str = "127.0.0.1") -> NodeCertificate:
    """The node's certificate under ``<data_dir>/tls/``, made on first call
    (the key with mode 0600 from its creation), reused afterwards."""
    tls_dir = data_dir / "tls"
    cert_file, key_file = tls_dir / CERT_NAME, tls_dir / KEY_NAME
    created = False
    if not (cert_file.exists() and key_file.exists()):
        tls_dir.mkdir(parents=True, exist_ok=True)
        tls_dir.chmod(0o700)
        cert_pem, key_pem = make_self_signed(host)
        # The key is written to a new file created 0600 (never readable by
        # others, not even for an instant), then renamed into place.
        tmp = key_file.with_suffix(".key.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        os.replace(tmp, key_file)
        cert_tmp = cert_file.with_suffix(".crt.tmp")
        cert_tmp.write_bytes(cert_pem)
        os.replace(cert_tmp, cert_file)
        created = True
    key_file.chmod(0o600)
    fp = fingerprint(cert_file.read_text())
    return NodeCertificate(cert_file, key_file, fp, created)


def pinned_context(certificate_pem: str) -> ssl.SSLContext:
    """A client context that trusts this one certificate and nothing else
    (see the module's docstring for why no hostname check)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=certificate_pem)
    return ctx


class CertificateUnavailable(Exception):
    """No certificate could be read from the URL (refused, timeout, not TLS)."""


def fetch_certificate(url: str, timeout: float = 5.0) -> str:
    """The PEM certificate an https URL presents, read with a handshake only
    (nothing sent after it, so no credential reaches whoever answers)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or 443
    try:
        return ssl.get_server_certificate((host, port), timeout=timeout)
    except (OSError, ssl.SSLError, ValueError) as e:
        raise CertificateUnavailable(f"{type(e).__name__}: {e}") from None


def is_loopback_host(host: str) -> bool:
    """localhost, 127.0.0.0/8, ::1 (and ::ffff:127.x)."""
    h = host.strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback
