"""Verification: does a restore point still read as it was recorded?

Two levels (restic's ``check`` model: structure, then data):

1. structure: ``qemu-img check`` on every image of the chain, base first.
   Corruption (exit 2) fails the verify with qemu-img's own message; leaked
   clusters (exit 3) are wasted space that reads do not see, so they pass.
2. data: the restore point is read through its chain (qemu-nbd, read-only)
   and its digest recomputed with the algorithm named in the recorded one
   (``mover/digest.py``: x3-64k = BLAKE3 over the XXH3-128 of each 64 KiB
   block); it must equal the digest the node recorded at backup time.

Where the data differs. The recorded digest is one hash over the disk's
block hash list; the hub never had that list (the node computes it while it
copies), so a mismatch alone cannot say which blocks changed. So every good
verify keeps the list it computed next to the image
(``<stamp>-<type>.blocks``: 16 bytes per 64 KiB for x3-64k, 0.025% of the
disk), and a later verify that finds a mismatch compares its list with that
one, block by block, and names the byte ranges that differ and the image of
the chain that holds them (``qemu-img map``). The kept list is trusted only
if its own BLAKE3 is the recorded digest, so it cannot be stale or forged
into agreement. Without one (the first verify already finds a mismatch), the
answer says so: the digest expected and the digest read.

Outcome on the backup row: ``verify_status`` ``ok|failed``, ``verified_at``,
``verify_error`` (what failed, or null). The job itself completes either
way; it fails only when the verify could not run (and then the row keeps
its previous verify state).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import nbd

from sendense import keystore
from sendense.catalog.models import Backup
from sendense.core.errors import BackupInUse, BackupNotRestorable, QemuImgError
from sendense.engine.lifecycle import JobContext
from sendense.mover.copy import Mover, Progress
from sendense.mover.digest import BLOCK_SIZE, BlockHashList, algorithm_of, block_count
from sendense.qemu import img
from sendense.qemu.nbd_server import QemuNbdServer
from sendense.storage import chain

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from sendense.hub.state import HubState

log = logging.getLogger(__name__)

KIND = "verify"
MAX_RANGES_SHOWN = 8


def plan_verify(s: Session, b: Backup) -> dict[str, Any]:
    """The job's params: the chain to check, base first. Raises a 409 when
    the backup is not a completed restore point or its chain is being merged."""
    if b.status != "completed":
        raise BackupNotRestorable(
            f"backup {b.id} is {b.status}: only completed restore points can be verified",
            backup_id=b.id,
            status=b.status,
        )
    members = [b]
    cur = b
    while cur.parent_id:
        parent = s.get(Backup, cur.parent_id)
        if parent is None:
            break
        if parent.status != "completed":
            raise BackupInUse(
                f"backup {parent.id} of the chain of {b.id} is {parent.status}; "
                "verify it when that has finished",
                backup_id=parent.id,
            )
        members.append(parent)
        cur = parent
    members.reverse()
    return {
        "backup_id": b.id,
        "backup_ids": [m.id for m in members],
        "members": [{"backup_id": m.id, "file_path": m.file_path} for m in members],
    }


def read_block_hashes(
    path: str | Path,
    list_path: str | Path,
    algorithm: str,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    cancel_event: threading.Event | None = None,
    key: img.ImageKey | None = None,
) -> str:
    """Digest of what ``path`` reads (through its chain); keeps its block
    hash list at ``list_path``. Read-only qemu-nbd on a private socket, the
    mover's planner (only allocated data is read; zero blocks hash as the
    constant they are)."""
    with tempfile.TemporaryDirectory(prefix="sendense-verify-") as tmp:
        sock = str(Path(tmp) / "nbd.sock")
        with QemuNbdServer(str(path), socket_path=sock, read_only=True, key=key) as server:
            h = nbd.NBD()
            try:
                h.add_meta_context("base:allocation")
                h.connect_uri(server.url)
                size = h.get_size()
                hashes = BlockHashList(list_path, size, algorithm=algorithm)
                result = Mover(
                    h, None, size, hashes=hashes, on_progress=on_progress, cancel_event=cancel_event
                ).run()
            finally:
                with contextlib.suppress(Exception):
                    h.shutdown()
    assert result.digest is not None
    return result.digest


def list_digest(list_path: str | Path, algorithm: str) -> str:
    """The digest a block hash list stands for (BLAKE3 of the list)."""
    h = blake3.blake3()
    with open(list_path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


def differing_blocks(a: str | Path, b: str | Path, hash_size: int) -> list[tuple[int, int]]:
    """Runs of blocks ``(first, last)`` whose hashes differ between two lists."""
    runs: list[tuple[int, int]] = []
    step = hash_size * 65536
    with open(a, "rb") as fa, open(b, "rb") as fb:
        block = 0
        while True:
            ca, cb = fa.read(step), fb.read(step)
            if not ca and not cb:
                break
            if ca != cb:
                for i in range(0, max(len(ca), len(cb)), hash_size):
                    if ca[i : i + hash_size] != cb[i : i + hash_size]:
                        n = block + i // hash_size
                        if runs and runs[-1][1] == n - 1:
                            runs[-1] = (runs[-1][0], n)
                        else:
                            runs.append((n, n))
            block += max(len(ca), len(cb)) // hash_size
    return runs


def image_at(
    top: str, members: list[dict[str, Any]], offset: int, key: img.ImageKey | None = None
) -> str | None:
    """The chain's image that holds the data at disk ``offset`` (qemu-img map)."""
    for e in img.map_extents(top, key=key):
        if e["start"] <= offset < e["start"] + e["length"]:
            if not e.get("data"):
                return None
            depth = int(e.get("depth", 0))
            index = len(members) - 1 - depth
            return str(members[index]["file_path"]) if 0 <= index < len(members) else None
    return None


def describe_ranges(
    runs: list[tuple[int, int]],
    size: int,
    top: str,
    members: list[dict[str, Any]],
    key: img.ImageKey | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    ranges: list[dict[str, Any]] = []
    for first, last in runs:
        start = first * BLOCK_SIZE
        end = min((last + 1) * BLOCK_SIZE, size) - 1
        ranges.append({"start": start, "end": end, "image": image_at(top, members, start, key)})
    shown = ", ".join(
        f"{r['start']}-{r['end']}" + (f" (in {os.path.basename(r['image'])})" if r["image"] else "")
        for r in ranges[:MAX_RANGES_SHOWN]
    )
    more = f" and {len(ranges) - MAX_RANGES_SHOWN} more" if len(ranges) > MAX_RANGES_SHOWN else ""
    return f"in blocks at byte offsets {shown}{more}", ranges


def summarize(output: str, lines: int = 3) -> str:
    """The first ``lines`` lines of a tool's output, and how many there were
    (a corrupt image makes ``qemu-img check`` print a line per cluster)."""
    all_lines = [x.strip() for x in output.splitlines() if x.strip()]
    shown = "; ".join(all_lines[:lines])
    if len(all_lines) > lines:
        shown += f"; ... ({len(all_lines)} lines in all)"
    return shown


class VerifyJob:
    """The ``verify`` job kind (a `LocalJob`)."""

    kind = KIND

    def __init__(self, st: HubState) -> None:
        self.db = st.db
        self.settings = st.settings

    def execute(self, job_id: str, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        backup_id = params["backup_id"]
        members: list[dict[str, Any]] = params["members"]
        top = members[-1]["file_path"]
        t0 = time.monotonic()
        with self.db.session() as s:
            b = s.get(Backup, backup_id)
            recorded = b.digest if b is not None else None
            size = b.total_bytes if b is not None else 0
            # Encrypted repository: a missing master key fails the job (the
            # restore point's verify state is left as it was).
            key = keystore.key_of_backup(s, self.settings, backup_id)
        problems: list[str] = []
        result: dict[str, Any] = {"backup_id": backup_id, "checked": []}
        for m in members:
            ctx.check_cancel()
            ctx.progress(f"qemu-img check {m['backup_id'][:8]}", force=True)
            try:
                report = img.check(m["file_path"], allow_leaks=True, key=key)
                result["checked"].append(
                    {"backup_id": m["backup_id"], "leaks": report.get("leaks", 0)}
                )
            except QemuImgError as e:
                problems.append(
                    f"qemu-img check of backup {m['backup_id']} "
                    f"({os.path.basename(m['file_path'])}) failed with exit code {e.rc}: "
                    + summarize(e.stderr or e.message)
                )
        if not problems:
            problem, ranges = self._check_data(job_id, top, members, recorded, size, ctx, key)
            result["digest_recorded"] = recorded
            if ranges:
                result["ranges"] = ranges
            if problem:
                problems.append(problem)
        status = "failed" if problems else "ok"
        error = "; ".join(problems) or None
        with self.db.session() as s:
            b = s.get(Backup, backup_id)
            if b is not None:
                b.verify_status = status
                b.verified_at = datetime.now(UTC)
                b.verify_error = error
        log.info("job=%s verify backup=%s status=%s error=%s", job_id, backup_id, status, error)
        result.update(
            verify_status=status, verify_error=error, seconds=round(time.monotonic() - t0, 3)
        )
        return result

    def _check_data(
        self,
        job_id: str,
        top: str,
        members: list[dict[str, Any]],
        recorded: str | None,
        size: int,
        ctx: JobContext,
        key: img.ImageKey | None = None,
    ) -> tuple[str | None, list[dict[str, Any]]]:
        """The digest check: (what differs or None, ranges that differ)."""
        if not recorded:
            return "no digest was recorded for this restore point", []
        algorithm = algorithm_of(recorded)
        kept = chain.hash_list_path(top)
        fresh = kept.with_name(f"{kept.stem}.verify-{job_id[:8]}.blocks")
        cancel = threading.Event()
        last = [0.0]

        def progress(p: Progress) -> None:
            ctx.progress("reading through the chain", done=p.bytes_done, total=p.bytes_total)
            now = time.monotonic()
            if now - last[0] > 0.5:
                last[0] = now
                if ctx.cancelled():
                    cancel.set()

        try:
            got = read_block_hashes(
                top, fresh, algorithm, on_progress=progress, cancel_event=cancel, key=key
            )
            if got == recorded:
                os.replace(fresh, kept)  # the reference for later verifies
                return None, []
            if kept.exists() and list_digest(kept, algorithm) == recorded:
                hash_size = os.path.getsize(kept) // max(1, block_count(size))
                runs = differing_blocks(kept, fresh, hash_size)
                where, ranges = describe_ranges(runs, size, top, members, key)
                return f"digest mismatch {where} (recorded {recorded}, read {got})", ranges
            return (
                f"digest mismatch: recorded {recorded}, read {got}; no block hash list "
                "from an earlier good verify, so the blocks that differ cannot be named",
                [],
            )
        finally:
            fresh.unlink(missing_ok=True)
            fresh.with_suffix(".tmp").unlink(missing_ok=True)

    def recover(self, job_id: str, params: dict[str, Any]) -> None:
        """Nothing to repair: remove the interrupted run's hash list."""
        members = params.get("members") or []
        if not members:
            return
        kept = chain.hash_list_path(members[-1]["file_path"])
        for p in kept.parent.glob(f"{kept.stem}.verify-{job_id[:8]}.*"):
            p.unlink(missing_ok=True)

    def on_end(self, job_id: str, params: dict[str, Any], status: str) -> None:
        pass
