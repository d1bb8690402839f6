"""Catalog queries, one module per table. Services call these; nothing else
writes SQL. Stores take a `Session` and never commit: the caller's
``Database.session()`` is the transaction."""

from sendense.catalog.stores.audit import AuditStore
from sendense.catalog.stores.backups import BackupStore
from sendense.catalog.stores.common import ACTIVE
from sendense.catalog.stores.jobs import JobStore
from sendense.catalog.stores.nodes import NodeStore
from sendense.catalog.stores.repositories import RepositoryStore
from sendense.catalog.stores.sources import SourceStore
from sendense.catalog.stores.tokens import TokenStore
from sendense.catalog.stores.vms import VmStore, disk_of

__all__ = [
    "ACTIVE",
    "AuditStore",
    "BackupStore",
    "JobStore",
    "NodeStore",
    "RepositoryStore",
    "SourceStore",
    "TokenStore",
    "VmStore",
    "disk_of",
]
