"""Nodes: registration and health."""

from __future__ import annotations

from typing import Any

from sendense.catalog.stores import NodeStore
from sendense.engine import inventory
from sendense.hub.nodes.schemas import NodeCreate
from sendense.hub.state import HubState
from sendense.hub.views import node_view


def create_node(st: HubState, body: NodeCreate) -> dict[str, Any]:
    with st.db.session() as s:
        node = inventory.register_node(
            s, st.secrets, body.name, body.url, body.token, verify=body.verify
        )
        return node_view(node)


def list_nodes(st: HubState) -> list[dict[str, Any]]:
    with st.db.session() as s:
        return [node_view(n, inventory.node_health(n, st.secrets)) for n in NodeStore(s).all()]
