"""Encryption of credentials at rest (Fernet, key in ``<data-dir>/secret.key``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

SECRET_KEYS = ("password", "token", "secret", "api_key", "apikey", "key_passphrase")


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


def split_secrets(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(public part, secret part) of a source config: secret keys at top level."""
    public = {k: v for k, v in config.items() if k.lower() not in SECRET_KEYS}
    secret = {k: v for k, v in config.items() if k.lower() in SECRET_KEYS}
    return public, secret
