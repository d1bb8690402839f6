"""VMs: discovery and what a caller may see of them."""

from __future__ import annotations

import threading
import uuid
import weakref
from typing import Any

from pydantic_core import to_json

from sendense.catalog.db import Database
from sendense.catalog.models import Vm
from sendense.catalog.stores import BackupStore, VmStore
from sendense.catalog.topics import changed_vms, topic_counter, topic_version
from sendense.core.access import Principal
from sendense.core.errors import NotFound
from sendense.engine import inventory
from sendense.hub.state import HubState
from sendense.hub.views import vm_view


def discover(st: HubState, source_id: str) -> list[dict[str, Any]]:
    with st.db.session() as s:
        return [vm_view(v) for v in inventory.discover(s, st.secrets, source_id)]


def list_vms_json(
    st: HubState,
    who: Principal,
    *,
    limit: int | None = None,
    offset: int = 0,
    name: str | None = None,
) -> bytes:
    """``{"vms": [...], "total": n}`` as JSON: the VMs the caller may see
    (whose name contains ``name``, any case), by name, with their disks and
    last backup; ``total`` counts them all, ``limit``/``offset`` take a page
    (without ``limit``: all of them, as the first API answered).

    A page reads only its VMs, their disks and their last backups. Each
    answer is kept (catalog/cache.py, one entry per scope, filter and page)
    with the version of the catalog topic ``vms`` (catalog/topics.py), which
    only the rows it shows move: it survives the progress, lease and job
    writes of running backups, which used to drop it on every commit (5,000
    VMs: an 8 MB answer rebuilt for nearly every request, see issue 12). The
    whole list (no scope, filter or page) is rebuilt from the VMs that
    changed (`WholeList`).
    """
    # Reads only (autocommit on PostgreSQL): each statement sees at least
    # what the topic's version read first stands for (catalog/topics.py).
    with st.db.read() as s:
        counter = topic_counter(s, "vms")
        if counter is not None and who.scope is None and not name and not limit and not offset:
            return _whole_list(st.db).answer(s, counter)
        return st.cache.get(
            ("vms", who.scope, name or None, limit, offset),
            lambda: to_json(_answer(s, who, name, limit, offset)),
            uuid.uuid4().hex if counter is None else f"vms:{counter}",
        )


class WholeList:
    """Every VM's JSON (``GET /vms`` unscoped, unpaged), kept as one fragment
    per VM and rebuilt from the VMs that changed.

    With backups completing every second or so, topic ``vms`` moves about as
    often, and building the answer of 5,000 VMs from scratch costs 0.3-0.5 s
    of CPU on PostgreSQL (rows, their views, JSON; measured on the load
    bench's catalog). ``vm_changes`` names the VMs whose rows changed since
    the version the fragments were built at (catalog/topics.py); only those
    are read again, and the answer is the fragments joined, by name. More
    than `REBUILD_AT` changed VMs (or a catalog that went back in version):
    rebuilt from scratch. One per catalog and process.
    """

    REBUILD_AT = 500

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.version: int | None = None
        self._fragments: dict[str, tuple[str, bytes]] = {}  # vm id -> (name, JSON)
        self._order: list[str] = []  # vm ids by name
        self._body = b""
        self.hits = self.updates = self.rebuilds = 0

    def answer(self, s: Any, counter: int) -> bytes:
        """The answer at ``counter`` (read before anything else in ``s``)."""
        with self._lock:
            if counter == self.version:
                self.hits += 1
                return self._body
            try:
                return self._build(s, counter)
            except BaseException:
                self.version = None  # half-updated: from scratch next time
                raise

    def _build(self, s: Any, counter: int) -> bytes:
        changed = None
        if self.version is not None and counter > self.version:
            changed = changed_vms(s, self.version)
            if len(changed) > self.REBUILD_AT:
                changed = None
        store = VmStore(s)
        if changed is None:
            self.rebuilds += 1
            self._fragments.clear()
            rows = store.rows()
        else:
            self.updates += 1
            rows = store.rows(ids=changed) if changed else []
        ids = None if changed is None else [v.id for v in rows]
        disks: dict[str, list[Any]] = {}
        if rows:
            for d in store.disk_rows(ids):
                disks.setdefault(d.vm_id, []).append(d)
        latest = BackupStore(s).latest_rows(ids) if rows else {}
        # The order is the database's (its collation, as pages have it):
        # read again when a VM came, went or was renamed.
        reorder = changed is None or len(rows) != len(changed)
        for v in rows:
            old = self._fragments.get(v.id)
            reorder = reorder or old is None or old[0] != v.name
            view = vm_view(v, latest.get(v.id), disks.get(v.id, []))
            self._fragments[v.id] = (v.name, to_json(view))
        if changed is None:
            self._order = [v.id for v in rows]
        elif reorder:
            for vm_id in set(changed) - {v.id for v in rows}:
                self._fragments.pop(vm_id, None)  # deleted
            self._order = [vm_id for vm_id in store.ids_by_name() if vm_id in self._fragments]
        self._body = b"".join(
            (
                b'{"vms":[',
                b",".join(self._fragments[vm_id][1] for vm_id in self._order),
                b'],"total":%d}' % len(self._order),
            )
        )
        # Rows read after ``counter`` may be newer: the next change after
        # it rebuilds them again, never the other way round.
        self.version = counter
        return self._body


_whole_lists: weakref.WeakKeyDictionary[Database, WholeList] = weakref.WeakKeyDictionary()
_whole_lists_lock = threading.Lock()


def _whole_list(db: Database) -> WholeList:
    with _whole_lists_lock:
        whole = _whole_lists.get(db)
        if whole is None:
            whole = _whole_lists[db] = WholeList()
        return whole


def list_vms(
    st: HubState,
    who: Principal,
    *,
    limit: int | None = None,
    offset: int = 0,
    name: str | None = None,
    text: str | None = None,
) -> dict[str, Any]:
    """The same as a dict (kept as `list_vms_json` keeps its bytes: do not
    change it); ``text`` (the console's search) also matches ``key=value``
    of the tags, which only Python can check."""
    with st.db.read() as s:
        version = topic_version(s, "vms")
        return st.cache.get(
            ("vms.dict", who.scope, name or None, text or None, limit, offset),
            lambda: _answer(s, who, name, limit, offset, text),
            version,
        )


def _answer(
    s: Any,
    who: Principal,
    name: str | None,
    limit: int | None,
    offset: int,
    text: str | None = None,
) -> dict[str, Any]:
    store = VmStore(s)
    end = None if limit is None else offset + limit
    if who.scope is None and not text:
        total = store.count(name)
        if offset == 0 and limit is None:
            vms = store.rows(name)
        elif limit is not None and offset >= total:
            vms = []
        else:
            vms = store.rows(name, limit=limit, offset=offset)
    else:
        # A scope (names, tags) is checked in Python: on the keys of every
        # VM (id, name, tags), then only the page's rows are read.
        keys = [k for k in store.keys(name) if _matches(who, k, text)]
        total = len(keys)
        page = [k.id for k in keys[offset:end]]
        vms = store.rows(ids=page) if page else []
    whole = offset == 0 and limit is None and not name and who.scope is None and not text
    # The whole catalog: one scan of each table beats 5,000 ids in an IN list.
    ids = None if whole else [v.id for v in vms]
    disks: dict[str, list[Any]] = {}
    if vms:
        for d in store.disk_rows(ids):
            disks.setdefault(d.vm_id, []).append(d)
    latest = BackupStore(s).latest_rows(ids, scope_repositories(who)) if vms else {}
    return {
        "vms": [vm_view(v, latest.get(v.id), disks.get(v.id, [])) for v in vms],
        "total": total,
    }


def _matches(who: Principal, key: Any, text: str | None) -> bool:
    if not who.can_see_vm(key.name, key.tags):
        return False
    if not text:
        return True
    needle = text.lower()
    return needle in key.name.lower() or any(
        needle in f"{k}={v}".lower() for k, v in (key.tags or {}).items()
    )


def scope_repositories(who: Principal) -> list[str] | None:
    """The repositories a scoped caller may see (None: all of them)."""
    return None if who.scope is None else sorted(who.scope.repositories)


def visible_vm(s: Any, who: Principal, vm_name: str) -> Vm:
    """The VM by name, or NotFound (also when the caller's scope hides it)."""
    vm = VmStore(s).by_name(vm_name)
    if vm is None or not who.can_see_vm(vm.name, vm.tags):
        raise NotFound(f"VM {vm_name} not found", vm_name=vm_name)
    return vm


def get_vm(st: HubState, who: Principal, vm_name: str) -> dict[str, Any]:
    with st.db.session() as s:
        vm = visible_vm(s, who, vm_name)
        return vm_view(vm, BackupStore(s).latest_for_vm(vm.id, scope_repositories(who)))


def update_vm(st: HubState, who: Principal, vm_name: str, tags: dict[str, str]) -> dict[str, Any]:
    """Replace the VM's tags. The commit bumps the catalog topic ``vms``, so
    the cached ``GET /vms`` answers are rebuilt (catalog/topics.py)."""
    with st.db.session() as s:
        vm = visible_vm(s, who, vm_name)
        vm.tags = dict(tags)  # a new object: the JSON column sees the change
    return get_vm(st, who, vm_name)
