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


# ---------------------------------------------------------------- names as bytes
#
# Names are bytes on ext and XFS; the worker decodes them as UTF-8 with
# ``surrogateescape`` (a byte that is not part of valid UTF-8 becomes a lone
# surrogate U+DC80..U+DCFF). Such a string cannot be written as UTF-8 (JSON,
# HTTP headers, ZIP names), so the API shows it *escaped*: every such byte as
# ``%XX`` and every ``%`` as ``%25``, with ``escaped: true`` on the entry.
# A client sends an escaped path back with ``escaped=true``; `unescape`
# gives the original bytes (as the worker's string) again.


def has_raw_bytes(text: str) -> bool:
    """True when ``text`` holds a character UTF-8 cannot encode (a byte kept
    by ``surrogateescape``, or any other lone surrogate)."""
    return any("\ud800" <= c <= "\udfff" for c in text)


def escape(text: str) -> str:
    """The escaped form: raw bytes as ``%XX``, ``%`` as ``%25``; other lone
    surrogates (an NTFS name with a broken UTF-16 pair) as U+FFFD."""
    out = []
    for c in text:
        if "\udc80" <= c <= "\udcff":
            out.append(f"%{ord(c) - 0xDC00:02X}")
        elif c == "%":
            out.append("%25")
        elif "\ud800" <= c <= "\udfff":
            out.append("\ufffd")
        else:
            out.append(c)
    return "".join(out)


def shown(text: str) -> str:
    """``text`` as it can be written out (messages, headers): escaped only
    when it must be."""
    return escape(text) if has_raw_bytes(text) else text


def unescape(text: str) -> str:
    """The worker's string for an escaped path (``%XX`` -> the byte XX, then
    the bytes decoded as the worker decodes names). A ``%`` not followed by
    two hex digits is `PathRefused` (``bad_escape``)."""
    raw = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "%":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or any(h not in "0123456789abcdefABCDEF" for h in pair):
                raise PathRefused(
                    "an escaped path holds '%' without two hex digits after it",
                    path=text[:200],
                    reason="bad_escape",
                )
            raw.append(int(pair, 16))
            i += 3
            continue
        try:
            raw += c.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise PathRefused(
                "the path holds a lone surrogate", path=escape(text[:200]), reason="bad_escape"
            ) from None
        i += 1
    return raw.decode("utf-8", "surrogateescape")
