"""Templates and how values are shown (sizes, times, durations, statuses).

Autoescape is on for every template: anything from a VM, a guest filesystem
or a user is text, never markup.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote as _quote
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import (
    ChainableUndefined,
    Environment,
    FileSystemLoader,
    Undefined,
    make_logging_undefined,
    select_autoescape,
)

from sendense import __version__

TEMPLATES = Path(__file__).parent / "templates"
log = logging.getLogger(__name__)

env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(default=True, default_for_string=True),
    # A value missing from an answer renders empty (and is logged) rather than
    # failing the whole page.
    undefined=make_logging_undefined(log, ChainableUndefined),
    trim_blocks=True,
    lstrip_blocks=True,
)


def quote(text: str) -> str:
    return _quote(text, safe="")


def _missing(value: Any) -> bool:
    return value is None or isinstance(value, Undefined)


def size(value: Any) -> str:
    """Bytes for a person: 1.5 GiB (binary units, as qemu-img shows them)."""
    if _missing(value):
        return "-"
    n = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _parse(value: Any) -> datetime | None:
    if _missing(value) or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, UTC)
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def when(value: Any) -> str:
    """A time in UTC, to the second (the API's times are UTC)."""
    t = _parse(value)
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def iso(value: Any) -> str:
    t = _parse(value)
    return t.isoformat().replace("+00:00", "Z") if t else ""


def ago(value: Any) -> str:
    t = _parse(value)
    if t is None:
        return "never"
    return duration((datetime.now(UTC) - t).total_seconds()) + " ago"


def duration(seconds: Any) -> str:
    if _missing(seconds):
        return "-"
    s = int(float(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def rate(value: Any) -> str:
    return "-" if _missing(value) or not value else size(value) + "/s"


def short(value: Any) -> str:
    """The first 8 characters of an id (the whole id is in the link and title)."""
    return "-" if _missing(value) or not value else str(value)[:8]


def eta(value: Any) -> str:
    return "-" if _missing(value) else duration(value)


def percent(value: Any) -> str:
    return "-" if _missing(value) else f"{float(value):.1f} %"


def with_query(request: Request, **changes: Any) -> str:
    """The current page's URL with some query parameters changed (None drops one)."""
    params = dict(request.query_params)
    for k, v in changes.items():
        if v is None or v == "":
            params.pop(k, None)
        else:
            params[k] = str(v)
    query = urlencode(params)
    return request.url.path + (f"?{query}" if query else "")


env.filters.update(
    size=size,
    when=when,
    iso=iso,
    ago=ago,
    duration=duration,
    rate=rate,
    short=short,
    eta=eta,
    percent=percent,
    q=quote,
)


def page(
    request: Request, ctx: Any, template: str, *, status: int = 200, **context: Any
) -> HTMLResponse:
    html = env.get_template(template).render(
        request=request,
        page=ctx,
        version=__version__,
        with_query=lambda **kw: with_query(request, **kw),
        now_iso=iso(datetime.now(UTC)),
        **context,
    )
    return HTMLResponse(html, status_code=status)


def error_page(
    request: Request,
    status: int,
    title: str,
    message: str,
    *,
    code: str | None = None,
    details: dict[str, Any] | None = None,
) -> HTMLResponse:
    # The page may be rendered for someone signed in or not: no session needed.
    from sendense.console.page import signed_in

    try:
        ctx = signed_in(request)
    except Exception:
        ctx = None
    return page(
        request,
        ctx,
        "error.html",
        status=status,
        status_code=status,
        title=title,
        message=message,
        code=code,
        details=details or {},
        explain=EXPLAIN.get(code or "", ""),
    )


TITLES = {
    "has_dependents": "Newer restore points depend on this one",
    "immutable": "This restore point is locked",
    "in_use": "In use",
    "disk_busy": "The VM is busy",
    "no_parent": "No full backup to build on",
    "insufficient_space": "Not enough space in the repository",
    "forbidden": "Not allowed for your role",
    "not_found": "Not found",
    "invalid_request": "Invalid request",
}

EXPLAIN = {
    "has_dependents": "Incremental restore points are stored as differences from this one: "
    "deleting it alone would break them. Delete the newer ones first, or delete this one "
    "together with all of them.",
    "immutable": "Its repository keeps restore points unchangeable until their lock ends: "
    "nobody, not even an administrator, can delete it before then.",
    "in_use": "A running job or an open restore session reads it. Wait until that ends, "
    "or close the session / cancel the job, then try again.",
    "disk_busy": "Another job is writing this VM's disks (a backup, a consolidation or "
    "retention). Try again when it has finished.",
    "no_parent": "An incremental backup needs an earlier completed backup of the same disk "
    "in the same repository. Start a full (or auto) backup instead.",
    "forbidden": "Ask an administrator for a token with a higher role.",
}


def reason_title(code: str, status: int) -> str:
    if code in TITLES:
        return TITLES[code]
    return {400: "Invalid request", 403: "Refused", 404: "Not found", 409: "Refused"}.get(
        status, "Something went wrong"
    )
