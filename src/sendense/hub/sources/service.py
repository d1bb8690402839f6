"""Sources: hypervisor endpoints, credentials encrypted at rest."""

from __future__ import annotations

from typing import Any

from sendense.catalog.stores import SourceStore
from sendense.core.access import Principal
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


def list_sources(st: HubState, who: Principal) -> list[dict[str, Any]]:
    """A scoped token sees none: a source's config names VMs of any tenant."""
    if who.scoped:
        return []
    with st.db.session() as s:
        return [source_view(x) for x in SourceStore(s).all()]


def delete_source(st: HubState, source_id: str) -> dict[str, Any]:
    with st.db.session() as s:
        removed = inventory.remove_source(s, source_id)
    return {k: removed[k] for k in ("source_id", "name", "vms", "backup_records")}
