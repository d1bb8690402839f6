"""A small HTTP client of the hub API for the CLI (and the demo)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        super().__init__(f"{status} {body.get('error')}: {body.get('message')}")


def hub_verify(ca_file: str | Path | None) -> ssl.SSLContext | bool:
    """How an https hub is checked: against ``ca_file`` (PEM: a private CA,
    or the hub's self-signed certificate itself) when given, else the
    system's trusted CAs. Host names are always checked."""
    if not ca_file:
        return True
    return ssl.create_default_context(cafile=str(ca_file))


class HubClient:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 60.0,
        ca_file: str | Path | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            verify=hub_verify(ca_file),
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.http.request(method, path, **kwargs)
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = {"error": "http_error", "message": r.text}
            raise ApiError(r.status_code, body)
        return r.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, json=body or {})

    def events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Follow a job's server-sent events until it ends."""
        with self.http.stream("GET", f"/api/v1/jobs/{job_id}/events", timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                raise ApiError(r.status_code, r.json())
            event = None
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    data = json.loads(line.split(":", 1)[1])
                    yield data
                    if event == "end":
                        return
