"""Queries of the nodes table(s)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from sendense.catalog.models import BackupJob, Node


class NodeStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, node_id: str) -> Node | None:
        return self.s.get(Node, node_id)

    def by_name(self, name: str) -> Node | None:
        return self.s.scalar(select(Node).where(Node.name == name))

    def all(self) -> Sequence[Node]:
        return self.s.scalars(select(Node).order_by(Node.name)).all()

    def drop(self, node: Node) -> None:
        """Remove a node (its sources first); ended jobs keep their history
        without it."""
        self.s.execute(update(BackupJob).where(BackupJob.node_id == node.id).values(node_id=None))
        self.s.delete(node)
