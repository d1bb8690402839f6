"""The audit log: newest first, filtered."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sendense.catalog.models import AuditEntry
from sendense.catalog.stores import AuditStore
from sendense.hub.state import HubState


def entry_view(e: AuditEntry) -> dict[str, Any]:
    return {
        "entry_id": e.id,
        "at": e.at,
        "token_id": e.token_id,
        "token_name": e.token_name,
        "method": e.method,
        "route": e.route,
        "path": e.path,
        "target": e.target or {},
        "status": e.status,
        "client": e.client,
    }


def list_entries(
    st: HubState,
    *,
    token: str | None,
    route: str | None,
    method: str | None,
    status: int | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    offset: int,
) -> dict[str, Any]:
    if st.audit is not None:
        st.audit.flush()  # what was done before this request is in the answer
    with st.db.session() as s:
        rows, total = AuditStore(s).list(
            token=token,
            route=route,
            method=method,
            status=status,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
        )
        return {"entries": [entry_view(e) for e in rows], "total": total}
