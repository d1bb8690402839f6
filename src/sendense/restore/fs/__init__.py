"""File-level restore: filesystems inside a restore point, read in user space.

The dissect parsers (AGPL-3.0-or-later) are imported only by modules of this
package that run inside worker processes (`worker.py`, `volumes.py`,
`filesystems.py`); the hub imports `client.py` and `models.py`, which import
no parser. See docs/restore-internals.md and docs/licences.md.
"""

from sendense.restore.fs.client import FsPool, FsWorker, WorkerLimits, source_for_nbd_socket
from sendense.restore.fs.models import FsEntry, FsListing, FsPartition

__all__ = [
    "FsEntry",
    "FsListing",
    "FsPartition",
    "FsPool",
    "FsWorker",
    "WorkerLimits",
    "source_for_nbd_socket",
]
