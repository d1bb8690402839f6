"""A small synchronous QMP client over a unix socket.

QMP is line-delimited JSON: a greeting, ``qmp_capabilities``, then one
``{"execute": ...}`` per request. Asynchronous events may arrive between a
request and its answer; they are kept in `events` for callers that wait for
one (block job completion, for example).

A message is read up to its newline, so a peer that never sends one (not a
QMP monitor, or a broken one) could make the buffer grow without end. A
message longer than `MAX_MESSAGE` is refused: 10 MiB, the limit libvirt puts
on a QEMU monitor reply (``QEMU_MONITOR_MAX_RESPONSE``, src/qemu/qemu_monitor.c)
and QEMU's own Python client on its read buffer (``qemu.qmp.QMPClient``).
The largest answers we ask for, ``query-named-block-nodes`` and
``query-block`` of a VM with many disks and bitmaps, stay far below that.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
from typing import Any

from sendense.core.errors import QmpError

log = logging.getLogger(__name__)

MAX_MESSAGE = 10 << 20


class QmpClient:
    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline

    def connect(self) -> QmpClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise QmpError(f"cannot connect to QMP socket {self.path}: {e.strerror or e}") from e
        self._sock = sock
        try:
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmpError(f"{self.path} did not greet as a QMP monitor")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()  # __exit__ does not run when __enter__ raised
            raise
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf.clear()
        self._scanned = 0

    def __enter__(self) -> QmpClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def peer_pid(self) -> int:
        """The pid of the QEMU process at the other end (SO_PEERCRED)."""
        assert self._sock is not None
        creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _uid, _gid = struct.unpack("3i", creds)
        return int(pid)

    def _read(self) -> dict[str, Any]:
        """The next message (one line of JSON), at most `MAX_MESSAGE` bytes."""
        assert self._sock is not None
        while (end := self._buf.find(b"\n", self._scanned)) < 0:
            self._scanned = len(self._buf)
            if len(self._buf) > MAX_MESSAGE:
                self.close()  # the stream is out of step: no later message is whole
                raise QmpError(
                    f"QMP socket {self.path}: a message exceeded {MAX_MESSAGE} bytes "
                    "without its end of line (not a QMP monitor?)"
                )
            try:
                chunk = self._sock.recv(65536)
            except OSError as e:
                raise QmpError(f"QMP socket {self.path}: {e}") from e
            if not chunk:
                raise QmpError(f"QMP socket {self.path} closed by QEMU")
            self._buf += chunk
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        self._scanned = 0
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise QmpError(f"QMP socket {self.path}: not a JSON message: {e}") from e
        if not isinstance(msg, dict):
            raise QmpError(f"QMP socket {self.path}: not a JSON object: {line[:80]!r}")
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        if self._sock is None:
            raise QmpError("QMP client is not connected")
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        log.debug("qmp execute=%s", command)
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as e:
            raise QmpError(f"QMP socket {self.path}: {e}") from e
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                err = msg["error"]
                raise QmpError(
                    f"QMP {command} failed: {err.get('desc', err)}",
                    qmp_class=err.get("class"),
                    command=command,
                )
            return msg.get("return")

    def wait_event(self, name: str, *, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                data = ev.get("data", {})
                if ev["event"] == name and all(data.get(k) == v for k, v in match.items()):
                    return self.events.pop(i)
            if time.monotonic() > deadline:
                raise QmpError(f"timed out waiting for QMP event {name}")
            assert self._sock is not None
            self._sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                self.events.append(self._read())
            except QmpError as e:
                # Only a receive timeout is worth another look at the deadline.
                if not isinstance(e.__cause__, TimeoutError) or time.monotonic() > deadline:
                    raise
            finally:
                if self._sock is not None:
                    self._sock.settimeout(self.timeout)
