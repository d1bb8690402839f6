"""Nodes: registration, edits, removal; health from the background cache.

Talking to a node (the check at registration or edit) happens with no
session open; the catalog writes come after, in one short session.

HTTPS and pinning (docs/security.md): before any connection the URL is
checked (`check_url_policy`: plain HTTP only to loopback, unless
``allow_plain_http_nodes``). For an https:// URL the hub reads the
certificate the node presents (a handshake, nothing sent), compares its
SHA-256 with the ``fingerprint`` given (400 ``fingerprint_mismatch`` naming
both; none given: 400 ``fingerprint_required`` with the presented one in
``details.fingerprint``), and only then checks the token, through a context
that trusts that certificate alone. The fingerprint and the PEM go into the
catalog; every later call uses them (engine/node_client.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select

from sendense.catalog.models import BackupJob, Node
from sendense.catalog.stores import NodeStore
from sendense.core.access import Principal
from sendense.core.errors import (
    FingerprintMismatch,
    FingerprintRequired,
    InvalidRequest,
    NotFound,
    PlainHttpRefused,
)
from sendense.engine import dispatch, inventory
from sendense.engine.lifecycle import queued_clause
from sendense.engine.node_client import forget_client
from sendense.hub.nodes.health import NodeHealthMonitor
from sendense.hub.nodes.schemas import NodeCreate, NodeUpdate
from sendense.hub.state import HubState
from sendense.hub.views import node_view
from sendense.settings import HubSettings
from sendense.tls import (
    CertificateUnavailable,
    colon_form,
    fetch_certificate,
    fingerprint,
    is_loopback_host,
)


def _monitor(st: HubState) -> NodeHealthMonitor | None:
    return st.node_health


def _view(st: HubState, node: Any) -> dict[str, Any]:
    m = _monitor(st)
    if m is None:
        return node_view(node, None)
    health = m.health(node.id)
    if health["status"] == "unknown":
        # Each API worker process keeps its own cache: a node registered
        # through another one is probed here now, in the background, and
        # meanwhile shown as the catalog last saw it (a registration or an
        # edit that talked to it), if that was recent.
        m.refresh_soon()
        seen = node.last_seen_at
        if seen is not None:
            age = (datetime.now(UTC) - seen).total_seconds()
            if 0 <= age < RECENT_SECONDS:
                health = {
                    **health,
                    "status": "online",
                    "checked_at": seen.isoformat(),
                    "age_seconds": round(age, 1),
                }
    view = node_view(node, health)
    view["tls"] = node.url.lower().startswith("https://")
    view["fingerprint"] = node.fingerprint
    view.update(_jobs(st, node))
    return view


def _jobs(st: HubState, node: Any) -> dict[str, Any]:
    """The node's job limit and how it is used (engine/dispatch.py)."""
    with st.db.session() as s:
        queued = s.execute(
            select(func.count())
            .select_from(BackupJob)
            .where(queued_clause(), BackupJob.node_id == node.id)
        ).scalar_one()
        return {
            "max_jobs": node.max_jobs,
            "job_limit": node.max_jobs
            if node.max_jobs is not None
            else dispatch.default_limit(st.settings),
            "jobs_running": dispatch.occupied(s, node.id),
            "jobs_queued": int(queued),
        }


# How old a catalog "last seen" may be to stand for this process's own probe.
RECENT_SECONDS = 60.0


def is_https(url: str) -> bool:
    return urlsplit(url).scheme.lower() == "https"


def check_url_policy(settings: HubSettings, url: str) -> None:
    """Plain HTTP to a node only on loopback (or when the hub allows it):
    checked before any connection, from the URL alone."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "http" or settings.allow_plain_http_nodes:
        return
    if not is_loopback_host(parts.hostname or ""):
        raise PlainHttpRefused(
            f"plain HTTP to node at {url} is refused: {parts.hostname} is not a loopback "
            "address and the node's token and source credentials would cross the network "
            "in clear. Use https:// (the node serves HTTPS by default) or set "
            "SENDENSE_ALLOW_PLAIN_HTTP_NODES=true on the hub",
            url=url,
        )


def pin_certificate(url: str, given: str | None) -> tuple[str, str]:
    """(fingerprint, PEM) the https node at ``url`` presents, if it is ``given``.

    Nothing but a TLS handshake happens here: the token is sent later,
    through a context trusting this certificate only."""
    try:
        pem = fetch_certificate(url)
    except CertificateUnavailable as e:
        raise InvalidRequest(
            f"cannot read the TLS certificate of the node at {url}: {e}",
            code="node_unreachable",
            url=url,
        ) from None
    presented = fingerprint(pem)
    if given is None:
        raise FingerprintRequired(
            f"the node at {url} presents a certificate with SHA-256 fingerprint {presented} "
            f"({colon_form(presented)}); check it against the node's own "
            "(`sendense node fingerprint` on the node, or its start-up log) and send it "
            'back as "fingerprint" to pin it',
            url=url,
            fingerprint=presented,
        )
    if given != presented:
        raise FingerprintMismatch(
            f"the node at {url} presents a certificate with fingerprint {presented}, "
            f"not the {given} given: nothing was sent to it. Check the URL and the "
            "fingerprint on the node (`sendense node fingerprint`)",
            url=url,
            expected=given,
            presented=presented,
        )
    return presented, pem


def create_node(st: HubState, body: NodeCreate) -> dict[str, Any]:
    check_url_policy(st.settings, body.url)
    pin: tuple[str, str] | None = None
    if is_https(body.url):
        pin = pin_certificate(body.url, body.fingerprint)
    elif body.fingerprint is not None:
        raise InvalidRequest(
            "fingerprint is for https:// node URLs only (a plain HTTP node has no certificate)",
            field="fingerprint",
        )
    certificate = pin[1] if pin else None
    version = inventory.check_node(body.url, body.token, certificate) if body.verify else None
    with st.db.session() as s:
        node = inventory.register_node(
            s, st.secrets, body.name, body.url, body.token, verified=body.verify, pin=pin
        )
        node.max_jobs = body.max_jobs
        node_id = node.id
    m = _monitor(st)
    if m is not None:
        if body.verify:
            m.record_online(node_id, version)
        else:
            m.refresh_soon()
    return get_node(st, node_id)


def get_node(st: HubState, node_id: str, who: Principal | None = None) -> dict[str, Any]:
    with st.db.session() as s:
        node = NodeStore(s).get(node_id)
        if node is None or (who is not None and who.scoped):
            raise NotFound(f"node {node_id} not found", node_id=node_id)
        return _view(st, node)


def list_nodes(st: HubState, who: Principal) -> list[dict[str, Any]]:
    """Every node with its cached health: no request to any node here.

    Nodes and sources belong to no tenant: a scoped token sees none (sources
    name VMs of every tenant)."""
    if who.scoped:
        return []
    with st.db.session() as s:
        return [_view(st, n) for n in NodeStore(s).all()]


def set_max_jobs(st: HubState, node_id: str, max_jobs: int | None) -> None:
    """The node's own job limit (None: the hub's default). A higher limit
    lets queued jobs start now."""
    with st.db.session() as s:
        node = s.get(Node, node_id)
        if node is None:
            raise NotFound(f"node {node_id} not found", node_id=node_id)
        node.max_jobs = max_jobs
    st.engine.dispatcher.poke()


def update_node(st: HubState, node_id: str, body: NodeUpdate) -> dict[str, Any]:
    if body.model_fields_set <= {"max_jobs", "verify"} and "max_jobs" in body.model_fields_set:
        # The limit alone: nothing to check against the node.
        set_max_jobs(st, node_id, body.max_jobs)
        return get_node(st, node_id)
    with st.db.session() as s:
        url, token = inventory.node_secret(s, st.secrets, node_id)
        certificate = inventory.node_certificate(s, node_id)
    new_url = body.url if body.url is not None else url
    new_token = body.token if body.token is not None else token
    check_url_policy(st.settings, new_url)
    # The pin: re-pinned when a fingerprint is given, kept otherwise (a new
    # URL of the same node), asked for when an https node has none yet.
    pin: tuple[str | None, str | None] | None = None
    if is_https(new_url):
        if body.fingerprint is not None or certificate is None:
            pin = pin_certificate(new_url, body.fingerprint)
            certificate = pin[1]
    else:
        if body.fingerprint is not None:
            raise InvalidRequest("fingerprint is for https:// node URLs only", field="fingerprint")
        if certificate is not None:
            pin, certificate = (None, None), None
    version = inventory.check_node(new_url, new_token, certificate) if body.verify else None
    with st.db.session() as s:
        inventory.update_node(
            s, st.secrets, node_id, url=body.url, token=body.token, verified=body.verify, pin=pin
        )
    if "max_jobs" in body.model_fields_set:
        set_max_jobs(st, node_id, body.max_jobs)
    # The next call through engine/node_client.cached_client makes a client
    # with the new URL and token (it is keyed by both).
    m = _monitor(st)
    if m is not None:
        if body.verify:
            m.record_online(node_id, version)
        else:
            m.forget(node_id)
            m.refresh_soon()
    return get_node(st, node_id)


def delete_node(st: HubState, node_id: str, *, cascade: bool) -> dict[str, Any]:
    with st.db.session() as s:
        removed = inventory.remove_node(s, node_id, cascade=cascade)
    forget_client(node_id)
    m = _monitor(st)
    if m is not None:
        m.forget(node_id)
    return removed
