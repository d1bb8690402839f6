"""The hub <-> node contract (SPEC §4): one model per message.

Both ends use these models: the node validates what it receives with them
and answers with them; the hub builds its requests and reads the answers
with them. The JSON they produce is the wire format, so it only grows: new
fields come with defaults, and the answers the node writes
(`JobStatusReport`, `DiskStatus`) keep keys they do not know
(``extra="allow"``), which lets a newer worker talk to an older hub::

    hub                                  node                        worker process
    POST /api/v1/backup/start  ------>   BackupStartRequest
                               <------   BackupStartAnswer
                                         WorkerJob  -- stdin, JSON -->
                                         (request + node settings)
    GET  /api/v1/status/{id}   ------>                   <-- JOB_DIR/status.json
                               <------   JobStatusReport {disks: {"2000": DiskStatus}}
    POST /api/v1/jobs/{id}/cancel        JobStatusReport
    POST /api/v1/discover      ------>   DiscoverRequest
                               <------   DiscoverAnswer

Credentials: ``source.config`` may hold a password (SPEC §4: "connection,
credentials"). It is left out of every model's repr, so of any log line or
traceback that shows one, and validation errors never quote their input
(``hide_input_in_errors``). `model_dump` still has it: the wire needs it.

NBD over TLS (issue 10, docs/security.md): the hub serves each disk's target
with TLS and a pre-shared key of its own (sendense/nbd/psk.py), and the
start request carries the keys next to the targets::

    "nbd_targets": "2000:nbds://hub:10100/sendense-<backup id>,2001:nbds://...",
    "nbd_tls": {"2000": {"username": "sendense", "psk": "<64 hex digits>"}, ...}

A target URL's scheme says what the connection is: ``nbds://`` requires TLS
(libnbd refuses a server that does not offer it, so a mover can never fall
back to plain text), ``nbd://`` is plain (a hub with ``SENDENSE_NBD_TLS=false``,
for the benchmark only, or an older hub). Every ``nbds://`` target has a key in
``nbd_tls`` and every key a target; a key given for an ``nbd://`` target makes
the connection require TLS all the same. A key is hidden like a password
(never in a repr or a validation error). The node writes each key to a file
of mode 0600 in the job's folder (``JOB_DIR/tls-<disk key>.psk``, psktool
format) before it hands the job to its worker, and the worker's job
(`WorkerJob`, on stdin) names the files instead of carrying the keys; the
files are removed when the job ends, or when the node sees that its worker
died. The key is the same for every connection of the job to that target.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

BackupType = Literal["full", "incremental"]
# A job as the node reports it; "pending" only ever comes from older nodes.
JobState = Literal["pending", "running", "completed", "failed", "cancelled"]
DiskState = Literal["pending", "running", "completed", "failed", "cancelled"]
ENDED: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

# A job id names the job's folder on the node: no '/', no leading '.'.
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
TARGET_SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")
TLS_SCHEMES = ("nbds://", "nbds+unix://")
# A file in a job's folder the node touches at each status request of the
# hub: its mtime tells a reconnecting worker whether the hub still follows
# the job (WorkerJob.hub_silence).
HUB_ASKED = "hub-asked"


def _iso(value: datetime) -> str:
    # datetime.isoformat ("...+00:00"), what the node has always sent; pydantic
    # on its own would write "...Z".
    return value.isoformat()


# A point in time with its zone, on the wire as ISO 8601.
Timestamp = Annotated[AwareDatetime, PlainSerializer(_iso, return_type=str)]


def _is_disk_key(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_targets(spec: str) -> dict[int, str]:
    """``"2000:nbd://h:10100/e1,2001:nbd://h:10101/e2"`` -> {2000: url, ...}."""
    out: dict[int, str] = {}
    for part in spec.split(","):
        key, sep, url = part.strip().partition(":")
        if not sep or not _is_disk_key(key) or not url.startswith(TARGET_SCHEMES):
            raise ValueError(f"bad NBD target {part!r}: expected <disk key>:nbd://host:port/export")
        out[int(key)] = url
    if not out:
        raise ValueError("nbd_targets is empty")
    return out


class _Model(BaseModel):
    model_config = ConfigDict(hide_input_in_errors=True)


class SourceSpec(_Model):
    """Where the VM lives and how to reach it: a connector type and its config."""

    type: str = Field(min_length=1)
    # Connection and credentials: never in a repr (see the module docstring).
    config: dict[str, Any] = Field(repr=False)


class NbdTlsKey(_Model):
    """The pre-shared key of one disk's NBD target (TLS-PSK)."""

    # The TLS-PSK identity (sent in clear in the handshake; names nothing).
    username: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    # The key as hex (psktool's format): never in a repr or an error message.
    psk: str = Field(repr=False, min_length=32, max_length=256, pattern=r"^[0-9a-f]+$")


class NbdTlsFile(_Model):
    """Where the node put a disk's key for its worker (`WorkerJob`)."""

    username: str = Field(min_length=1, max_length=64)
    psk_file: Path


class BackupStartRequest(_Model):
    """``POST /api/v1/backup/start``: copy the VM's disks into the hub's NBD targets."""

    job_id: str = Field(min_length=1, max_length=100, pattern=JOB_ID.pattern)
    vm_name: str = Field(min_length=1)
    source: SourceSpec
    vm_path: str = ""
    # "<disk key>:<NBD URL>,...": one target per disk to copy.
    nbd_targets: str = Field(min_length=1)
    backup_type: BackupType
    # Disk key -> change id of the restore point an incremental builds on; read
    # for an incremental only, and only for the disks listed.
    previous_change_ids: dict[str, str] = Field(default_factory=dict)
    # Tuning the hub may ask for; the node's settings otherwise.
    in_flight: int | None = Field(default=None, ge=1, le=64)
    request_size: int | None = Field(default=None, ge=65536, le=32 << 20)
    # Disk key -> the TLS pre-shared key of its target (module docstring).
    nbd_tls: dict[str, NbdTlsKey] = Field(default_factory=dict, repr=False)
    # Pull (issue 11, node/pull.py): "pull" asks the node to serve each frozen
    # disk itself (TLS-PSK with the disk's key in nbd_tls) and let the hub read
    # it; each nbd_targets URL then only names the export the node serves (its
    # host and port are the node's: it reports them as DiskStatus ``pull_url``).
    # The job ends when the hub says it read everything
    # (POST /api/v1/jobs/{id}/pulled). Only nodes whose health says
    # transfer=pull accept it.
    transfer: Literal["push", "pull"] = "push"

    @field_validator("nbd_targets")
    @classmethod
    def _check_targets(cls, value: str) -> str:
        try:
            parse_targets(value)
        except ValueError as e:
            raise PydanticCustomError("nbd_targets", "{reason}", {"reason": str(e)}) from e
        return value

    @field_validator("previous_change_ids")
    @classmethod
    def _check_change_ids(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        for key, change_id in value.items():
            if not _is_disk_key(key):
                raise PydanticCustomError(
                    "disk_key", "key {key} is not a disk key (digits, like 2000)", {"key": key}
                )
            if not change_id.strip():
                raise PydanticCustomError(
                    "change_id", "the change id of disk {key} is empty", {"key": key}
                )
        # nbd_targets is validated first (field order); absent if it was invalid.
        spec = info.data.get("nbd_targets")
        if spec is not None:
            targets = parse_targets(spec)
            unknown = [k for k in value if int(k) not in targets]
            if unknown:
                raise PydanticCustomError(
                    "unknown_disk",
                    "disk(s) {keys} have no target in nbd_targets",
                    {"keys": ", ".join(unknown)},
                )
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> Self:
        targets = self.targets()
        keyed = self._tls_disks()
        unknown = sorted(k for k in keyed if k not in targets)
        if unknown:
            raise PydanticCustomError(
                "unknown_disk",
                "nbd_tls has keys for disk(s) {keys} that have no target in nbd_targets",
                {"keys": ", ".join(map(str, unknown))},
            )
        missing = sorted(
            k for k, url in targets.items() if url.startswith(TLS_SCHEMES) and k not in keyed
        )
        if missing:
            raise PydanticCustomError(
                "nbd_tls",
                "the nbds:// target(s) of disk(s) {keys} have no key in nbd_tls",
                {"keys": ", ".join(map(str, missing))},
            )
        return self

    def _tls_disks(self) -> set[int]:
        for key in self.nbd_tls:
            if not _is_disk_key(key):
                raise PydanticCustomError(
                    "disk_key",
                    "nbd_tls key {key} is not a disk key (digits, like 2000)",
                    {"key": key},
                )
        return {int(k) for k in self.nbd_tls}

    def targets(self) -> dict[int, str]:
        """Disk key -> NBD URL of its target."""
        return parse_targets(self.nbd_targets)

    def change_ids(self) -> dict[int, str]:
        """Disk key -> previous change id; empty for a full backup."""
        if self.backup_type != "incremental":
            return {}
        return {int(k): v for k, v in self.previous_change_ids.items()}


class BackupStartAnswer(_Model):
    job_id: str
    status: Literal["started"] = "started"
    message: str
    started_at: Timestamp
    pid: int


def _node_setting(name: str) -> Any:
    from sendense.settings import NodeSettings

    return getattr(NodeSettings(), name)


class WorkerJob(BackupStartRequest):
    """What the node hands its worker process (on stdin, never in a file): the
    start request with the node's own settings filled in."""

    job_dir: Path
    in_flight: int = Field(ge=1)
    request_size: int = Field(ge=4096)
    # Bytes/s of each disk's mover; 0 is unlimited.
    max_rate: int = Field(default=0, ge=0)
    # Algorithm of the restore points' digests (mover/digest.py).
    digest: str = Field(min_length=1)
    # Disks of the VM copied at the same time.
    parallel_disks: int = Field(default=1, ge=1)
    # Disk key -> the key file the node wrote for its target; the keys
    # themselves (``nbd_tls``) stay out of the worker's input.
    nbd_tls_files: dict[str, NbdTlsFile] = Field(default_factory=dict)
    # Mover settings (issue 11; NodeSettings, read where the job is built:
    # the node's environment, which its workers share).
    reconnect_deadline: float = Field(default_factory=lambda: _node_setting("reconnect_deadline"))
    flush_bytes: int = Field(default_factory=lambda: _node_setting("flush_bytes"), ge=1)
    flush_seconds: float = Field(default_factory=lambda: _node_setting("flush_seconds"), gt=0)
    window_bytes: int = Field(default_factory=lambda: _node_setting("window_bytes"), ge=65536)
    target_connections: int = Field(
        default_factory=lambda: _node_setting("target_connections"), ge=1, le=16
    )
    hub_silence: float = Field(default_factory=lambda: _node_setting("hub_silence"), ge=0)
    # Pull (issue 11, node/pull.py): where the node serves the frozen disks,
    # filled in by the node from its settings (node/app.py, pull.for_worker).
    pull_bind: str = "127.0.0.1"
    pull_advertise_host: str = ""
    pull_port_first: int = Field(default=10300, ge=1, le=65535)
    pull_port_last: int = Field(default=10399, ge=1, le=65535)
    pull_wait: float = Field(default=4 * 3600.0, gt=0)
    pull_confirm_timeout: float = Field(default=30.0, gt=0)

    def _tls_disks(self) -> set[int]:
        return super()._tls_disks() | {int(k) for k in self.nbd_tls_files if _is_disk_key(k)}

    def tls_file(self, disk_key: int) -> NbdTlsFile | None:
        """The key file for a disk's target, None when it is plain NBD."""
        return self.nbd_tls_files.get(str(disk_key))

    @classmethod
    def from_request(
        cls,
        request: BackupStartRequest,
        *,
        job_dir: Path,
        in_flight: int,
        request_size: int,
        max_rate: int,
        digest: str,
        parallel_disks: int,
    ) -> WorkerJob:
        """The request, with the node's settings where the request has none."""
        return cls.model_validate(
            {
                **request.model_dump(),
                "job_dir": job_dir,
                "in_flight": request.in_flight or in_flight,
                "request_size": request.request_size or request_size,
                "max_rate": max_rate,
                "digest": digest,
                "parallel_disks": parallel_disks,
            }
        )


class RetryInfo(_Model):
    """A connection being made again (issue 11, mover/copy.py): shown per
    disk and for the job while the worker's step is "retrying"."""

    model_config = ConfigDict(extra="allow")

    # Which connection dropped and how, e.g. "target connection lost: ...".
    reason: str
    attempt: int = Field(ge=1)  # the attempt under way, from 1
    since: Timestamp  # first failure of this streak
    deadline: Timestamp  # when the worker gives up and fails the job


class DiskStatus(_Model):
    """Progress and result of one disk, as the worker writes it."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    disk_key: int
    status: DiskState = "pending"
    # What is read: "incremental" (changed blocks) or "full" (every block).
    mode: BackupType
    bytes_done: int = 0
    bytes_total: int = 0
    data_bytes: int | None = None
    zero_bytes: int | None = None
    rate: int | None = None  # bytes/s
    eta: float | None = None  # seconds
    requests: int | None = None
    seconds: float | None = None
    # Why an incremental was turned into a full read, if it was.
    fallback_reason: str | None = None
    # At the end: the new restore point's change id and digest.
    change_id: str | None = None
    digest: str | None = None
    # Reconnecting (issue 11): None once the disk copies again.
    retry: RetryInfo | None = None


class JobError(_Model):
    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class JobStatusReport(_Model):
    """``GET /api/v1/status/{job_id}``, also ``JOB_DIR/status.json``.

    A job stays "running" until its VM is released (step "releasing"): the hub
    stops its targets as soon as it sees an end state.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    job_id: str
    status: JobState
    step: str
    pid: int = 0
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    updated_at: Timestamp | None = None
    # Disk key (as a string: JSON object keys) -> its progress.
    disks: dict[str, DiskStatus] = Field(default_factory=dict)
    error: JobError | None = None
    # Things a person should know, e.g. why a disk was read in full.
    messages: list[str] = Field(default_factory=list)
    mover_peak_rss_bytes: int | None = None
    # Reconnecting (issue 11): the retry of a disk while step is "retrying".
    retry: RetryInfo | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED


class DiscoverRequest(_Model):
    """``POST /api/v1/discover``: list the source's VMs and their disks."""

    source: SourceSpec


class DiscoveredDisk(_Model):
    model_config = ConfigDict(extra="allow")

    disk_index: int
    disk_key: int
    label: str
    capacity_bytes: int
    size_gb: float
    path: str
    node_name: str


class DiscoveredVm(_Model):
    model_config = ConfigDict(extra="allow")

    name: str
    path: str
    disks: list[DiscoveredDisk]


class DiscoverAnswer(_Model):
    vms: list[DiscoveredVm]


class NodeHealth(_Model):
    status: Literal["ok"] = "ok"
    version: str
    uptime: float  # seconds
    pid: int
    # Pull (issue 11): how this node moves a full's data (SENDENSE_NODE_TRANSFER).
    transfer: Literal["push", "pull"] = "push"


class JobLog(_Model):
    job_id: str
    log: str
