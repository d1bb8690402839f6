"""Field checks shared by the hub's schemas: each raises ValueError naming
what is wrong, which the error handler turns into a 400 naming the field."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BeforeValidator


def check_url(value: str | None) -> str | None:
    """An http(s) URL with a host and, if given, a valid port."""
    if value is None:
        return None
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as e:
        raise ValueError(f"is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("has no host")
    if parts.username is not None or parts.password is not None:
        # GET /nodes shows the URL: a password in it would be shown to all.
        raise ValueError("must not hold credentials (user:password@); the token is separate")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    if port == 0:
        raise ValueError("port must be 1-65535")
    return value.rstrip("/")


def check_token_text(value: str | None) -> str | None:
    """A bearer token: printable ASCII, no spaces (it goes into an HTTP header).

    The message never repeats the value: it is a credential.
    """
    if value is None:
        return None
    if not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise ValueError("must be printable ASCII without spaces or control characters")
    return value


_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def _iso_only(value: object) -> object:
    """Pydantic reads a bare number as Unix time; the API promises ISO 8601."""
    if value is None or isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _ISO_DATE.match(value.strip()):
        raise ValueError("must be an ISO 8601 date-time (2026-11-23T10:00:00Z), not a number")
    return value


# A date-time in a query string: ISO 8601 only (``since``, ``until``).
IsoDateTime = Annotated[datetime | None, BeforeValidator(_iso_only)]
