"""Running the node agent: HTTPS with its own certificate by default.

On first start the node makes a self-signed certificate and key under
``<data_dir>/tls/`` (sendense/tls.py) and reuses them afterwards; it prints
and logs the certificate's SHA-256 fingerprint, which the administrator gives
the hub at registration (``sendense node add --fingerprint``; ``sendense node
fingerprint`` prints it again). ``SENDENSE_NODE_TLS=false`` serves plain
HTTP: loopback and demos only (a hub refuses a non-loopback http:// node).
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from sendense.settings import NodeSettings
from sendense.tls import NodeCertificate, colon_form, ensure_node_certificate

log = logging.getLogger(__name__)


def node_certificate(settings: NodeSettings) -> NodeCertificate:
    """The node's certificate (made now if it has none yet)."""
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    return ensure_node_certificate(data_dir, settings.host)


def serve(settings: NodeSettings) -> None:
    """Run the node in the foreground until SIGINT/SIGTERM."""
    from sendense.node.app import create_app

    ssl: dict[str, str] = {}
    if settings.tls:
        cert = node_certificate(settings)
        ssl = {"ssl_certfile": str(cert.cert_file), "ssl_keyfile": str(cert.key_file)}
        made = "made now" if cert.created else "reused"
        log.info(
            "node certificate %s cert=%s fingerprint=%s", made, cert.cert_file, cert.fingerprint
        )
        # On stdout too: whoever starts the node by hand needs it for `node add`.
        print(f"node certificate fingerprint (SHA-256): {cert.fingerprint}", flush=True)
        print(f"  colon form: {colon_form(cert.fingerprint)}", flush=True)
    else:
        log.warning(
            "node TLS is off (SENDENSE_NODE_TLS=false): plain HTTP on %s; a hub accepts "
            "that for loopback only (unless SENDENSE_ALLOW_PLAIN_HTTP_NODES)",
            settings.host,
        )
    sys.stdout.flush()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        **ssl,  # type: ignore[arg-type]
    )
