"""What the hub checks before a request reaches a route: the token, the body's
size, and that a JSON body is UTF-8 and not absurdly deep.

One pure ASGI middleware (`RequestGuard`), in this order:

1. ``/api/v1/*`` except ``/api/v1/health`` needs a valid bearer token: 401
   before a byte of the body is read (FastAPI parses a JSON body before a
   route's dependencies run, so without this a malformed body from anybody
   answered 400 and a big one was parsed). The caller is kept in
   ``request.state.principal`` for the route's role check.
2. The body is at most ``max_body`` bytes (``SENDENSE_MAX_BODY_BYTES``, 1 MiB
   by default): 413 from ``Content-Length`` alone, or while counting the
   chunks of a body sent without one (chunked).
3. A JSON body (no content type, or ``application/json`` / ``+json``) must be
   UTF-8 and nest at most `MAX_DEPTH` levels: 400 ``invalid_request``, where
   the parser would answer a bare 400 or hit Python's recursion limit.

Answers use the one error body (``web/errors.py``).
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Awaitable, Callable, MutableMapping
from email.message import Message
from itertools import accumulate
from typing import Any

import anyio.to_thread

from sendense.auth import token_matches
from sendense.core.access import ADMIN, Principal
from sendense.core.errors import Error, Unauthorized

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_DEPTH = 64
OPEN_PATHS = ("/api/v1/health",)
# A JSON string ("unrolled": no backtracking), and what is not a bracket.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes
# Bodies above this are checked in a worker thread, not on the event loop
# (a 1 MiB body takes up to ~80 ms).
INLINE_CHECK = 64 * 1024


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in ``text`` (brackets inside strings
    do not count). No parsing, so no recursion, and no Python loop per
    character: strings and non-brackets go by regex, the running depth is a
    C-level sum over +1/-1 steps."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    return max(accumulate(array("b", brackets.translate(_STEPS))), default=0)


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI would parse the body as JSON (it does with no type too)."""
    if not content_type:
        return True
    m = Message()
    m["content-type"] = content_type
    if m.get_content_maintype() != "application":
        return False
    sub = m.get_content_subtype()
    return sub == "json" or sub.endswith("+json")


def bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text = value.decode("latin-1")
            kind, _, token = text.partition(" ")
            if kind.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
    **details: Any,
) -> None:
    body = json.dumps({"error": code, "message": message, "details": details}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    pass


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body: int,
        authenticate: Callable[[Any, str | None], Principal] | None = None,
    ) -> None:
        self.app = app
        self.max_body = max_body
        # (hub state, token) -> Principal, raising Unauthorized (deps.principal_of).
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if self.authenticate is not None and path.startswith("/api/") and path not in OPEN_PATHS:
            try:
                who = await self._principal(scope)
            except Error as e:
                await send_error(
                    send, 401, e.code, e.message, [(b"www-authenticate", b"Bearer")], **e.details
                )
                return
            scope.setdefault("state", {})["principal"] = who
        length = header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await send_error(send, 400, "invalid_request", "Content-Length is not a number")
                return
            if declared > self.max_body:
                await self._too_large(send)
                return
        try:
            body, after = await self._read_body(receive)
        except BodyTooLarge:
            await self._too_large(send)
            return
        if after is not None and after["type"] == "http.disconnect":
            return  # the client went away mid-body: nobody to answer
        if body and is_json(header(scope, b"content-type")):
            if len(body) <= INLINE_CHECK:
                problem = self._check_json(body)
            else:
                problem = await anyio.to_thread.run_sync(self._check_json, body)
            if problem is not None:
                await send_error(send, 400, "invalid_request", problem, fields=["body"])
                return
        await self.app(scope, self._replay(body, after, receive), send)

    async def _principal(self, scope: Scope) -> Principal:
        token = bearer(scope)
        app = scope.get("app")
        st = getattr(getattr(app, "state", None), "hub", None)
        if st is None or self.authenticate is None:  # pragma: no cover - before startup
            raise Unauthorized("the hub is starting")
        if token and token_matches(token, st.admin_token):
            return ADMIN  # no catalog read: no thread needed
        # API tokens are looked up in the catalog: not on the event loop.
        return await anyio.to_thread.run_sync(self.authenticate, st, token)

    async def _read_body(self, receive: Receive) -> tuple[bytes, ASGIMessage | None]:
        """The whole body, counting as it comes; and a non-body message that
        arrived instead (a disconnect), to hand on."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), message
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    @staticmethod
    def _replay(body: bytes, after: ASGIMessage | None, receive: Receive) -> Receive:
        """``receive`` for the app: the body in one message, then what the
        server says next (a disconnect)."""
        pending: list[ASGIMessage] = [{"type": "http.request", "body": body, "more_body": False}]
        if after is not None:
            pending.append(after)

        async def replay() -> ASGIMessage:
            if pending:
                return pending.pop(0)
            return await receive()

        return replay

    @staticmethod
    def _check_json(body: bytes) -> str | None:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            return f"request body is not valid UTF-8 (byte {e.start})"
        if json_depth(text) > MAX_DEPTH:
            return f"request body nests deeper than {MAX_DEPTH} levels"
        return None

    async def _too_large(self, send: Send) -> None:
        await send_error(
            send,
            413,
            "too_large",
            f"request body is larger than {self.max_body} bytes (SENDENSE_MAX_BODY_BYTES)",
            max_bytes=self.max_body,
        )
