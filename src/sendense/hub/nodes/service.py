"""Nodes: registration, edits, removal; health from the background cache.

Talking to a node (the check at registration or edit) happens with no
session open; the catalog writes come after, in one short session.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sendense.catalog.stores import NodeStore
from sendense.core.access import Principal
from sendense.core.errors import NotFound
from sendense.engine import inventory
from sendense.engine.node_client import forget_client
from sendense.hub.nodes.health import NodeHealthMonitor
from sendense.hub.nodes.schemas import NodeCreate, NodeUpdate
from sendense.hub.state import HubState
from sendense.hub.views import node_view


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
    return node_view(node, health)


# How old a catalog "last seen" may be to stand for this process's own probe.
RECENT_SECONDS = 60.0


def create_node(st: HubState, body: NodeCreate) -> dict[str, Any]:
    version = inventory.check_node(body.url, body.token) if body.verify else None
    with st.db.session() as s:
        node = inventory.register_node(
            s, st.secrets, body.name, body.url, body.token, verified=body.verify
        )
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


def update_node(st: HubState, node_id: str, body: NodeUpdate) -> dict[str, Any]:
    with st.db.session() as s:
        url, token = inventory.node_secret(s, st.secrets, node_id)
    new_url = body.url if body.url is not None else url
    new_token = body.token if body.token is not None else token
    version = inventory.check_node(new_url, new_token) if body.verify else None
    with st.db.session() as s:
        inventory.update_node(
            s, st.secrets, node_id, url=body.url, token=body.token, verified=body.verify
        )
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
