"""The one place where domain errors become HTTP answers (the node uses it too).

Body everywhere: ``{"error": code, "message": text, "details": {...}}``.
Validation problems are 400 (never 422), with the field named in the message.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from sendense.core import errors as e

log = logging.getLogger(__name__)

STATUS = [
    (e.InvalidRequest, 400),
    (e.Unauthorized, 401),
    (e.Forbidden, 403),
    (e.NotFound, 404),
    (e.Conflict, 409),
    (e.Unavailable, 503),
]


def status_of(err: e.Error) -> int:
    for cls, code in STATUS:
        if isinstance(err, cls):
            return code
    return 500


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _fields(err: dict[str, Any]) -> str:
    # A JSON syntax error's loc is (body, <character offset>): the field is the body.
    if err.get("type") == "json_invalid":
        return "body"
    return _field(tuple(err.get("loc", ())))


def validation_message(errors: list[dict[str, Any]]) -> str:
    msgs = []
    for err in errors:
        field = _field(tuple(err.get("loc", ())))
        if err.get("type") == "missing":
            msgs.append(f"{field} is required")
        elif err.get("type") == "json_invalid":
            msgs.append("request body is not valid JSON")
        else:
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            msgs.append(f"{field}: {msg}")
    return "; ".join(msgs)


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route accepts on the request's path (asked of the
    routes themselves, whatever the nesting of included routers)."""
    routes = request.app.router.routes
    return [
        m
        for m in METHODS
        if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)
    ]


def error_response(status: int, code: str, message: str, **details: Any) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": code, "message": message, "details": details}
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(e.Error)
    async def domain_error(request: Request, exc: e.Error) -> JSONResponse:
        status = status_of(exc)
        if status == 500:
            log.error("unhandled domain error path=%s error=%s", request.url.path, exc.message)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        resp = JSONResponse(status_code=status, content=exc.to_body(), headers=headers)
        return resp

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = list(exc.errors())
        fields = [_fields(x) for x in errs]
        return error_response(
            400, "invalid_request", validation_message(errs), fields=sorted(set(fields))
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        if exc.status_code == 400:
            # FastAPI's "There was an error parsing the body" (a body it could
            # not decode): the client's fault, in the one validation shape.
            code = "invalid_request"
        resp = error_response(exc.status_code, code, str(exc.detail))
        # e.g. Allow on a 405 (RFC 9110 15.5.6), WWW-Authenticate on a 401.
        for name, value in (exc.headers or {}).items():
            resp.headers[name] = value
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only;
            # GET and POST /x are two routes.
            resp.headers["Allow"] = ", ".join(allowed_methods(request)) or resp.headers.get(
                "Allow", ""
            )
        return resp

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error path=%s", request.url.path)
        return error_response(500, "internal_error", "internal error (see the server log)")
