"""TCP port allocator for the hub's NBD targets.

Ports come from a configured range (default 10100-10200). A port is handed
out only if nothing listens on it (checked by binding), and it is held by the
allocator until released, so two jobs never get the same port.

Given the catalog (``db``: several hubs on one PostgreSQL), a port is also
claimed in table ``nbd_ports`` by inserting the row ``(host, port)``: the
primary key lets one hub process win, so two hub processes on one host never
hand out the same port even before either has bound it. The claims carry the
owner (the lifecycle owner string) and a lease, renewed with the job leases
(`renew`); a hub that took over a job takes over its ports with it
(`reserve`), and the claims of a hub that died are released once it is known
dead and their lease has expired (`release_dead`).

Without the catalog (SQLite: one hub), the allocator is process-local; ports
of jobs that a crashed hub left behind are free again once their qemu-nbd
processes are stopped at recovery. The API worker processes of one hub
(hub/serve.py) each take every ``stride``-th port of the range from
``offset`` on, so two of them never hand out the same port.
"""

from __future__ import annotations

import logging
import socket
import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from sendense.catalog.db import Database
from sendense.catalog.models import NbdPort
from sendense.core.errors import PortsExhausted
from sendense.engine import hubs

log = logging.getLogger(__name__)


class PortAllocator:
    def __init__(
        self,
        first: int = 10100,
        last: int = 10200,
        host: str = "127.0.0.1",
        *,
        stride: int = 1,
        offset: int = 0,
        db: Database | None = None,
        owner: str = "",
        lease_seconds: float = 30.0,
    ) -> None:
        if not 0 < first <= last < 65536:
            raise ValueError(f"bad port range {first}-{last}")
        if not 0 <= offset < stride or first + offset > last:
            raise ValueError(
                f"port range {first}-{last} is too small for {stride} hub worker processes"
            )
        self.first = first
        self.last = last
        self.host = host
        self.stride = stride
        self.offset = offset
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._next = first
        if db is not None and not owner:
            raise ValueError("ports claimed in the catalog need the owner")
        self.db = db
        self.owner = owner
        self.lease = timedelta(seconds=lease_seconds)
        # The machine's name: ports are per machine, whatever address binds.
        self.machine = socket.gethostname()

    def allocate(self, backup_id: str | None = None) -> int:
        with self._lock:
            size = self.last - self.first + 1
            claimed = self._claimed()
            for i in range(size):
                port = self.first + (self._next - self.first + i) % size
                if (port - self.first) % self.stride != self.offset:
                    continue  # another worker process's share of the range
                if port in self._held or port in claimed or not self._bindable(port):
                    continue
                if not self._claim(port, backup_id):
                    continue  # another hub process got it first
                self._held.add(port)
                self._next = port + 1 if port < self.last else self.first
                return port
        raise PortsExhausted(
            f"no free NBD port in {self.first}-{self.last}: "
            f"{len(self._held)} held by this hub's jobs, "
            f"{len(claimed - self._held)} by other hub processes on this host, "
            "the rest in use by other programs",
            first=self.first,
            last=self.last,
        )

    def reserve(self, port: int, backup_id: str | None = None) -> None:
        """Hold a port already in use by a target this hub adopted after a
        restart (or took over from a dead hub): its claim becomes ours, unless
        a live hub process holds it (then it is left alone, and serving the
        target again on it fails with a reason)."""
        with self._lock:
            self._held.add(port)
            if self.db is None:
                return
            now = datetime.now(UTC)
            with self.db.session() as s:
                row = s.get(NbdPort, (self.machine, port))
                if row is not None and row.owner != self.owner:
                    seen = hubs.seen(s, [row.owner])
                    if hubs.is_dead(row.owner, seen.get(row.owner), self.lease, now) is False:
                        log.warning(
                            "NBD port %d is claimed by the live hub process %s: not taken",
                            port,
                            row.owner,
                        )
                        return
                if row is None:
                    s.add(
                        NbdPort(
                            host=self.machine,
                            port=port,
                            owner=self.owner,
                            backup_id=backup_id,
                            lease_until=now + self.lease,
                        )
                    )
                else:
                    row.owner = self.owner
                    row.lease_until = now + self.lease
                    row.backup_id = backup_id or row.backup_id

    def release(self, port: int | None) -> None:
        if port is None:
            return
        with self._lock:
            self._held.discard(port)
            if self.db is None:
                return
            with self.db.session() as s:
                s.execute(
                    delete(NbdPort).where(
                        NbdPort.host == self.machine,
                        NbdPort.port == port,
                        NbdPort.owner == self.owner,
                    )
                )

    def renew(self) -> int:
        """Extend the lease of this process's claims (with its job leases)."""
        if self.db is None:
            return 0
        with self.db.session() as s:
            result = s.execute(
                update(NbdPort)
                .where(NbdPort.owner == self.owner)
                .values(lease_until=datetime.now(UTC) + self.lease)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def release_dead(self) -> list[tuple[str, int, str]]:
        """Remove the claims of hub processes that are gone (any host):
        known dead (engine/hubs.py), or unknown with their lease expired.
        Returns (host, port, old owner) of each claim removed."""
        if self.db is None:
            return []
        now = datetime.now(UTC)
        with self.db.session() as s:
            rows = s.execute(
                select(NbdPort.host, NbdPort.port, NbdPort.owner, NbdPort.lease_until).where(
                    NbdPort.owner != self.owner
                )
            ).all()
            if not rows:
                return []
            seen = hubs.seen(s, {r.owner for r in rows})
        gone = []
        for host, port, owner, lease_until in rows:
            dead = hubs.is_dead(owner, seen.get(owner), self.lease, now)
            if dead is False or (dead is None and lease_until >= now):
                continue
            with self.db.session() as s:
                result = s.execute(
                    delete(NbdPort).where(
                        NbdPort.host == host, NbdPort.port == port, NbdPort.owner == owner
                    )
                )
                if getattr(result, "rowcount", 0):
                    gone.append((host, port, owner))
        if gone:
            log.warning("released NBD ports of hub processes that are gone: %s", gone)
        return gone

    def _claimed(self) -> set[int]:
        """Ports of this host other hub processes claim in the catalog."""
        if self.db is None:
            return set()
        with self.db.session() as s:
            return set(
                s.scalars(
                    select(NbdPort.port).where(
                        NbdPort.host == self.machine,
                        NbdPort.port.between(self.first, self.last),
                        NbdPort.owner != self.owner,
                    )
                )
            )

    def _claim(self, port: int, backup_id: str | None) -> bool:
        """Insert the claim; False when another process holds the row."""
        if self.db is None:
            return True
        try:
            with self.db.session() as s:
                s.add(
                    NbdPort(
                        host=self.machine,
                        port=port,
                        owner=self.owner,
                        backup_id=backup_id,
                        lease_until=datetime.now(UTC) + self.lease,
                    )
                )
        except IntegrityError:
            return False
        return True

    @property
    def held(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._held)

    def _bindable(self, port: int) -> bool:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # qemu-nbd binds with SO_REUSEADDR, so a port in TIME_WAIT is usable.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((self.host, port))
            return True
        except OSError:
            return False
        finally:
            s.close()
