"""``sendense token create | ls | revoke`` and ``sendense audit ls``.

Shares the global options (``--json``, URL, token) and output helpers of
``cli/main.py``, which registers this module's apps and hands itself over
with `bind`. ``token create`` prints the secret once, on its own line (or
in the JSON answer): store it then, the hub keeps only its hash.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

if TYPE_CHECKING:
    from types import ModuleType

token_app = typer.Typer(help="API tokens: roles, tenants, expiry.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log (admin).", no_args_is_help=True)

_main: ModuleType | None = None


def bind(main: ModuleType) -> None:
    global _main
    _main = main


def _m() -> ModuleType:
    if _main is None:
        from sendense.cli import main

        return main
    return _main


def _scope(vms: list[str], repositories: list[str]) -> dict[str, Any] | None:
    if not vms and not repositories:
        return None
    return {"vms": vms, "repositories": repositories}


@token_app.command("create")
def token_create(
    name: str,
    role: Annotated[str, typer.Option(help="viewer, operator or admin")] = "viewer",
    expires: Annotated[
        str | None, typer.Option(help="Expiry, ISO 8601 with a zone (2027-01-31T00:00:00Z)")
    ] = None,
    vm: Annotated[
        list[str] | None, typer.Option(help="Scope: a VM name or tag:key=value (repeat)")
    ] = None,
    repo: Annotated[list[str] | None, typer.Option(help="Scope: a repository id (repeat)")] = None,
) -> None:
    """Issue a token. Its secret is printed once: keep it."""
    m = _m()
    body: dict[str, Any] = {"name": name, "role": role}
    if expires:
        body["expires_at"] = expires
    scope = _scope(vm or [], repo or [])
    if scope is not None:
        body["scope"] = scope
    data = m.call(m.client().post, "/api/v1/tokens", body)
    if m.ctx.json:
        m.out(data)
        return
    m.console.print(f"token {data['name']} ({data['role']}) id {data['token_id']}", markup=False)
    m.console.print("secret (shown once, store it now):", markup=False)
    print(data["token"])


@token_app.command("ls")
def token_ls(
    revoked: Annotated[bool, typer.Option("--revoked", help="Include revoked tokens.")] = False,
) -> None:
    m = _m()
    data = m.call(m.client().get, "/api/v1/tokens", include_revoked=str(revoked).lower())
    table = Table("token_id", "name", "role", "scope", "expires", "revoked", "last used")
    for t in data["tokens"]:
        scope = t["scope"]
        where = (
            ", ".join(
                [*scope.get("vms", []), *("repo:" + r for r in scope.get("repositories", []))]
            )
            if scope
            else "all"
        )
        table.add_row(
            t["token_id"],
            t["name"],
            t["role"],
            where,
            t["expires_at"] or "-",
            t["revoked_at"] or "-",
            t["last_used_at"] or "-",
        )
    m.out(data, table)


@token_app.command("revoke")
def token_revoke(token: Annotated[str, typer.Argument(help="token_id or name")]) -> None:
    """Revoke a token: it stops working at once."""
    m = _m()
    c = m.client()
    token_id = token
    for t in m.call(c.get, "/api/v1/tokens")["tokens"]:
        if token in (t["token_id"], t["name"]):
            token_id = t["token_id"]
    data = m.call(c.request, "DELETE", f"/api/v1/tokens/{token_id}")
    if m.ctx.json:
        m.out(data)
        return
    m.console.print(f"token {data['name']} revoked at {data['revoked_at']}", markup=False)


@audit_app.command("ls")
def audit_ls(
    token: Annotated[str | None, typer.Option(help="Only this token's name.")] = None,
    route: Annotated[str | None, typer.Option(help="Only this route template.")] = None,
    since: Annotated[str | None, typer.Option(help="ISO 8601 time.")] = None,
    limit: Annotated[int, typer.Option()] = 50,
) -> None:
    m = _m()
    params: dict[str, Any] = {"limit": limit}
    for key, value in (("token", token), ("route", route), ("since", since)):
        if value:
            params[key] = value
    data = m.call(m.client().get, "/api/v1/audit", **params)
    table = Table("at", "token", "method", "route", "target", "status")
    for e in data["entries"]:
        target = ", ".join(f"{k}={v}" for k, v in e["target"].items())
        table.add_row(
            e["at"], e["token_name"] or "-", e["method"], e["route"], target, str(e["status"])
        )
    m.out(data, table)
