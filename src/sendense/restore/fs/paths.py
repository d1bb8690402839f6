"""Paths inside a restore point's filesystem, checked before any parsing.

A request names an entry by a POSIX-style path from the filesystem's root
("/etc/fstab"; a missing leading slash means the same). Refused outright,
whatever the filesystem holds: a NUL byte, a ``..`` component (even one that
would stay inside: nobody needs it, and refusing is simpler to audit than
resolving), and over-long paths. ``.`` and repeated slashes are dropped.
Symlinks met while resolving are followed by the worker, inside the
filesystem only (see `resolve_link`).
"""

from __future__ import annotations

from sendense.core.errors import PathRefused

MAX_PATH = 4096
MAX_COMPONENT = 1024


def split_path(path: str) -> list[str]:
    """The components of ``path`` from the root, or `PathRefused`."""
    if "\x00" in path:
        raise PathRefused(
            "the path holds a NUL byte", path=path.replace("\x00", "\\0"), reason="nul"
        )
    if len(path) > MAX_PATH:
        raise PathRefused("the path is too long", path=path[:200] + "...", reason="too_long")
    parts = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise PathRefused("'..' is not allowed in a path", path=path, reason="dotdot")
        if len(part) > MAX_COMPONENT:
            raise PathRefused(
                "a path component is too long", path=path[:200] + "...", reason="too_long"
            )
        parts.append(part)
    return parts


def join_path(parts: list[str]) -> str:
    return "/" + "/".join(parts)


def resolve_link(parent: list[str], target: str, path: str) -> list[str]:
    """The components a symlink in directory ``parent`` points to.

    An absolute target is taken from the filesystem's root (the guest's view);
    ``..`` is resolved lexically and refused when it climbs above the root:
    such a link points outside the filesystem (``path`` is the request, for
    the error).
    """
    if "\x00" in target or not target:
        raise PathRefused(
            "a symlink on the path has an invalid target", path=path, reason="bad_link"
        )
    out = [] if target.startswith("/") else list(parent)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                raise PathRefused(
                    "a symlink on the path points outside the filesystem",
                    path=path,
                    reason="link_escapes",
                )
            out.pop()
            continue
        out.append(part)
    return out
