"""The ``file`` source's config, checked without touching the disks::

    {"vms": [{"name": "web1", "paths": ["/images/web1.qcow2", "/dev/vg0/web1-data"]}]}

Each path is one disk of the VM, in order (disk keys 2000, 2001, ...), as the
node sees it: an image file (raw or qcow2, detected) or a block device. The
hub checks the shape when the source is registered; the node checks again,
and that each path can be read, when it discovers or backs up (errors name
the field, e.g. ``config.vms[0].paths[1]``).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any

from sendense.core.errors import InvalidRequest


@dataclass(frozen=True)
class FileVm:
    name: str
    paths: tuple[str, ...]
    index: int  # position in config.vms, for error messages

    def field(self, disk_index: int) -> str:
        return f"config.vms[{self.index}].paths[{disk_index}]"


def parse_config(config: dict[str, Any]) -> list[FileVm]:
    """The VMs of a ``file`` source config; `InvalidRequest` naming the field."""
    vms = config.get("vms")
    if not isinstance(vms, list) or not vms:
        raise InvalidRequest(
            'config.vms must be a non-empty list of {"name", "paths": [absolute paths]}',
            field="config.vms",
        )
    out: list[FileVm] = []
    names: set[str] = set()
    for i, vm in enumerate(vms):
        where = f"config.vms[{i}]"
        if not isinstance(vm, dict):
            raise InvalidRequest(f"{where} must be an object with name and paths", field=where)
        name = vm.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequest(f"{where}.name is required", field=f"{where}.name")
        if name in names:
            raise InvalidRequest(f"{where}.name {name!r} is used twice", field=f"{where}.name")
        names.add(name)
        paths = vm.get("paths")
        if not isinstance(paths, list) or not paths:
            raise InvalidRequest(
                f"{where}.paths is required: a non-empty list of absolute paths "
                "(image files or block devices, as the node sees them)",
                field=f"{where}.paths",
            )
        for j, path in enumerate(paths):
            field = f"{where}.paths[{j}]"
            if not isinstance(path, str) or not path.startswith("/"):
                raise InvalidRequest(
                    f"{field} must be an absolute path (got {path!r})", field=field
                )
            if "\0" in path or "\n" in path:
                raise InvalidRequest(f"{field} has a NUL or newline in it", field=field)
        if len(set(paths)) != len(paths):
            raise InvalidRequest(f"{where}.paths lists a path twice", field=f"{where}.paths")
        out.append(FileVm(name=name, paths=tuple(paths), index=i))
    return out


ROOTS_ENV = "SENDENSE_NODE_FILE_ROOTS"


def allowed_roots() -> list[str]:
    """``SENDENSE_NODE_FILE_ROOTS``: colon-separated folders the node may read
    images from (after symlinks); unset or empty: any path. The node's own
    settings are environment variables; this one is read where it is used."""
    value = os.environ.get(ROOTS_ENV, "")
    return [os.path.realpath(r) for r in value.split(":") if r.strip()]


def check_allowed(path: str, field: str, *, data_dir: str | None) -> None:
    """A path the node may serve: never inside its own data dir (its token,
    job logs), and under one of `allowed_roots` when they are set. Checked
    on the path with its symlinks resolved."""
    real = os.path.realpath(path)

    def under(root: str) -> bool:
        return real == root or real.startswith(root.rstrip("/") + "/")

    if data_dir is not None and under(os.path.realpath(data_dir)):
        raise InvalidRequest(f"{field}: {path} is inside the node's data directory", field=field)
    roots = allowed_roots()
    if roots and not any(under(r) for r in roots):
        raise InvalidRequest(
            f"{field}: {path} is not under the folders this node reads images from "
            f"({ROOTS_ENV}={':'.join(roots)})",
            field=field,
        )


def check_readable(path: str, field: str) -> bool:
    """That the node can open ``path`` for reading and it is a regular file or
    a block device (after symlinks, as LVM's ``/dev/vg/lv`` are). Returns
    whether it is a block device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidRequest(
            f"{field}: cannot read {path} on the node: {e.strerror or e}", field=field
        ) from None
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if stat.S_ISBLK(mode):
        return True
    if not stat.S_ISREG(mode):
        raise InvalidRequest(
            f"{field}: {path} is neither an image file nor a block device", field=field
        )
    return False
