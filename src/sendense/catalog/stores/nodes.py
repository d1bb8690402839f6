"""Queries of the nodes table(s)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from sendense.catalog.models import Node


class NodeStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, node_id: str) -> Node | None:
        return self.s.get(Node, node_id)

    def by_name(self, name: str) -> Node | None:
        return self.s.scalar(select(Node).where(Node.name == name))

    def all(self) -> Sequence[Node]:
        return self.s.scalars(select(Node).order_by(Node.name)).all()
