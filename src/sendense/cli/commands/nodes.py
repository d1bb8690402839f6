"""``sendense node rm | edit`` and ``sendense source rm``.

These join the ``node`` and ``source`` groups of ``cli/main.py`` (add, ls):
`bind` is handed the main module (it may run as ``__main__`` under ``python
-m``, so this module does not import it by name) and adds the commands,
which use its global options (``--json``, URL, token) and output helpers.
A node or a source is named by its id or its name.

Exit status: 0 when done; 1 on an API error (a refusal prints why: the
jobs that run, the VMs that have restore points, the sources of a node).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from types import ModuleType

_main: ModuleType | None = None


def _m() -> ModuleType:
    if _main is None:
        from sendense.cli import main

        return main
    return _main


def _find(c: Any, kind: str, ref: str) -> str:
    """The id of the node/source with id or name ``ref`` (``ref`` itself if
    none: the hub answers 404)."""
    m = _m()
    for item in m.call(c.get, f"/api/v1/{kind}s")[f"{kind}s"]:
        if ref in (item[f"{kind}_id"], item["name"]):
            return str(item[f"{kind}_id"])
    return ref


def node_rm(
    node: Annotated[str, typer.Argument(help="node_id or name")],
    cascade: Annotated[
        bool, typer.Option(help="Also remove the node's sources and their VMs.")
    ] = False,
) -> None:
    """Remove a node. Refused while jobs run on it, while it has sources
    (unless --cascade), or while their VMs have restore points."""
    m = _m()
    c = m.client()
    params = {"cascade": "true"} if cascade else {}
    data = m.call(c.request, "DELETE", f"/api/v1/nodes/{_find(c, 'node', node)}", params=params)
    if m.ctx.json:
        m.out(data)
        return
    m.console.print(f"node {data['name']} removed", markup=False)
    if data["sources"]:
        m.console.print(
            f"  with {len(data['sources'])} source(s) and VMs: {', '.join(data['vms']) or '-'}",
            markup=False,
        )


def node_edit(
    node: Annotated[str, typer.Argument(help="node_id or name")],
    url: Annotated[str | None, typer.Option(help="The node's new URL.")] = None,
    token: Annotated[str | None, typer.Option(help="The node's new token.")] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="File holding the node's new token.")
    ] = None,
    verify: Annotated[
        bool, typer.Option(help="Check the node answers with this URL and token first.")
    ] = True,
) -> None:
    """Fix a node's URL or token (jobs started afterwards use them)."""
    m = _m()
    if token is None and token_file is not None:
        token = token_file.read_text().strip()
    if url is None and token is None:
        m.err.print("[red]give --url, --token or --token-file")
        raise typer.Exit(2)
    body: dict[str, Any] = {"verify": verify}
    if url is not None:
        body["url"] = url
    if token is not None:
        body["token"] = token
    c = m.client()
    data = m.call(c.request, "PATCH", f"/api/v1/nodes/{_find(c, 'node', node)}", json=body)
    if m.ctx.json:
        m.out(data)
        return
    health = (data.get("health") or {}).get("status", "unknown")
    m.console.print(f"node {data['name']} updated: {data['url']} ({health})", markup=False)


def source_rm(source: Annotated[str, typer.Argument(help="source_id or name")]) -> None:
    """Remove a source and its VMs. Refused while a job runs on one of them
    or while one has restore points."""
    m = _m()
    c = m.client()
    data = m.call(c.request, "DELETE", f"/api/v1/sources/{_find(c, 'source', source)}")
    if m.ctx.json:
        m.out(data)
        return
    vms = ", ".join(data["vms"]) or "-"
    m.console.print(f"source {data['name']} removed, with its VMs: {vms}", markup=False)


def bind(main: ModuleType) -> None:
    """Add the commands to ``main.node_app`` and ``main.source_app``."""
    global _main
    _main = main
    main.node_app.command("rm")(node_rm)
    main.node_app.command("edit")(node_edit)
    main.source_app.command("rm")(source_rm)
