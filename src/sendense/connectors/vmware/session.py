"""A vSphere API session (pyVmomi): login, property collector reads, tasks.

Everything the connector reads goes through the property collector
(``RetrieveContents`` with explicit property paths), never through pyVmomi's
lazy attribute access: a lazy read fetches the whole object, and on some
servers (vcsim among them) an unset property in it crashes the reader.
Tasks are waited on by polling ``info.state`` the same way: pyVmomi's
``WaitForTask`` reads ``info`` whole and trips on some servers' answers
(e.g. ``info.entity`` typed as a snapshot).

Third-party failures are wrapped where they enter: a wrong user or password
is `VsphereLoginFailed`, no answer `VsphereUnreachable`, a fault
`VsphereFault` (its type in ``details.fault``).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl
from pyVmomi.Security import ThumbprintMismatchException

from sendense.connectors.vmware.config import VmwareConfig
from sendense.core.errors import (
    Error,
    VsphereCertificate,
    VsphereFault,
    VsphereLoginFailed,
    VsphereUnreachable,
)

log = logging.getLogger(__name__)

PC = vmodl.query.PropertyCollector
T = TypeVar("T")
# Seconds a connection or a SOAP call may take before the vCenter counts as
# unreachable: less than the hub waits for a discovery (60 s), so that a
# vCenter that does not answer is reported as such, not as the node.
CALL_TIMEOUT = 40
# A session idles out after 30 minutes on vCenter: keep it alive while a
# backup reads through /folder with its cookie (virt-v2v renews every 25).
KEEPALIVE_SECONDS = 600.0


def fault_message(e: vmodl.MethodFault) -> str:
    msg = getattr(e, "msg", "") or ""
    if not msg:
        msgs = [m.message for m in getattr(e, "faultMessage", []) or [] if m.message]
        msg = "; ".join(msgs)
    return msg or type(e).__name__


def wrap_fault(what: str, e: BaseException) -> Error:
    """The error to raise for ``e`` while doing ``what`` (chain with ``from``)."""
    if isinstance(e, vim.fault.InvalidLogin):
        return VsphereLoginFailed(f"{what}: vCenter refused the user name or password")
    if isinstance(e, vmodl.MethodFault):
        name = type(e).__name__.rsplit(".", 1)[-1]
        return VsphereFault(f"{what}: {name}: {fault_message(e)}", fault=name)
    if isinstance(e, ThumbprintMismatchException):
        return VsphereCertificate(
            f"{what}: the server's certificate does not match config.thumbprint "
            f"(its fingerprint is {e.actual})"
        )
    if isinstance(e, ssl.SSLCertVerificationError):
        return VsphereCertificate(
            f"{what}: the server's certificate is not trusted ({e.verify_message}); "
            "set config.thumbprint to its fingerprint, or config.insecure for a lab"
        )
    if isinstance(e, (OSError, http.client.HTTPException, TimeoutError)):
        return VsphereUnreachable(f"{what}: {type(e).__name__}: {e}")
    return VsphereFault(f"{what}: {type(e).__name__}: {e}", fault=type(e).__name__)


def ssl_context(cfg: VmwareConfig) -> ssl.SSLContext:
    """The TLS context of the API session. With a ``thumbprint`` it verifies
    nothing itself: `check_pinned` compares the certificate's fingerprint
    before the login (pyVmomi's own ``thumbprint`` argument is not used: it
    fails on an untrusted certificate before it compares anything)."""
    ctx = ssl.create_default_context()
    if not cfg.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def certificate_fingerprint(cfg: VmwareConfig, *, algorithm: str = "sha1") -> str:
    """The server certificate's fingerprint (lowercase hex), read with a TLS
    handshake that trusts nothing."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((cfg.host.strip("[]"), cfg.port), timeout=CALL_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname=cfg.host.strip("[]")) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except OSError as e:
        raise wrap_fault(f"cannot reach vCenter {cfg.netloc}", e) from e
    if der is None:
        raise VsphereCertificate(f"vCenter {cfg.netloc} sent no certificate")
    return hashlib.new(algorithm, der).hexdigest()


def check_pinned(cfg: VmwareConfig) -> None:
    """With ``thumbprint``: the certificate served now is the pinned one.

    Checked with a handshake of its own before the login and before the disk
    readers start (nbdkit curl cannot pin a fingerprint either); a server
    swapped between that check and the next connection would go unnoticed.
    """
    if cfg.thumbprint is None:
        return
    algorithm = "sha1" if len(cfg.thumbprint) == 40 else "sha256"
    actual = certificate_fingerprint(cfg, algorithm=algorithm)
    if actual != cfg.thumbprint:
        raise VsphereCertificate(
            f"the certificate of vCenter {cfg.netloc} does not match config.thumbprint "
            f"(its fingerprint is {actual})"
        )


class Session:
    """A logged-in session; `close()` logs out. Not shared between threads,
    except the keep-alive, which only calls ``CurrentTime``."""

    def __init__(self, cfg: VmwareConfig) -> None:
        self.cfg = cfg
        check_pinned(cfg)
        try:
            self.si = SmartConnect(
                host=cfg.host.strip("[]"),
                port=cfg.port,
                user=cfg.user,
                pwd=cfg.password,
                sslContext=ssl_context(cfg),
                httpConnectionTimeout=CALL_TIMEOUT,
                connectionPoolTimeout=-1,
            )
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise wrap_fault(f"cannot log in to vCenter {cfg.netloc} as {cfg.user}", e) from None
        self.content = self.si.RetrieveContent()
        self._keepalive: threading.Thread | None = None
        self._stop = threading.Event()

    # -- calls ---------------------------------------------------------------

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` with its failures wrapped."""
        try:
            return fn(*args, **kwargs)
        except (vmodl.MethodFault, OSError, http.client.HTTPException) as e:
            raise wrap_fault(what, e) from None

    def retrieve(self, obj: Any, paths: list[str], kind: Any | None = None) -> dict[str, Any]:
        """Properties ``paths`` of one managed object (unset ones are absent)."""
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=obj)],
            propSet=[PC.PropertySpec(type=kind or type(obj), pathSet=paths)],
        )
        found = self.call(
            "property collector", self.content.propertyCollector.RetrieveContents, [spec]
        )
        return {p.name: p.val for p in found[0].propSet} if found else {}

    def retrieve_all(
        self, root: Any, kinds: dict[Any, list[str]]
    ) -> Iterator[tuple[Any, dict[str, Any]]]:
        """(object, properties) for every object of ``kinds`` under ``root``
        (a container view, recursive), paging with ``ContinueRetrievePropertiesEx``."""
        view = self.call(
            "container view",
            self.content.viewManager.CreateContainerView,
            root,
            list(kinds),
            True,
        )
        try:
            spec = PC.FilterSpec(
                objectSet=[
                    PC.ObjectSpec(
                        obj=view,
                        skip=True,
                        selectSet=[
                            PC.TraversalSpec(
                                name="view", type=vim.view.ContainerView, path="view", skip=False
                            )
                        ],
                    )
                ],
                propSet=[PC.PropertySpec(type=k, pathSet=p) for k, p in kinds.items()],
            )
            pc = self.content.propertyCollector
            result = self.call(
                "property collector", pc.RetrievePropertiesEx, [spec], PC.RetrieveOptions()
            )
            while result is not None:
                for o in result.objects:
                    yield o.obj, {p.name: p.val for p in o.propSet or []}
                if not result.token:
                    break
                result = self.call(
                    "property collector", pc.ContinueRetrievePropertiesEx, result.token
                )
        finally:
            with contextlib.suppress(Exception):
                view.Destroy()

    def wait_task(self, what: str, task: Any, *, timeout: float = 3600.0) -> Any:
        """Wait for ``task`` by polling ``info.state``; its result. A task that
        ends in error raises `VsphereFault` with the task's fault."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            info = self.retrieve(task, ["info.state", "info.error", "info.result"], vim.Task)
            state = info.get("info.state")
            if state == "success":
                return info.get("info.result")
            if state == "error":
                err = info.get("info.error")
                if isinstance(err, vmodl.MethodFault):
                    raise wrap_fault(what, err)
                raise VsphereFault(f"{what}: the task failed")
            if time.monotonic() > deadline:
                raise VsphereFault(
                    f"{what}: the task did not end in {timeout:.0f} s", fault="timeout"
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    # -- the session cookie ------------------------------------------------

    @property
    def cookie(self) -> str:
        """``vmware_soap_session="..."``: what the datastore /folder URLs need."""
        raw = str(self.si._stub.cookie or "")
        return raw.split(";", 1)[0].strip()

    def start_keepalive(self, period: float = KEEPALIVE_SECONDS) -> None:
        def run() -> None:
            while not self._stop.wait(period):
                try:
                    self.si.CurrentTime()
                except Exception as e:  # the copy will tell if the session is gone
                    log.warning("vsphere keepalive failed: %s", type(e).__name__)

        self._keepalive = threading.Thread(target=run, name="vsphere-keepalive", daemon=True)
        self._keepalive.start()

    def close(self) -> None:
        self._stop.set()
        if self._keepalive is not None:
            self._keepalive.join(timeout=5)
        with contextlib.suppress(Exception):
            Disconnect(self.si)
