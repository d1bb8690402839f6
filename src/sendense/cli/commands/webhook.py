"""``sendense webhook add | ls | rm | deliveries`` (admin).

Shares the global options (``--json``, URL, token) and output helpers of
``cli/main.py``, which registers ``webhook_app`` and hands itself over with
`bind`. The secret can come from ``SENDENSE_WEBHOOK_SECRET`` rather than
the command line (where other users of the host may see it); it is never
printed back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

if TYPE_CHECKING:
    from types import ModuleType

webhook_app = typer.Typer(
    help="Webhooks: a JSON POST on job failed/completed and missed runs.", no_args_is_help=True
)

EVENTS = ("job.failed", "job.completed", "run.missed", "run.finished")

_main: ModuleType | None = None


def bind(main: ModuleType) -> None:
    global _main
    _main = main


def _m() -> ModuleType:
    if _main is None:
        from sendense.cli import main

        return main
    return _main


def _policy_id(m: ModuleType, policy: str) -> str:
    """A policy's id from its name or id (the id as given when no name matches)."""
    found = m.call(m.client().get, "/api/v1/policies", name=policy)
    for p in found.get("policies", []):
        if p.get("name") == policy:
            return str(p["policy_id"])
    return policy


@webhook_app.command("add")
def webhook_add(
    url: Annotated[str, typer.Argument(help="http:// or https:// URL to POST to")],
    event: Annotated[
        list[str] | None, typer.Option(help=f"Event (repeat): {', '.join(EVENTS)}")
    ] = None,
    secret: Annotated[
        str | None,
        typer.Option(
            envvar="SENDENSE_WEBHOOK_SECRET",
            help="Key of the X-Sendense-Signature HMAC (16+ characters); never shown again",
        ),
    ] = None,
    policy: Annotated[
        str | None, typer.Option(help="Only this policy's jobs and runs (name or id)")
    ] = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="Add it switched off.")] = False,
) -> None:
    """Add a webhook (default events: job.failed and run.missed)."""
    m = _m()
    body: dict[str, Any] = {
        "url": url,
        "events": event or ["job.failed", "run.missed"],
        "enabled": not disabled,
    }
    if secret:
        body["secret"] = secret
    if policy:
        body["policy_id"] = _policy_id(m, policy)
    data = m.call(m.client().post, "/api/v1/webhooks", body)
    if m.ctx.json:
        m.out(data)
        return
    signed = "signed" if data["has_secret"] else "unsigned"
    m.console.print(
        f"webhook {data['webhook_id']} -> {data['url']} ({', '.join(data['events'])}; {signed})",
        markup=False,
    )


@webhook_app.command("ls")
def webhook_ls() -> None:
    m = _m()
    data = m.call(m.client().get, "/api/v1/webhooks")
    table = Table("webhook_id", "url", "events", "policy", "on", "secret", "pending", "failed")
    for h in data["webhooks"]:
        table.add_row(
            h["webhook_id"],
            h["url"],
            ", ".join(h["events"]),
            h["policy_id"] or "all",
            "yes" if h["enabled"] else "no",
            "yes" if h["has_secret"] else "no",
            str(h["pending"]),
            str(h["failed"]),
        )
    m.out(data, table)


@webhook_app.command("edit")
def webhook_edit(
    webhook_id: str,
    url: Annotated[str | None, typer.Option(help="A new URL")] = None,
    event: Annotated[
        list[str] | None, typer.Option(help="Events (repeat): replaces the list")
    ] = None,
    secret: Annotated[
        str | None,
        typer.Option(envvar="SENDENSE_WEBHOOK_SECRET", help="A new secret (16+ characters)"),
    ] = None,
    remove_secret: Annotated[
        bool, typer.Option("--remove-secret", help="Send unsigned from now on.")
    ] = False,
    enabled: Annotated[
        bool | None, typer.Option("--enable/--disable", help="Switch it on or off.")
    ] = None,
) -> None:
    """Change a webhook; what is not given stays."""
    m = _m()
    body: dict[str, Any] = {}
    if url:
        body["url"] = url
    if event:
        body["events"] = event
    if remove_secret:
        body["secret"] = None
    elif secret:
        body["secret"] = secret
    if enabled is not None:
        body["enabled"] = enabled
    data = m.call(m.client().request, "PATCH", f"/api/v1/webhooks/{webhook_id}", json=body)
    if m.ctx.json:
        m.out(data)
        return
    state = "on" if data["enabled"] else "off"
    signed = "signed" if data["has_secret"] else "unsigned"
    m.console.print(
        f"webhook {data['webhook_id']} -> {data['url']} "
        f"({', '.join(data['events'])}; {signed}; {state})",
        markup=False,
    )


@webhook_app.command("test")
def webhook_test(webhook_id: str) -> None:
    """Send a webhook.test event now; see it with `webhook deliveries`."""
    m = _m()
    data = m.call(m.client().post, f"/api/v1/webhooks/{webhook_id}/test")
    if m.ctx.json:
        m.out(data)
        return
    m.console.print(
        f"test delivery {data['delivery_id']} queued for webhook {webhook_id}", markup=False
    )


@webhook_app.command("rm")
def webhook_rm(webhook_id: str) -> None:
    """Remove a webhook and its outbox (pending deliveries are not sent)."""
    m = _m()
    data = m.call(m.client().request, "DELETE", f"/api/v1/webhooks/{webhook_id}")
    if m.ctx.json:
        m.out(data)
        return
    m.console.print(
        f"webhook {webhook_id} removed ({data['deliveries_removed']} deliveries)", markup=False
    )


@webhook_app.command("deliveries")
def webhook_deliveries(
    webhook_id: str,
    status: Annotated[str | None, typer.Option(help="pending, delivered or failed")] = None,
    limit: Annotated[int, typer.Option()] = 50,
) -> None:
    """The latest deliveries, newest first, with attempts and the last error."""
    m = _m()
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    data = m.call(m.client().get, f"/api/v1/webhooks/{webhook_id}/deliveries", **params)
    if not m.ctx.json and not data["deliveries"]:
        m.console.print(f"webhook {webhook_id}: no deliveries", markup=False)
        return
    table = Table("created", "event", "status", "attempts", "next attempt", "last error")
    for d in data["deliveries"]:
        table.add_row(
            d["created_at"] or "-",
            d["event"],
            d["status"],
            str(d["attempts"]),
            d["next_attempt_at"] or "-",
            d["last_error"] or "-",
        )
    m.out(data, table)
