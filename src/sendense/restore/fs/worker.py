"""The filesystem worker process: ``python -m sendense.restore.fs.worker``.

One worker reads one disk (a raw file or a read-only NBD export) and holds
one parser stack (the dissect objects are not thread-safe); it answers one
request at a time over a connected socket inherited from the parent
(``--fd``). It limits its own address space (``RLIMIT_AS``) before it
imports a parser, so a hostile filesystem that makes a parser allocate
without bound ends in a MemoryError (answered, then the process exits) or in
the process dying; the parent enforces the time limit by killing it.

Wire format (``multiprocessing.connection`` frames: a length, then bytes):
every request is one JSON object ``{"op": ..., ...}``; every answer is one
JSON object, ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
{"code", "message", "details"}}``; a successful ``read`` is followed by one
more frame holding the raw bytes. JSON, never pickle: the parent must not
run anything the worker sends.

After an unexpected parser failure (corrupt structures) the worker answers
the error and exits: the parent starts a fresh one for the next request, so
no half-updated parser state is ever reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from sendense.core.errors import Error, NoFilesystem, PartitionNotFound
from sendense.restore.fs.models import EXIT_CORRUPT, EXIT_MEMORY
from sendense.restore.fs.source import SourceError

READ_MAX = 16 * 1024 * 1024
# Codes the parent turns back into their domain errors; anything else a
# worker raises is reported as filesystem_corrupt.
REQUEST_ERRORS = {
    "path_refused",
    "path_not_found",
    "not_a_directory",
    "not_a_file",
    "partition_not_found",
    "no_filesystem",
}


class Worker:
    def __init__(self, source: str) -> None:
        from sendense.restore.fs.source import BlockReader, open_backend

        self.reader = BlockReader(open_backend(source))
        self._volumes: list[Any] | None = None
        self._trees: dict[int, Any] = {}
        self._open: dict[tuple[int, str], tuple[Any, Any]] = {}

    def volumes(self) -> list[Any]:
        if self._volumes is None:
            from sendense.restore.fs.volumes import find_volumes

            self._volumes = find_volumes(self.reader)
        return self._volumes

    def tree(self, index: int) -> Any:
        tree = self._trees.get(index)
        if tree is not None:
            return tree
        from sendense.restore.fs.filesystems import FILESYSTEMS, Tree

        volume = next((v for v in self.volumes() if v.info.index == index), None)
        if volume is None:
            raise PartitionNotFound(f"no partition {index} on this disk", partition=index)
        adapter = FILESYSTEMS.get(volume.info.filesystem or "")
        if adapter is None:
            raise NoFilesystem(
                f"partition {index} holds no filesystem that can be read", partition=index
            )
        tree = Tree(adapter(volume.view))
        self._trees[index] = tree
        return tree

    def partitions(self) -> list[dict[str, Any]]:
        out = []
        for volume in self.volumes():
            info = volume.info.to_wire()
            if volume.info.filesystem is not None:
                try:
                    fs = self.tree(volume.info.index).fs
                except (MemoryError, SourceError):
                    raise
                except Exception as e:
                    info["warnings"] = [
                        *info["warnings"],
                        f"the filesystem cannot be read: {e}"[:300],
                    ]
                    continue
                info["label"] = fs.label
                info["warnings"] = [*info["warnings"], *fs.warnings]
            out.append(info)
        return out

    def handle(self, req: dict[str, Any]) -> tuple[Any, bytes | None]:
        op = req.get("op")
        if op == "ping":
            return {"size": self.reader.size}, None
        if op == "partitions":
            return self.partitions(), None
        index = int(req["partition"])
        path = str(req["path"])
        if op == "stat":
            return self.tree(index).stat(path, follow=bool(req.get("follow"))).to_wire(), None
        if op == "list":
            listing = self.tree(index).list(
                path,
                offset=max(0, int(req.get("offset", 0))),
                limit=max(0, min(int(req.get("limit", 1000)), 10_000)),
                show_system=bool(req.get("show_system")),
            )
            return {
                "path": listing.path,
                "total": listing.total,
                "offset": listing.offset,
                "entries": [e.to_wire() for e in listing.entries],
            }, None
        if op == "read":
            offset = max(0, int(req["offset"]))
            length = max(0, min(int(req["length"]), READ_MAX))
            entry, fh = self._file(index, path)
            fh.seek(offset)
            data = fh.read(min(length, max(0, entry.size - offset)))
            return {"size": entry.size, "length": len(data)}, data
        raise ValueError(f"unknown op {op!r}")

    def _file(self, index: int, path: str) -> tuple[Any, Any]:
        key = (index, path)
        hit = self._open.get(key)
        if hit is None:
            hit = self.tree(index).open(path)
            if len(self._open) >= 8:
                self._open.pop(next(iter(self._open)))
            self._open[key] = hit
        return hit


def _error(code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message, "details": details}}


def serve(conn: Connection, source: str) -> int:
    try:
        worker = Worker(source)
    except OSError as e:
        conn.send_bytes(
            json.dumps(_error("source_unavailable", f"cannot open the disk: {e}")).encode()
        )
        return 1
    except Exception as e:
        conn.send_bytes(
            json.dumps(_error("source_unavailable", f"cannot open the disk: {e}")).encode()
        )
        return 1
    conn.send_bytes(json.dumps({"ok": True, "result": {"size": worker.reader.size}}).encode())
    while True:
        try:
            raw = conn.recv_bytes()
        except EOFError:
            return 0
        payload = None
        exit_code = None
        try:
            result, payload = worker.handle(json.loads(raw))
            answer: dict[str, Any] = {"ok": True, "result": result}
        except SourceError as e:
            # The disk, not the filesystem: the NBD server went away or the file cannot be read.
            answer = _error("source_unavailable", f"the disk cannot be read: {e}"[:500])
            exit_code = EXIT_CORRUPT
        except MemoryError:
            answer = _error("parser_limit", "the parser exceeded its memory limit", limit="memory")
            exit_code = EXIT_MEMORY
        except Error as e:
            if e.code in REQUEST_ERRORS:
                answer = _error(e.code, e.message, **e.details)
            else:
                answer = _error("filesystem_corrupt", e.message)
                exit_code = EXIT_CORRUPT
        except RecursionError:
            answer = _error("filesystem_corrupt", "the filesystem's structures nest too deeply")
            exit_code = EXIT_CORRUPT
        except Exception as e:
            answer = _error(
                "filesystem_corrupt",
                f"the filesystem cannot be read: {type(e).__name__}: {e}"[:500],
            )
            exit_code = EXIT_CORRUPT
        conn.send_bytes(json.dumps(answer).encode())
        if payload is not None:
            conn.send_bytes(payload)
        if exit_code is not None:
            return exit_code


def _die_with_parent(parent: int) -> None:
    # The parent enforces the time limit; if it is gone, nobody would.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sendense.restore.fs.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--memory-limit", type=int, required=True)
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # dissect logs what it finds odd (log.critical per bad directory entry):
    # on a hostile filesystem that is a flood into the hub's log. Silenced;
    # failures reach the hub as answers.
    logging.getLogger("dissect").setLevel(logging.CRITICAL + 1)
    threading.Thread(target=_die_with_parent, args=(os.getppid(),), daemon=True).start()
    conn = Connection(args.fd)
    try:
        return serve(conn, args.source)
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
