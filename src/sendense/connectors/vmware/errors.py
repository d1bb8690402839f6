"""Errors of the vmware connector, by category (the node turns categories into
HTTP answers; a job reports ``code`` and message). No message ever holds a
credential: the password is never formatted into one."""

from __future__ import annotations

from sendense.core.errors import Conflict, Error, InvalidRequest, Unavailable


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
