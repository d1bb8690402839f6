"""A webhook's credentials at rest: its HMAC secret and a password in its URL.

The catalog row keeps the URL with its password replaced by ``***`` (what
the API shows anyway) and one encrypted value (`SecretBox`) holding the
credentials:

- no URL password: the secret alone, a JSON string (the format of rows
  written before URL passwords were sealed);
- a URL password: ``{"secret": str | null, "url_password": str}``.

A row written before this (the URL's password in clear, the secret a JSON
string) still reads as it was: `unseal` returns its URL unchanged; the hub
seals such rows at start (`seal_stored_urls`).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import select

from sendense.catalog.db import Database
from sendense.secretbox import SecretBox

log = logging.getLogger(__name__)

HIDDEN = "***"


def with_password(url: str, password: str) -> str:
    """``url`` with the password of its user part set to ``password``."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{password}@{host}"))


def shown_url(url: str) -> str:
    """The URL with a password in its user part replaced by ``***``."""
    if urlsplit(url).password is None:
        return url
    return with_password(url, HIDDEN)


def seal(box: SecretBox, url: str, secret: str | None) -> tuple[str, str | None]:
    """(the URL as stored, the encrypted credentials or None)."""
    password = urlsplit(url).password
    if password is None:
        return url, box.encrypt(secret) if secret else None
    return shown_url(url), box.encrypt({"secret": secret, "url_password": password})


def credentials(box: SecretBox, sealed: str | None) -> tuple[str | None, str | None]:
    """(the HMAC secret, the URL's password) of a row's encrypted value."""
    if not sealed:
        return None, None
    value: Any = box.decrypt(sealed)
    if isinstance(value, dict):
        secret, password = value.get("secret"), value.get("url_password")
        return (str(secret) if secret else None), (str(password) if password else None)
    return str(value), None


def unseal(box: SecretBox, stored_url: str, sealed: str | None) -> tuple[str, str | None]:
    """(the URL to POST to, the HMAC secret) from a row's two columns."""
    secret, password = credentials(box, sealed)
    return (with_password(stored_url, password) if password else stored_url), secret


def seal_stored_urls(db: Database, box: SecretBox) -> int:
    """At hub start: seal the URL passwords of webhooks written before they
    were sealed (the password in the stored URL). Returns how many changed."""
    from sendense.catalog.models import Webhook

    changed = 0
    with db.session() as s:
        for hook in s.scalars(select(Webhook)):
            if urlsplit(hook.url).password in (None, HIDDEN):
                continue
            url, secret = unseal(box, hook.url, hook.secret_encrypted)
            hook.url, hook.secret_encrypted = seal(box, url, secret)
            changed += 1
    if changed:
        log.warning("sealed the URL passwords of %d webhook(s) stored in clear", changed)
    return changed
