"""Repositories: where restore points live, and their capacity."""

from __future__ import annotations

from typing import Any

from sendense.catalog.stores import RepositoryStore
from sendense.core.access import Principal
from sendense.engine import inventory
from sendense.hub.state import HubState
from sendense.hub.views import repository_view


def list_repositories(st: HubState, who: Principal) -> list[dict[str, Any]]:
    with st.db.session() as s:
        return [
            repository_view(r, inventory.repository_capacity(r))
            for r in RepositoryStore(s).all()
            if who.can_see_repository(r.id)
        ]
