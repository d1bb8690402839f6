"""Domain errors.

Every error has a machine-readable ``code`` and a message for a person. The
category classes (`NotFound`, `Conflict`, ...) carry the meaning; only
``web/errors.py`` (shared by hub and node) turn them into HTTP answers, always
in the shape ``{"error": code, "message": message, "details": {...}}``.
"""

from __future__ import annotations

from typing import Any


class Error(Exception):
    """Base of all Sendense errors."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def to_body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, "details": self.details}


class InvalidRequest(Error):
    code = "invalid_request"


class NotFound(Error):
    code = "not_found"


class Conflict(Error):
    code = "conflict"


class Unavailable(Error):
    code = "unavailable"


class Forbidden(Error):
    code = "forbidden"


class Unauthorized(Error):
    code = "unauthorized"


class Cancelled(Error):
    code = "cancelled"


class ExternalCommandError(Error):
    """A program we run (qemu-img, qemu-nbd, ...) failed."""

    code = "external_command_failed"

    def __init__(self, cmd: list[str], rc: int, stderr: str) -> None:
        self.cmd = cmd
        self.rc = rc
        self.stderr = stderr.strip()
        super().__init__(f"{cmd[0]} failed with exit code {rc}: {self.stderr[-2000:]}", cmd=cmd[:2])


class QemuImgError(ExternalCommandError):
    code = "qemu_img_failed"


class QemuNbdError(Error):
    code = "qemu_nbd_failed"


class QmpError(Unavailable):
    """QMP answered with an error, or the monitor could not be reached: the
    hypervisor side is not in a state to serve (503), not a bug."""

    code = "qmp_error"


class NbdError(Error):
    code = "nbd_error"


class PortsExhausted(Unavailable):
    code = "ports_exhausted"


class DiskBusy(Conflict):
    code = "disk_busy"


class NoParent(Conflict):
    code = "no_parent"


class BackupLocked(Conflict):
    """A restore point under an immutable lock (``details.immutable_until``)."""

    code = "immutable"


class HasDependents(Conflict):
    """Newer restore points read through this one (``details.dependents``)."""

    code = "has_dependents"


class BackupInUse(Conflict):
    """A job or a restore session holds the restore point."""

    code = "in_use"


class BackupNotRestorable(Conflict):
    """The backup is not a completed restore point (failed, being deleted, ...)."""

    code = "not_completed"


class InsufficientSpace(Conflict):
    """A backup would not fit (``details.needed_bytes``, ``details.available_bytes``)."""

    code = "insufficient_space"


class RepositoryNotEmpty(Conflict):
    """The repository holds backup records (``details.backups``)."""

    code = "not_empty"


class LocksLive(Conflict):
    """Immutable locks have not expired (``details.count``, ``details.latest``)."""

    code = "locks_live"


class RepositoryInUse(Conflict):
    """A job runs on the repository."""

    code = "in_use"


class PathInUse(Conflict):
    """Another repository already uses this folder, or one inside or around it."""

    code = "path_in_use"


class InventoryInUse(Conflict):
    """Jobs run on the node or on the source's VMs (``details.jobs``)."""

    code = "in_use"


class HasBackups(Conflict):
    """VMs of the source have restore points (``details.vms``: name and count)."""

    code = "has_backups"


class HasSources(Conflict):
    """The node still serves sources (``details.sources``); ``?cascade=true``
    removes them with it."""

    code = "has_sources"


class DestinationExists(Conflict):
    """A whole-disk restore would overwrite a file (``details.path``)."""

    code = "exists"


class ExportExists(Conflict):
    """The restore point is already exported (``details.export_id``)."""

    code = "export_exists"


class PathRefused(InvalidRequest):
    """A path inside a restore point that may not be read: ``..``, a NUL byte,
    or a symlink pointing outside its filesystem (``details.path``, ``details.reason``)."""

    code = "path_refused"


class FsPathNotFound(NotFound):
    """No such entry in the filesystem of a restore point (``details.path``)."""

    code = "path_not_found"


class NotADirectory(InvalidRequest):
    """A directory operation on a file (``details.path``)."""

    code = "not_a_directory"


class NotAFile(InvalidRequest):
    """A file operation on a directory or a special file (``details.path``, ``details.type``)."""

    code = "not_a_file"


class PartitionNotFound(NotFound):
    """No partition of that index on the disk (``details.partition``)."""

    code = "partition_not_found"


class NoFilesystem(Conflict):
    """The partition holds no filesystem we read (``details.partition``)."""

    code = "no_filesystem"


class FilesystemCorrupt(Conflict):
    """The filesystem inside a restore point could not be parsed for this
    request (corrupt, truncated or hostile); the parser process is replaced."""

    code = "filesystem_corrupt"


class ParserLimit(Conflict):
    """The parser process hit its memory or time limit and was stopped
    (``details.limit``: ``memory`` or ``time``)."""

    code = "parser_limit"


class ImageInUse(Conflict):
    """A file source's image is open for writing by a running QEMU (it holds
    QEMU's write lock): its backup would not be a point in time."""

    code = "image_in_use"


class ImageChanged(Conflict):
    """A file source's image changed while it was read (mtime or size moved):
    the copy is not a point in time and is refused."""

    code = "image_changed"


# vmware connector (connectors/vmware): no message holds a credential.


class VsphereLoginFailed(InvalidRequest):
    """vCenter refused the user name or password (the config is wrong: 400)."""

    code = "vsphere_login_failed"


class VsphereCertificate(InvalidRequest):
    """The server's TLS certificate is not trusted and neither ``insecure`` nor
    a matching ``thumbprint`` says to accept it."""

    code = "vsphere_certificate"


class VsphereUnreachable(Unavailable):
    """No answer from the vCenter (address, port, network): 503."""

    code = "vsphere_unreachable"


class VsphereFault(Error):
    """vSphere answered a call with a fault (``details.fault``: its type)."""

    code = "vsphere_fault"


class SnapshotFailed(VsphereFault):
    """The backup snapshot could not be created or removed."""

    code = "vsphere_snapshot_failed"


class NeedsVddk(Conflict):
    """The disks cannot be read without VMware's VDDK (the VM has snapshots of
    its own, or a disk is not a flat file on a datastore)."""

    code = "needs_vddk"


class DiskReadFailed(Error):
    """The disk reader (nbdkit) could not be started."""

    code = "vsphere_read_failed"


# --- Hub <-> node HTTPS (issue 10): pinning the node's certificate.


class FingerprintRequired(InvalidRequest):
    """An https node registered without a fingerprint: trust on first use made
    explicit (``details.fingerprint`` is what the node presented; check it and
    send it back)."""

    code = "fingerprint_required"


class FingerprintMismatch(InvalidRequest):
    """The node presented a certificate whose SHA-256 is not the one given."""

    code = "fingerprint_mismatch"


class PlainHttpRefused(InvalidRequest):
    """An http:// node URL beyond loopback (the token and source credentials
    would cross the network in clear)."""

    code = "plain_http_refused"


class EncryptionFixed(Conflict):
    """A repository's encryption is chosen at creation and never changes."""

    code = "encryption_fixed"


class NotEncrypted(Conflict):
    """The repository is not encrypted (it has no key to export)."""

    code = "not_encrypted"
