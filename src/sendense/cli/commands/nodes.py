"""``sendense node add | ls | fingerprint | rm | edit`` and ``sendense source rm``.

These join the ``node`` and ``source`` groups of ``cli/main.py`` (add, ls):
`bind` is handed the main module (it may run as ``__main__`` under ``python
-m``, so this module does not import it by name) and adds the commands,
which use its global options (``--json``, URL, token) and output helpers.
A node or a source is named by its id or its name.

Exit status: 0 when done; 1 on an API error (a refusal prints why: the
jobs that run, the VMs that have restore points, the sources of a node).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.table import Table

from sendense.cli.client import ApiError

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


def _raise(e: Exception) -> NoReturn:
    raise e


def node_add(
    name: str,
    url: Annotated[str, typer.Argument(help="https://host:8081 (the node's default)")],
    token: Annotated[str | None, typer.Option(help="The node's token.")] = None,
    token_file: Annotated[Path | None, typer.Option(help="File holding the node's token.")] = None,
    fingerprint: Annotated[
        str | None,
        typer.Option(
            help="SHA-256 fingerprint of the node's certificate (the node prints it at "
            "start; `sendense node fingerprint` on the node). Hex, colons allowed."
        ),
    ] = None,
    yes: Annotated[
        bool,
        typer.Option(
            "--yes",
            "-y",
            help="Trust the certificate the node presents now without asking (trust on "
            "first use: only on a network you trust).",
        ),
    ] = False,
) -> None:
    """Register a node with the hub, pinning its TLS certificate.

    Without --fingerprint the hub answers with the fingerprint the node
    presents: it is shown and you confirm it (compare it with the node's own),
    or --yes takes it as it is."""
    m = _m()
    if token is None and token_file is not None:
        token = token_file.read_text().strip()
    if not token:
        m.err.print("[red]--token or --token-file is required")
        raise typer.Exit(2)
    body: dict[str, Any] = {"name": name, "url": url, "token": token}
    if fingerprint:
        body["fingerprint"] = fingerprint
    c = m.client()
    try:
        data = c.post("/api/v1/nodes", body)
    except ApiError as e:
        presented = (e.body.get("details") or {}).get("fingerprint")
        if e.body.get("error") != "fingerprint_required" or not presented or fingerprint:
            m.call(_raise, e)
            raise  # not reached: call() exits
        if not yes:
            if m.ctx.json or not sys.stdin.isatty():
                m.call(_raise, e)
            m.console.print(
                f"The node at {url} presents a certificate with SHA-256 fingerprint\n"
                f"  {presented}\n"
                "Compare it with the node's own (printed at its start, or "
                "`sendense node fingerprint` on the node).",
                markup=False,
            )
            if not typer.confirm("Is it the same? Pin it", default=False):
                m.err.print("[red]not registered")
                raise typer.Exit(1) from None
        data = m.call(c.post, "/api/v1/nodes", {**body, "fingerprint": presented})
    if m.ctx.json:
        m.out(data)
        return
    pinned = f", certificate {data['fingerprint']} pinned" if data.get("fingerprint") else ""
    m.console.print(f"node {name} registered: {data['node_id']}{pinned}", markup=False)


def node_ls() -> None:
    """Nodes, their health, and whether the hub reaches them over TLS."""
    m = _m()
    data = m.call(m.client().get, "/api/v1/nodes")
    t = Table("node_id", "name", "url", "health", "tls", "fingerprint", "jobs")
    for n in data["nodes"]:
        fp = n.get("fingerprint")
        t.add_row(
            n["node_id"],
            n["name"],
            n["url"],
            n["health"]["status"],
            "yes" if n.get("tls") else "no",
            f"{fp[:16]}..." if fp else "-",
            # running/limit, and how many wait (engine/dispatch.py)
            f"{n.get('jobs_running', 0)}/{n.get('job_limit') or '-'}"
            + (f" +{n['jobs_queued']} queued" if n.get("jobs_queued") else ""),
        )
    m.out(data, t)


def node_fingerprint(
    data_dir: Annotated[
        Path,
        typer.Option(envvar="SENDENSE_NODE_DATA_DIR", help="The node's data dir [var/node]."),
    ] = Path("var/node"),
    colons: Annotated[bool, typer.Option(help="AB:CD:... form.")] = False,
) -> None:
    """Print this node's certificate fingerprint (SHA-256), to give the hub at
    registration. Run it on the node; the certificate is made if the node has
    none yet (the node then uses it)."""
    from sendense.tls import colon_form, ensure_node_certificate

    m = _m()
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    cert = ensure_node_certificate(data_dir)
    if m.ctx.json:
        m.out(
            {
                "fingerprint": cert.fingerprint,
                "colon_form": colon_form(cert.fingerprint),
                "certificate_file": str(cert.cert_file),
                "created": cert.created,
            }
        )
        return
    print(colon_form(cert.fingerprint) if colons else cert.fingerprint)


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
    fingerprint: Annotated[
        str | None,
        typer.Option(
            help="Re-pin: the fingerprint of the node's new certificate (after the node's "
            "certificate was replaced)."
        ),
    ] = None,
    verify: Annotated[
        bool, typer.Option(help="Check the node answers with this URL and token first.")
    ] = True,
    max_jobs: Annotated[
        str | None,
        typer.Option(
            help="Backup jobs at a time on this node (1-1000), or 'default' for the hub's "
            "SENDENSE_NODE_JOB_LIMIT; more wait queued. Alone, the node is not contacted."
        ),
    ] = None,
) -> None:
    """Fix a node's URL or token, re-pin its certificate (jobs started
    afterwards use them), or set its job limit."""
    m = _m()
    if token is None and token_file is not None:
        token = token_file.read_text().strip()
    if url is None and token is None and fingerprint is None and max_jobs is None:
        m.err.print("[red]give --url, --token, --token-file, --fingerprint or --max-jobs")
        raise typer.Exit(2)
    body: dict[str, Any] = {}
    if url is not None or token is not None or fingerprint is not None:
        body["verify"] = verify
    if max_jobs is not None:
        if max_jobs == "default":
            body["max_jobs"] = None
        elif max_jobs.isdigit():
            body["max_jobs"] = int(max_jobs)
        else:
            m.err.print(f"[red]--max-jobs must be a number or 'default', not {max_jobs!r}")
            raise typer.Exit(2)
    if fingerprint is not None:
        body["fingerprint"] = fingerprint
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
    m.console.print(
        f"node {data['name']} updated: {data['url']} ({health}), "
        f"job limit {data.get('job_limit') or 'none'}"
        + ("" if data.get("max_jobs") is not None else " (the hub's default)"),
        markup=False,
    )


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
    main.node_app.command("add")(node_add)
    main.node_app.command("ls")(node_ls)
    main.node_app.command("fingerprint")(node_fingerprint)
    main.node_app.command("rm")(node_rm)
    main.node_app.command("edit")(node_edit)
    main.source_app.command("rm")(source_rm)
