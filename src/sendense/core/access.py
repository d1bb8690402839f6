"""Who may do what: roles and tenant scopes (no I/O).

Roles are ordered: ``viewer`` reads; ``operator`` also starts and cancels
backups, verifies and restores; ``admin`` does everything (repositories,
nodes, sources, tokens, deletes, consolidation).

A scope limits a token to some VMs (by name, or ``tag:key=value``) and some
repositories. Anything outside it is answered 404, as if it did not exist: a
managed-service customer must not learn other customers' VM names.

A scoped token is at most an ``operator`` (`SCOPED_ROLE_MAX`): deletes,
consolidation, repositories, nodes, sources and tokens stay with unscoped
administrators, so a tenant's leaked token can read and back up its own VMs
but never destroy a restore point or reach what is shared between tenants.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    viewer = "viewer"
    operator = "operator"
    admin = "admin"

    @property
    def rank(self) -> int:
        return ROLE_ORDER.index(self)

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


ROLE_ORDER = (Role.viewer, Role.operator, Role.admin)
SCOPED_ROLE_MAX = Role.operator
"""The highest role a scoped token can have (the API refuses more with 400)."""


@dataclass(frozen=True)
class Scope:
    """What a scoped token may see. Empty ``repositories``: none of them."""

    vm_names: frozenset[str] = frozenset()
    vm_tags: tuple[tuple[str, str], ...] = ()
    repositories: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Scope:
        names: set[str] = set()
        tags: list[tuple[str, str]] = []
        for item in data.get("vms") or []:
            if item.startswith("tag:"):
                key, _, value = item[4:].partition("=")
                tags.append((key, value))
            else:
                names.add(item)
        return cls(frozenset(names), tuple(tags), frozenset(data.get("repositories") or []))

    def to_dict(self) -> dict[str, list[str]]:
        """The stored / answered form, ``{"vms": [...], "repositories": [...]}``."""
        vms = sorted(self.vm_names) + [f"tag:{k}={v}" for k, v in self.vm_tags]
        return {"vms": vms, "repositories": sorted(self.repositories)}

    def allows_vm(self, name: str, tags: Mapping[str, Any] | None) -> bool:
        if name in self.vm_names:
            return True
        tags = tags or {}
        return any(str(tags.get(k)) == v for k, v in self.vm_tags if k in tags)

    def allows_repository(self, repository_id: str | None) -> bool:
        return repository_id is not None and repository_id in self.repositories


@dataclass(frozen=True)
class Principal:
    """The caller of a request, from its bearer token."""

    name: str
    role: Role
    token_id: str | None = None  # None: the bootstrap admin token
    scope: Scope | None = field(default=None)

    @property
    def scoped(self) -> bool:
        return self.scope is not None

    def can_see_vm(self, name: str, tags: Mapping[str, Any] | None) -> bool:
        return self.scope is None or self.scope.allows_vm(name, tags)

    def can_see_repository(self, repository_id: str | None) -> bool:
        return self.scope is None or self.scope.allows_repository(repository_id)

    def visible_vm_ids(self, vms: Iterable[tuple[str, str, Mapping[str, Any] | None]]) -> set[str]:
        """Ids among (id, name, tags) rows this principal may see."""
        return {vm_id for vm_id, name, tags in vms if self.can_see_vm(name, tags)}


ADMIN = Principal(name="admin", role=Role.admin)
