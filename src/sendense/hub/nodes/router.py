"""/api/v1/nodes: HTTP only; rules in service.py."""

from __future__ import annotations

from fastapi import APIRouter, Path, Query

from sendense.hub.deps import Admin, HubDep, Viewer
from sendense.hub.nodes import service
from sendense.hub.nodes.schemas import NodeCreate, NodeList, NodeRead, NodeRemoved, NodeUpdate
from sendense.hub.openapi import errors

router = APIRouter(prefix="/api/v1/nodes", tags=["nodes"])

NodeId = Path(max_length=36, description="The node's id (from GET /api/v1/nodes)")


@router.post("", status_code=201, response_model=NodeRead, responses=errors(409, 413))
def create_node(body: NodeCreate, st: HubDep, who: Admin) -> dict:
    """Register a node. Unless ``verify`` is false the hub first reaches it and
    checks its token (400 ``node_auth`` / ``node_unreachable`` otherwise).

    An ``https://`` node's certificate is pinned: the hub reads what the node
    presents and compares its SHA-256 with ``fingerprint`` (400
    ``fingerprint_mismatch`` with ``details.expected`` and
    ``details.presented``); without ``fingerprint``, 400
    ``fingerprint_required`` with ``details.fingerprint`` = the presented one,
    to check and send back. ``http://`` is accepted for loopback hosts only
    (400 ``plain_http_refused``, checked before any connection) unless the
    hub's ``SENDENSE_ALLOW_PLAIN_HTTP_NODES`` is true."""
    return service.create_node(st, body)


@router.get("", response_model=NodeList, responses=errors())
def list_nodes(st: HubDep, who: Viewer) -> dict:
    """Nodes with their health as last probed in the background (never waits
    for a node: ``health.age_seconds`` says how old the answer is). A scoped
    token sees none: nodes belong to no tenant."""
    return {"nodes": service.list_nodes(st, who)}


@router.get("/{node_id}", response_model=NodeRead, responses=errors(404))
def get_node(st: HubDep, who: Viewer, node_id: str = NodeId) -> dict:
    return service.get_node(st, node_id, who)


@router.patch("/{node_id}", response_model=NodeRead, responses=errors(404, 413))
def update_node(body: NodeUpdate, st: HubDep, who: Admin, node_id: str = NodeId) -> dict:
    """Fix a node's URL or token, or re-pin its certificate after the node
    got a new one (``fingerprint``: pinned if the node presents a certificate
    with that SHA-256, else 400 ``fingerprint_mismatch``). Checked against the
    node unless ``verify`` is false. Jobs started afterwards use the new
    values."""
    return service.update_node(st, node_id, body)


@router.delete("/{node_id}", response_model=NodeRemoved, responses=errors(404, 409))
def delete_node(
    st: HubDep,
    who: Admin,
    node_id: str = NodeId,
    cascade: bool = Query(
        default=False, description="Also remove the node's sources and their VMs"
    ),
) -> dict:
    """Remove a node. 409 ``has_sources`` naming its sources (unless
    ``cascade``), ``in_use`` while jobs run on it, ``has_backups`` naming the
    VMs that have restore points (nothing is removed then)."""
    return service.delete_node(st, node_id, cascade=cascade)
