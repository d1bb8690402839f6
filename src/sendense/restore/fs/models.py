"""What the filesystem worker answers, as typed records.

They cross the process boundary as JSON objects (never pickles: the worker
parses hostile data, and a pickle from it could run code in the hub), built
with `to_wire` and read back with `from_wire`, which checks every field's
type so that a confused or subverted worker cannot hand the hub anything but
these shapes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, get_args

from sendense.core.errors import FilesystemCorrupt

# How a worker ends when it cannot go on (the parent tells the user why).
EXIT_CORRUPT = 2
EXIT_MEMORY = 3

EntryType = Literal["file", "dir", "symlink", "other"]
ENTRY_TYPES: tuple[str, ...] = get_args(EntryType)

T = TypeVar("T", bound="_Wire")


class WorkerProtocolError(FilesystemCorrupt):
    """The worker sent something that is not one of our records (a parser
    gone wrong on hostile data is the likely cause)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"the filesystem worker answered out of protocol: {message}")


_SCALARS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "str": (str,),
    "int | None": (int, type(None)),
    "str | None": (str, type(None)),
    "bool": (bool,),
    "list[str]": (list,),
}


class _Wire:
    def to_wire(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload, no-any-return]

    @classmethod
    def from_wire(cls: type[T], data: Any) -> T:
        if not isinstance(data, dict):
            raise WorkerProtocolError(f"{cls.__name__}: not an object")
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            value = data.get(f.name)
            allowed = _SCALARS[str(f.type)]
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise WorkerProtocolError(
                    f"{cls.__name__}.{f.name}: unexpected {type(value).__name__}"
                )
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise WorkerProtocolError(f"{cls.__name__}.{f.name}: not a list of strings")
            values[f.name] = value
        return cls(**values)


@dataclass(frozen=True)
class FsPartition(_Wire):
    """One partition (or the whole disk, ``index`` 0) and what it holds.

    ``index`` is 1-based in table order; 0 is a disk without a partition
    table whose whole content is one filesystem. ``filesystem`` is ``ext``,
    ``xfs``, ``fat``, ``ntfs`` or None (no filesystem we read: swap, an empty
    or unknown partition). ``warnings`` are for a person (e.g. a dirty
    journal: what is read is the state without the journal replayed).
    """

    index: int
    offset: int
    size: int
    table: str  # "gpt", "mbr" or "none"
    type: str  # the partition type as the table names it ("" for index 0)
    filesystem: str | None
    label: str | None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FsEntry(_Wire):
    """One directory entry, as ``lstat`` would see it (a symlink is reported
    as a symlink with its ``target``, not followed). ``mode``/``uid``/``gid``
    are None on filesystems without them (FAT, NTFS)."""

    name: str
    path: str
    type: str  # one of ENTRY_TYPES
    size: int
    mode: int | None
    uid: int | None
    gid: int | None
    mtime_ns: int | None
    target: str | None = None

    @property
    def mtime(self) -> datetime | None:
        if self.mtime_ns is None:
            return None
        return datetime.fromtimestamp(self.mtime_ns / 1e9, tz=UTC)


@dataclass(frozen=True)
class FsListing:
    """One page of a directory: ``total`` entries in all, sorted by name,
    ``entries`` from ``offset`` on."""

    path: str
    total: int
    offset: int
    entries: list[FsEntry]
