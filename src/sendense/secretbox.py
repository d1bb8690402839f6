"""Encryption of credentials at rest (Fernet, key in ``<data-dir>/secret.key``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

# A config key holding a credential: one of these names, or ending in ``_<name>``
# (``admin_password``, ``vcenter_token``), in any case, ``-`` read as ``_``.
SECRET_KEYS = (
    "password",
    "passwd",
    "token",
    "secret",
    "api_key",
    "apikey",
    "access_key",
    "secret_key",
    "private_key",
    "passphrase",
    "key_passphrase",
    "credential",
    "credentials",
)


def is_secret_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    k = key.lower().replace("-", "_")
    return k in SECRET_KEYS or any(k.endswith("_" + name) for name in SECRET_KEYS)


class SecretBox:
    def __init__(self, key_path: Path) -> None:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        if not key_path.exists():
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
        self._fernet = Fernet(key_path.read_bytes().strip())

    def encrypt(self, value: Any) -> str:
        return self._fernet.encrypt(json.dumps(value).encode()).decode()

    def decrypt(self, token: str) -> Any:
        return json.loads(self._fernet.decrypt(token.encode()))


def _has_secret(value: Any) -> bool:
    if isinstance(value, dict):
        return any(is_secret_key(k) or _has_secret(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_secret(v) for v in value)
    return False


def redact(value: Any) -> Any:
    """``value`` without its credentials, at any depth (secret keys removed,
    the rest of the structure kept)."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items() if not is_secret_key(k)}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def split_secrets(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(public part, secret part) of a source config.

    Credentials may sit at any depth (``{"vms": [{"name", "password"}]}``).
    The public part is the config with every secret key removed, wherever it
    is. The secret part holds each top-level entry that has a credential
    somewhere inside, whole: ``{**public, **secret}`` (what the hub sends the
    node, see `merge_secrets`) is the config as given, and nothing but the
    encrypted part ever holds a credential.
    """
    public = redact(config)
    secret = {k: v for k, v in config.items() if is_secret_key(k) or _has_secret(v)}
    return public, secret


def merge_secrets(public: dict[str, Any], secret: dict[str, Any] | None) -> dict[str, Any]:
    """The config as given from its two parts (`split_secrets`)."""
    return {**public, **(secret or {})}


def secret_values(value: Any) -> list[str]:
    """Every credential string in ``value`` (to keep them out of messages)."""
    found: list[str] = []

    def walk(v: Any, secret: bool) -> None:
        if isinstance(v, dict):
            for k, item in v.items():
                walk(item, secret or is_secret_key(k))
        elif isinstance(v, list):
            for item in v:
                walk(item, secret)
        elif secret and v is not None and not isinstance(v, bool):
            text = str(v)
            if text:
                found.append(text)

    walk(value, False)
    return found


def _spellings(value: str) -> set[str]:
    """How a secret may appear in a message: as is, and escaped the way a
    repr or JSON writes it (an HTTP library quotes a bad header as bytes:
    ``Illegal header value b'Bearer abc\\ndef'``)."""
    forms = {value, repr(value)[1:-1], json.dumps(value)[1:-1]}
    try:
        forms.add(repr(value.encode())[2:-1])
    except UnicodeEncodeError:  # pragma: no cover - surrogates
        pass
    return {f for f in forms if f}


def scrub(text: str, secrets: list[str] | tuple[str, ...]) -> str:
    """``text`` with each of ``secrets`` (in any of its spellings) replaced by
    ``***``, longest first."""
    forms: set[str] = set()
    for value in secrets:
        if value:
            forms |= _spellings(value)
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, "***")
    return text
