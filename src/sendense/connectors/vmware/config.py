"""The ``vmware`` source config, checked (no I/O, no pyVmomi: the hub uses it
at registration too).

``{"host", "user", "password", "datacenter"?, "port"?: 443, "insecure"?: false,
"thumbprint"?, "quiesce"?: false}``. The original node API's names
``vcenter_host``, ``vcenter_user`` and ``vcenter_password`` are accepted for
``host``, ``user`` and ``password``.

- ``insecure``: accept any server certificate (a lab vCenter with its own
  self-signed certificate).
- ``thumbprint``: the SHA-1 (40 hex digits) or SHA-256 (64) fingerprint of the
  server's certificate, with or without colons: that certificate is accepted
  even when no CA vouches for it (pinning, safer than ``insecure``).
- ``quiesce``: ask VMware Tools to quiesce the guest file systems for the
  backup snapshot.

Errors name the field (``config.host is required``) and never quote the
password.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sendense.core.errors import InvalidRequest

ALIASES = {"host": "vcenter_host", "user": "vcenter_user", "password": "vcenter_password"}
KNOWN = {"host", "user", "password", "datacenter", "port", "insecure", "thumbprint", "quiesce"}
HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?)$")


@dataclass(frozen=True)
class VmwareConfig:
    host: str
    user: str
    password: str = field(repr=False)
    port: int = 443
    datacenter: str | None = None
    insecure: bool = False
    # Lowercase hex, no colons (what pyVmomi compares); None: not pinned.
    thumbprint: str | None = None
    quiesce: bool = False

    @property
    def verify_tls(self) -> bool:
        """Whether the certificate must be trusted by a CA."""
        return not self.insecure and self.thumbprint is None

    @property
    def netloc(self) -> str:
        return self.host if self.port == 443 else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, config: Any, *, where: str = "source.config") -> VmwareConfig:
        if not isinstance(config, dict):
            raise InvalidRequest(f"{where} must be an object", fields=[where])

        def name(key: str) -> str:
            return f"{where}.{key}"

        def text(key: str, *, required: bool) -> str | None:
            value = config.get(key)
            if value is None and key in ALIASES:
                value = config.get(ALIASES[key])
            if value is None or value == "":
                if required:
                    raise InvalidRequest(f"{name(key)} is required", fields=[name(key)])
                return None
            if not isinstance(value, str):
                raise InvalidRequest(f"{name(key)} must be a string", fields=[name(key)])
            return value

        unknown = sorted(
            k for k in config if k not in KNOWN and k not in ALIASES.values() and k != "type"
        )
        if unknown:
            raise InvalidRequest(
                f"{where} has unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(KNOWN))})",
                fields=[name(k) for k in unknown],
            )
        host = text("host", required=True)
        assert host is not None
        if not HOST.match(host):
            raise InvalidRequest(
                f"{name('host')} must be a host name or address, without scheme, port or path "
                "(the port goes in port)",
                fields=[name("host")],
            )
        user = text("user", required=True)
        password = text("password", required=True)
        assert user is not None and password is not None
        if any(c in user for c in "\r\n\0"):
            raise InvalidRequest(f"{name('user')} has a control character", fields=[name("user")])
        datacenter = text("datacenter", required=False)
        port = config.get("port", 443)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidRequest(
                f"{name('port')} must be a port number (1-65535)", fields=[name("port")]
            )
        flags = {}
        for key in ("insecure", "quiesce"):
            value = config.get(key, False)
            if not isinstance(value, bool):
                raise InvalidRequest(f"{name(key)} must be true or false", fields=[name(key)])
            flags[key] = value
        thumbprint = text("thumbprint", required=False)
        if thumbprint is not None:
            digits = thumbprint.replace(":", "").lower()
            if len(digits) not in (40, 64) or not re.fullmatch(r"[0-9a-f]+", digits):
                raise InvalidRequest(
                    f"{name('thumbprint')} must be the certificate's SHA-1 (40 hex digits) or "
                    "SHA-256 (64) fingerprint, colons allowed",
                    fields=[name("thumbprint")],
                )
            thumbprint = digits
        return cls(
            host=host,
            user=user,
            password=password,
            port=port,
            datacenter=datacenter,
            insecure=flags["insecure"],
            thumbprint=thumbprint,
            quiesce=flags["quiesce"],
        )
