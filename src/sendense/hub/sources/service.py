"""Sources: hypervisor endpoints, credentials encrypted at rest."""

from __future__ import annotations

from typing import Any

from sendense.catalog.stores import SourceStore
from sendense.engine import inventory
from sendense.hub.sources.schemas import SourceCreate
from sendense.hub.state import HubState
from sendense.hub.views import source_view


def create_source(st: HubState, body: SourceCreate) -> dict[str, Any]:
    with st.db.session() as s:
        src = inventory.register_source(
            s, st.secrets, body.name, body.node_id, body.type, body.config
        )
        return source_view(src)


def list_sources(st: HubState) -> list[dict[str, Any]]:
    with st.db.session() as s:
        return [source_view(x) for x in SourceStore(s).all()]
