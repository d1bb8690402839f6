"""/api/v1/nodes: HTTP only; rules in service.py."""

from __future__ import annotations

from fastapi import APIRouter

from sendense.hub.deps import Admin, HubDep, Viewer
from sendense.hub.nodes import service
from sendense.hub.nodes.schemas import NodeCreate, NodeList, NodeRead
from sendense.hub.openapi import errors

router = APIRouter(prefix="/api/v1/nodes", tags=["nodes"])


@router.post("", status_code=201, response_model=NodeRead, responses=errors(409, 503))
def create_node(body: NodeCreate, st: HubDep, who: Admin) -> dict:
    return service.create_node(st, body)


@router.get("", response_model=NodeList, responses=errors())
def list_nodes(st: HubDep, who: Viewer) -> dict:
    return {"nodes": service.list_nodes(st)}
