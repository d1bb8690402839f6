"""The hub's side of the filesystem workers (imports no parser).

`FsWorker` owns one worker process reading one disk; `FsPool` spreads
requests over a few of them for one disk (each worker serves one request at
a time). Both answer the same calls::

    partitions() -> list[FsPartition]
    list_dir(partition, path, offset=0, limit=1000, show_system=False) -> FsListing
    stat(partition, path, follow=False) -> FsEntry
    read(partition, path, offset, length) -> bytes          # one piece, <= 16 MiB
    iter_file(partition, path, offset=0, length=None) -> Iterator[bytes]
    walk(partition, path) -> Iterator[FsEntry]              # depth first, links not followed

Limits: the worker's address space is capped (`WorkerLimits.memory`) and
every request has a deadline (`WorkerLimits.request_timeout`); a worker
past its deadline is killed. Either way the request fails with
`ParserLimit`; a corrupt filesystem fails it with `FilesystemCorrupt`; and
the next request starts a fresh worker (``restarts`` counts them).
Requests for bad paths fail with `PathRefused`, `FsPathNotFound`,
`NotADirectory`, `NotAFile`, `PartitionNotFound` or `NoFilesystem` and
leave the worker as it was.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sendense.core import errors
from sendense.restore.fs.models import (
    EXIT_MEMORY,
    FsEntry,
    FsListing,
    FsPartition,
    WorkerProtocolError,
)
from sendense.restore.fs.paths import shown

log = logging.getLogger(__name__)

READ_PIECE = 4 * 1024 * 1024
WALK_PAGE = 1000
WALK_MAX_DEPTH = 256

_REQUEST_ERRORS: dict[str, type[errors.Error]] = {
    "path_refused": errors.PathRefused,
    "path_not_found": errors.FsPathNotFound,
    "not_a_directory": errors.NotADirectory,
    "not_a_file": errors.NotAFile,
    "partition_not_found": errors.PartitionNotFound,
    "no_filesystem": errors.NoFilesystem,
    "filesystem_corrupt": errors.FilesystemCorrupt,
    "parser_limit": errors.ParserLimit,
}


@dataclass(frozen=True)
class WorkerLimits:
    memory: int = 1024 * 1024 * 1024  # RLIMIT_AS of the worker, bytes
    request_timeout: float = 60.0  # seconds for one request (a listing page, a read piece)
    start_timeout: float = 30.0


class _FsCalls:
    """The calls, on top of one ``_request``."""

    def _request(self, req: dict[str, Any]) -> tuple[Any, bytes | None]:
        raise NotImplementedError

    def partitions(self) -> list[FsPartition]:
        result, _ = self._request({"op": "partitions"})
        if not isinstance(result, list):
            raise WorkerProtocolError("partitions: not a list")
        return [FsPartition.from_wire(p) for p in result]

    def list_dir(
        self,
        partition: int,
        path: str,
        *,
        offset: int = 0,
        limit: int = 1000,
        show_system: bool = False,
    ) -> FsListing:
        result, _ = self._request(
            {
                "op": "list",
                "partition": partition,
                "path": path,
                "offset": offset,
                "limit": limit,
                "show_system": show_system,
            }
        )
        if not isinstance(result, dict) or not isinstance(result.get("entries"), list):
            raise WorkerProtocolError("list: not a listing")
        for key in ("total", "offset"):
            if not isinstance(result.get(key), int):
                raise WorkerProtocolError(f"list: {key} is not an integer")
        if not isinstance(result.get("path"), str):
            raise WorkerProtocolError("list: path is not a string")
        return FsListing(
            path=result["path"],
            total=result["total"],
            offset=result["offset"],
            entries=[FsEntry.from_wire(e) for e in result["entries"]],
        )

    def stat(self, partition: int, path: str, *, follow: bool = False) -> FsEntry:
        result, _ = self._request(
            {"op": "stat", "partition": partition, "path": path, "follow": follow}
        )
        return FsEntry.from_wire(result)

    def read(self, partition: int, path: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes (at most 16 MiB) of a file from ``offset``,
        symlinks followed inside the filesystem; fewer only at its end."""
        _, data = self._request(
            {"op": "read", "partition": partition, "path": path, "offset": offset, "length": length}
        )
        return data or b""

    def iter_file(
        self,
        partition: int,
        path: str,
        *,
        offset: int = 0,
        length: int | None = None,
        piece: int = READ_PIECE,
    ) -> Iterator[bytes]:
        """A file (or the range ``offset``, ``length`` of it) in pieces: one
        bounded request each, so a reader that stops early costs one piece."""
        end = None if length is None else offset + length
        while end is None or offset < end:
            want = piece if end is None else min(piece, end - offset)
            data = self.read(partition, path, offset, want)
            if not data:
                return
            yield data
            offset += len(data)
            if len(data) < want:
                return

    def walk(
        self, partition: int, path: str, *, max_depth: int = WALK_MAX_DEPTH
    ) -> Iterator[FsEntry]:
        """Every entry under the directory ``path``, depth first, in name
        order; symlinks are yielded as links, never followed. Directories
        deeper than ``max_depth`` are yielded but not entered (a hostile
        filesystem can loop a directory into itself)."""
        stack: list[tuple[Iterator[FsEntry], int]] = [(self._entries(partition, path), 1)]
        while stack:
            entries, depth = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            yield entry
            if entry.type == "dir" and depth < max_depth:
                stack.append((self._entries(partition, entry.path), depth + 1))

    def _entries(self, partition: int, path: str) -> Iterator[FsEntry]:
        offset = 0
        while True:
            page = self.list_dir(partition, path, offset=offset, limit=WALK_PAGE)
            yield from page.entries
            offset += len(page.entries)
            if not page.entries or offset >= page.total:
                return


class FsWorker(_FsCalls):
    """One worker process reading ``source`` (a raw image path or an NBD URL).

    Started on the first request (or by `start`), restarted after it fails;
    `close` stops it. Thread-safe: requests are served one at a time.
    """

    def __init__(
        self, source: str | os.PathLike[str], *, limits: WorkerLimits | None = None
    ) -> None:
        self.source = str(source)
        self.limits = limits or WorkerLimits()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.restarts = 0
        self.closed = False
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def start(self) -> None:
        with self._lock:
            self._ensure()

    def close(self) -> None:
        """Stop the worker now, even in the middle of a request (that request
        then fails); later requests fail with `Unavailable` (``fs_closed``)."""
        self.closed = True
        proc = self.proc
        if proc is not None and proc.poll() is None and self._lock.locked():
            proc.kill()
        with self._lock:
            self._stop()

    def __enter__(self) -> FsWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure(self) -> Connection:
        if self.closed:
            raise errors.Unavailable("the filesystem reader was closed", code="fs_closed")
        if self.conn is not None and self.proc is not None and self.proc.poll() is None:
            return self.conn
        if self.proc is not None:
            self._retire()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = [
                sys.executable,
                "-m",
                "sendense.restore.fs.worker",
                "--fd",
                str(theirs.fileno()),
                "--source",
                self.source,
                "--memory-limit",
                str(self.limits.memory),
            ]
            self.proc = subprocess.Popen(
                argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, cwd="/"
            )
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        log.debug("fs worker started pid=%s source=%s", self.proc.pid, self.source)
        result = self._answer(self.conn, self.limits.start_timeout)
        if not isinstance(result, dict):
            raise WorkerProtocolError("start: no size")
        return self.conn

    def _stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=2.0)  # it exits on EOF
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None

    def _retire(self) -> None:
        """Replace the worker: the next request starts a fresh one."""
        self._stop()
        self.restarts += 1

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _request(self, req: dict[str, Any]) -> tuple[Any, bytes | None]:
        with self._lock:
            conn = self._ensure()
            try:
                conn.send_bytes(json.dumps(req).encode())
            except OSError:
                pass  # the worker died; _answer reports how
            result = self._answer(conn, self.limits.request_timeout)
            payload = None
            if req.get("op") == "read":
                payload = self._frame(conn, self.limits.request_timeout)
                if not isinstance(result, dict) or result.get("length") != len(payload):
                    raise WorkerProtocolError("read: the data does not match its header")
            return result, payload

    def _frame(self, conn: Connection, timeout: float) -> bytes:
        try:
            ready = conn.poll(timeout)
        except (EOFError, OSError):
            ready = True
        if not ready:
            self._kill()
            self._retire()
            raise errors.ParserLimit(
                f"the filesystem parser did not answer within {timeout:g} s and was stopped",
                limit="time",
            )
        try:
            return conn.recv_bytes()
        except (EOFError, OSError):
            raise self._died() from None

    def _answer(self, conn: Connection, timeout: float) -> Any:
        raw = self._frame(conn, timeout)
        try:
            answer = json.loads(raw)
        except ValueError as e:
            self._kill()
            raise WorkerProtocolError("the worker sent something that is not JSON") from e
        if not isinstance(answer, dict):
            raise WorkerProtocolError("the worker's answer is not an object")
        if answer.get("ok") is True:
            return answer.get("result")
        error = answer.get("error")
        if not isinstance(error, dict):
            raise WorkerProtocolError("the worker's error is not an object")
        code = error.get("code")
        message = str(error.get("message", ""))[:1000]
        raw_details = error.get("details")
        details: dict[str, Any] = raw_details if isinstance(raw_details, dict) else {}
        if code == "source_unavailable":
            self._retire()  # it exits after this answer; the next request reconnects
            raise errors.Unavailable(message, code="source_unavailable")
        cls = _REQUEST_ERRORS.get(str(code))
        if cls is None:
            self._kill()
            raise WorkerProtocolError(f"the worker answered an unknown error code {code!r}")
        if cls in (errors.FilesystemCorrupt, errors.ParserLimit):
            # It exits after such an answer: wait for it, so the next request starts afresh.
            self._retire()
        # Paths in messages may hold a name's raw bytes: shown escaped, so that
        # the answer can be written as UTF-8 (see paths.escape).
        safe: dict[str, Any] = {
            shown(str(k)): shown(v) if isinstance(v, str) else v
            for k, v in details.items()
            if k != "code" and isinstance(v, str | int | bool)
        }
        raise cls(shown(message), **safe)

    def _died(self) -> errors.Error:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self._kill()
            code = self.proc.returncode
        self._retire()
        if self.closed:
            return errors.Unavailable("the filesystem reader was closed", code="fs_closed")
        if code == EXIT_MEMORY:
            return errors.ParserLimit(
                "the filesystem parser exceeded its memory limit", limit="memory"
            )
        return errors.FilesystemCorrupt(
            f"the filesystem parser ended unexpectedly (exit code {code}); the disk may be corrupt",
            exit_code=code,
        )


class FsPool(_FsCalls):
    """``size`` workers for one disk; a request takes whichever is free."""

    def __init__(
        self, source: str | os.PathLike[str], *, size: int = 2, limits: WorkerLimits | None = None
    ) -> None:
        self.workers = [FsWorker(source, limits=limits) for _ in range(size)]
        self._idle: queue.Queue[FsWorker] = queue.Queue()
        for worker in self.workers:
            self._idle.put(worker)

    def _request(self, req: dict[str, Any]) -> tuple[Any, bytes | None]:
        worker = self._idle.get()
        try:
            return worker._request(req)
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()

    def __enter__(self) -> FsPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def source_for_nbd_socket(socket_path: str | Path, export: str = "") -> str:
    """The NBD URL of a local unix-socket export (qemu-nbd -r --socket=...)."""
    return f"nbd+unix:///{export}?socket={socket_path}"
