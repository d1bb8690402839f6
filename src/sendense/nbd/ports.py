"""TCP port allocator for the hub's NBD targets.

Ports come from a configured range (default 10100-10200). A port is handed
out only if nothing listens on it (checked by binding), and it is held by the
allocator until released, so two jobs never get the same port. The allocator
is process-local; ports of jobs that a crashed hub left behind are free again
once their qemu-nbd processes are stopped at recovery. The API worker
processes of one hub (hub/serve.py) each take every ``stride``-th port of the
range from ``offset`` on, so two of them never hand out the same port.
"""

from __future__ import annotations

import socket
import threading

from sendense.core.errors import PortsExhausted


class PortAllocator:
    def __init__(
        self,
        first: int = 10100,
        last: int = 10200,
        host: str = "127.0.0.1",
        *,
        stride: int = 1,
        offset: int = 0,
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

    def allocate(self) -> int:
        with self._lock:
            size = self.last - self.first + 1
            for i in range(size):
                port = self.first + (self._next - self.first + i) % size
                if (port - self.first) % self.stride != self.offset:
                    continue  # another worker process's share of the range
                if port in self._held or not self._bindable(port):
                    continue
                self._held.add(port)
                self._next = port + 1 if port < self.last else self.first
                return port
        raise PortsExhausted(
            f"no free NBD port in {self.first}-{self.last}: "
            f"{len(self._held)} held by running jobs, the rest in use by other programs",
            first=self.first,
            last=self.last,
        )

    def reserve(self, port: int) -> None:
        """Hold a port already in use by a target this hub adopted after a restart."""
        with self._lock:
            self._held.add(port)

    def release(self, port: int | None) -> None:
        if port is None:
            return
        with self._lock:
            self._held.discard(port)

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
