"""The hub's OpenAPI document as the hub really answers.

Every route documents the error statuses it can answer, each with the one
error body; validation errors are 400 (never 422).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel


class ErrorBody(BaseModel):
    """One error body everywhere."""

    error: str
    message: str
    details: dict[str, Any]


DESCRIPTIONS = {
    400: "Invalid request (the message names the field)",
    401: "Missing, invalid, revoked or expired token",
    403: "The token's role does not allow this (details.role_needed)",
    404: "Not found, or outside the token's scope",
    409: "Conflict (busy, dependents, immutable, in use, ...)",
    413: "Request body too large",
    503: "A node or hypervisor is unavailable",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: 400, 401 and 403 always, plus ``statuses``."""
    return {
        code: {"model": ErrorBody, "description": DESCRIPTIONS[code]}
        for code in sorted({400, 401, 403, *statuses})
    }


def install_openapi(app: FastAPI) -> None:
    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                if "requestBody" in op and "413" not in responses:
                    # hub/limits.py answers it before the route runs.
                    responses["413"] = {
                        "description": DESCRIPTIONS[413],
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ErrorBody"}
                            }
                        },
                    }
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = build  # type: ignore[method-assign]
