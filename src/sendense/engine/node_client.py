"""The hub's client of a node's API (SPEC §4)."""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any

import httpx

from sendense.core.errors import Conflict, Error, InvalidRequest, NotFound, Unavailable
from sendense.secretbox import scrub, secret_values
from sendense.tls import CertificateUnavailable, fetch_certificate, fingerprint, pinned_context

log = logging.getLogger(__name__)


class NodeUnreachable(Unavailable):
    code = "node_unreachable"


class NodeCertificateMismatch(NodeUnreachable):
    """The node's TLS certificate is not the one pinned at registration: the
    hub sends it nothing (the handshake itself fails, before any request)."""

    code = "node_certificate_mismatch"


class NodeCertificateInvalid(NodeCertificateMismatch):
    """The node presents its pinned certificate but it is refused anyway
    (expired, or not yet valid by the hub's clock)."""

    code = "node_certificate_invalid"


def _cert_verify_error(e: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind an httpx error, if any."""
    seen: BaseException | None = e
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class NodeClient:
    """One per node, kept for the hub's lifetime: a new httpx client per call
    costs ~50 ms of CPU (an SSL context is built each time), which the job
    monitor's polling turned into a quarter of a backup's CPU (measured).

    Credentials never reach an error message: the node's token and the
    credentials of the source a request carries are replaced by ``***`` in
    whatever the transport or the node says (an httpx error may quote the
    Authorization header; a node may echo its input).

    An https node is trusted through its pinned certificate only
    (``certificate``, PEM, from the catalog; sendense/tls.py says why a
    context and not a digest check): a node presenting another one is refused
    in the handshake, before the token is sent (`NodeCertificateMismatch`).
    An https URL without a pinned certificate is refused outright.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 10.0,
        node_id: str | None = None,
        certificate: str | None = None,
        name: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        # Set for the hub's shared clients: their outcomes feed node health.
        self.node_id = node_id
        self.name = name or node_id or self.url
        self.timeout = timeout
        self._token = token
        self.certificate = certificate
        self.pinned = fingerprint(certificate) if certificate else None
        verify: ssl.SSLContext | bool = True
        if certificate:
            verify = pinned_context(certificate)
        elif self.url.lower().startswith("https://"):
            # No pin: nothing is trusted (not even the system's CAs: a node
            # is pinned, never vouched for by a public CA).
            verify = _trust_nothing()
        self._http = httpx.Client(timeout=timeout, verify=verify)
        self._auth = {"Authorization": f"Bearer {token}"}

    def close(self) -> None:
        self._http.close()

    def _call(
        self,
        method: str,
        path: str,
        json: Any = None,
        timeout: float | None = None,
        *,
        hide: list[str] | None = None,
    ) -> Any:
        hidden = [self._token, f"Bearer {self._token}", *(hide or [])]
        try:
            # The header goes per request: a token httpx refuses (a newline)
            # fails here, inside the try, not when the client is made.
            r = self._http.request(
                method,
                f"{self.url}{path}",
                json=json,
                headers=self._auth,
                timeout=timeout or self.timeout,
            )
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as e:
            # InvalidURL and ValueError (a header httpx cannot encode) are not
            # HTTPErrors; uncaught they would be a 500 wherever a node is used.
            refused = _cert_verify_error(e)
            if refused is not None:
                mismatch = self._mismatch(str(refused.verify_message or refused))
                _observe(self.node_id, False, mismatch.message)
                raise mismatch from None
            err = NodeUnreachable(
                scrub(f"node at {self.url} is unreachable: {type(e).__name__}: {e}", hidden),
                url=self.url,
            )
            _observe(self.node_id, False, err.message)
            raise err from None
        if r.status_code < 400:
            _observe(self.node_id, True, None)
        if r.status_code >= 400:
            try:
                body = r.json()
                message = str(body.get("message") or r.text)
                code = str(body.get("error") or "node_error")
            except (ValueError, AttributeError):
                message, code = r.text, "node_error"
            message = scrub(message[:2000], hidden)
            if r.status_code == 401:
                # The hub's stored token is wrong: the caller's request is fine
                # (503); registration turns it into a 400 (inventory.check_node).
                raise Unavailable(f"node at {self.url} rejected the token", code="node_auth")
            if r.status_code == 404:
                raise NotFound(f"node: {message}", code=code)
            if r.status_code == 400:
                raise InvalidRequest(f"node refused the request: {message}", code=code)
            if r.status_code == 409:
                raise Conflict(f"node: {message}", code=code)
            if r.status_code == 503:
                raise Unavailable(f"node: {message}", code=code)
            raise Error(f"node answered {r.status_code}: {message}", code=code)
        return r.json()

    def _mismatch(self, reason: str) -> NodeCertificateMismatch:
        """The error for a node whose certificate is not the pinned one, with
        what it presents now when that can be read (both are public)."""
        try:
            presented: str | None = fingerprint(fetch_certificate(self.url, timeout=3))
        except CertificateUnavailable:
            presented = None
        ref = self.node_id or "{node_id}"
        if self.pinned is None:
            return NodeCertificateMismatch(
                f"node {self.name} at {self.url}: no certificate is pinned for this "
                f"https node; pin it with PATCH /api/v1/nodes/{ref} "
                '{"fingerprint": ...} (sendense node edit --fingerprint)',
                node=self.name,
                url=self.url,
                presented=presented,
            )
        if presented == self.pinned:
            # The pinned certificate itself, refused: expired (ten years
            # after the node made it) or not yet valid (a clock far off).
            return NodeCertificateInvalid(
                f"node {self.name} at {self.url}: its pinned certificate is refused "
                f"({reason}); check both clocks, or give the node a new certificate "
                f"(remove its tls/ directory, restart it) and re-pin it: "
                f'PATCH /api/v1/nodes/{ref} {{"fingerprint": "<new>"}}',
                node=self.name,
                url=self.url,
                pinned=self.pinned,
                reason=reason,
            )
        return NodeCertificateMismatch(
            f"node {self.name} at {self.url}: certificate does not match the pinned "
            f"fingerprint (pinned {self.pinned}, presented {presented or 'unreadable'}); "
            "if the node's certificate was replaced on purpose, re-pin it: "
            f'PATCH /api/v1/nodes/{ref} {{"fingerprint": "<new>"}} '
            "(sendense node edit NODE --fingerprint <new>)",
            node=self.name,
            url=self.url,
            pinned=self.pinned,
            presented=presented,
        )

    def health(self, timeout: float = 3.0) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/api/v1/health", timeout=timeout)
        return result

    def check_token(self) -> None:
        """A call that needs the token: 404 for an unknown job means it is valid."""
        try:
            self._call("GET", "/api/v1/status/sendense-token-probe", timeout=3)
        except NotFound:
            return

    def start_backup(self, request: dict[str, Any]) -> dict[str, Any]:
        source = request.get("source") or {}
        hide = secret_values(source.get("config") if isinstance(source, dict) else None)
        result: dict[str, Any] = self._call("POST", "/api/v1/backup/start", json=request, hide=hide)
        return result

    def status(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/api/v1/status/{job_id}", timeout=5)
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/api/v1/jobs/{job_id}/cancel", timeout=5)
        return result

    def pulled(self, job_id: str) -> dict[str, Any]:
        """Pull mode (issue 11, engine/pull.py): the hub read every disk of the job."""
        result: dict[str, Any] = self._call("POST", f"/api/v1/jobs/{job_id}/pulled", timeout=5)
        return result

    def discover(self, source: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "POST",
            "/api/v1/discover",
            json={"source": source},
            timeout=60,
            hide=secret_values(source.get("config")),
        )
        return result


# Who hears how calls to a node went (node_id, answered, error): the hub's
# node health cache (hub/nodes/health.py), so that GET /nodes shows what a
# job just found out and not only the last periodic probe.
Observer = Callable[[str, bool, str | None], None]
_observers: list[Observer] = []


def add_observer(fn: Observer) -> None:
    _observers.append(fn)


def remove_observer(fn: Observer) -> None:
    if fn in _observers:
        _observers.remove(fn)


def _observe(node_id: str | None, ok: bool, error: str | None) -> None:
    if node_id is None:
        return
    for fn in list(_observers):
        try:
            fn(node_id, ok, error)
        except Exception:  # an observer never breaks a call
            log.exception("node observer failed")


def _trust_nothing() -> ssl.SSLContext:
    """A client context with no trust anchor: every server is refused."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


_clients: dict[tuple[str, str], NodeClient] = {}
_clients_lock = threading.Lock()


def cached_client(
    node_id: str,
    url: str,
    token: str,
    certificate: str | None = None,
    name: str | None = None,
) -> NodeClient:
    """The shared client of a node (a new one when its URL, token or pinned
    certificate changed: the old one is dropped from the cache, left to
    whoever still holds it)."""
    material = f"{url}\0{token}\0{certificate or ''}"
    key = (node_id, hashlib.sha256(material.encode()).hexdigest())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            for old in [k for k in _clients if k[0] == node_id]:
                del _clients[old]
            client = _clients[key] = NodeClient(
                url, token, node_id=node_id, certificate=certificate, name=name
            )
        return client


def forget_client(node_id: str) -> None:
    """Drop a removed node's client."""
    with _clients_lock:
        for old in [k for k in _clients if k[0] == node_id]:
            del _clients[old]
