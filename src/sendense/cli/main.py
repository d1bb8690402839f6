"""``sendense``: the CLI. Serving commands start the hub or a node; every other
command is a client of the hub API (URL and token from flags, environment
``SENDENSE_URL`` / ``SENDENSE_TOKEN``, or ``<data-dir>/admin.token``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from sendense.cli.client import ApiError, HubClient

app = typer.Typer(help="Sendense: open, API-first VM backup.", no_args_is_help=True)
hub_app = typer.Typer(help="The hub: API, catalog, repositories.", no_args_is_help=True)
node_app = typer.Typer(help="Nodes: agents next to the hypervisors.", no_args_is_help=True)
source_app = typer.Typer(help="Sources: hypervisor endpoints.", no_args_is_help=True)
vm_app = typer.Typer(help="VMs and their disks.", no_args_is_help=True)
backup_app = typer.Typer(help="Backups (restore points).", no_args_is_help=True)
job_app = typer.Typer(help="Jobs and their progress.", no_args_is_help=True)
for sub, name in [
    (hub_app, "hub"),
    (node_app, "node"),
    (source_app, "source"),
    (vm_app, "vm"),
    (backup_app, "backup"),
    (job_app, "job"),
]:
    app.add_typer(sub, name=name)

console = Console()
err = Console(stderr=True)


class Ctx:
    url: str = "http://127.0.0.1:8082"
    token: str | None = None
    json: bool = False


ctx = Ctx()


@app.callback()
def main_options(
    url: Annotated[str, typer.Option(envvar="SENDENSE_URL", help="Hub URL.")] = ctx.url,
    token: Annotated[
        str | None, typer.Option(envvar="SENDENSE_TOKEN", help="Bearer token.")
    ] = None,
    data_dir: Annotated[
        Path, typer.Option(envvar="SENDENSE_DATA_DIR", help="Hub data dir (for admin.token).")
    ] = Path("var/hub"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    ctx.url = url
    ctx.json = as_json
    if token is None:
        path = data_dir / "admin.token"
        if path.exists():
            token = path.read_text().strip()
    ctx.token = token


def client() -> HubClient:
    if not ctx.token:
        err.print("[red]no token: set SENDENSE_TOKEN or --token, or run next to the hub's data dir")
        raise typer.Exit(2)
    return HubClient(ctx.url, ctx.token)


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ApiError as e:
        if ctx.json:
            print(json.dumps({"status": e.status, **e.body}))
        else:
            err.print(f"[red]error {e.status} {e.body.get('error')}: {e.body.get('message')}")
        raise typer.Exit(1) from e
    except Exception as e:  # connection refused etc.
        err.print(f"[red]cannot reach the hub at {ctx.url}: {e}")
        raise typer.Exit(1) from e


def out(data: Any, table: Table | None = None) -> None:
    if ctx.json or table is None:
        print(json.dumps(data, indent=2))
    else:
        console.print(table)


def human(n: int | float | None) -> str:
    if n is None:
        return "-"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.1f} {unit}" if unit != "B" else f"{int(v)} B"
        v /= 1024
    return str(n)


# ---------------------------------------------------------------- serving


@hub_app.command("serve")
def hub_serve(
    host: Annotated[str | None, typer.Option(help="Listen address [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port [8082].")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Catalog, tokens, repositories [var/hub].")
    ] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL [SQLite].")] = None,
    log_level: Annotated[str | None, typer.Option(help="[info]")] = None,
) -> None:
    """Run the hub (REST API, catalog, NBD targets). Flags override SENDENSE_* settings."""
    from sendense.hub.app import create_app
    from sendense.settings import HubSettings

    given = {"host": host, "port": port, "data_dir": data_dir, "database_url": database_url}
    _serve(create_app, HubSettings(**_given(log_level=log_level, **given)))


@node_app.command("serve")
def node_serve(
    host: Annotated[str | None, typer.Option(help="Listen address [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port [8081].")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Token, job logs [var/node].")] = None,
    log_level: Annotated[str | None, typer.Option(help="[info]")] = None,
) -> None:
    """Run a node agent next to the hypervisor. Flags override SENDENSE_NODE_* settings."""
    from sendense.node.app import create_app
    from sendense.settings import NodeSettings

    given = {"host": host, "port": port, "data_dir": data_dir, "log_level": log_level}
    _serve(create_app, NodeSettings(**_given(**given)))


def _given(**flags: Any) -> dict[str, Any]:
    """The flags the user gave; the others fall back to SENDENSE_* settings."""
    return {k: v for k, v in flags.items() if v is not None}


def _serve(create_app: Any, settings: Any) -> None:
    import uvicorn

    _logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
    )


def _logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )


@app.command("demo")
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps everything.")] = Path(
        "var/demo"
    ),
    disk_mib: Annotated[int, typer.Option(help="Size of each demo disk.")] = 256,
) -> None:
    """Hub + node + a small VM on this machine: full, incremental, proof of restore."""
    from sendense.cli.demo import run_demo

    sys.exit(run_demo(workdir, disk_mib))


# ------------------------------------------------------------------ nodes


@node_app.command("add")
def node_add(
    name: str,
    url: str,
    token: Annotated[str | None, typer.Option(help="The node's token.")] = None,
    token_file: Annotated[Path | None, typer.Option(help="File holding the node's token.")] = None,
) -> None:
    """Register a node with the hub."""
    if token is None and token_file is not None:
        token = token_file.read_text().strip()
    if not token:
        err.print("[red]--token or --token-file is required")
        raise typer.Exit(2)
    data = call(client().post, "/api/v1/nodes", {"name": name, "url": url, "token": token})
    out(data) if ctx.json else console.print(f"node {name} registered: {data['node_id']}")


@node_app.command("ls")
def node_ls() -> None:
    data = call(client().get, "/api/v1/nodes")
    t = Table("node_id", "name", "url", "health")
    for n in data["nodes"]:
        t.add_row(n["node_id"], n["name"], n["url"], n["health"]["status"])
    out(data, t)


# ---------------------------------------------------------------- sources


@source_app.command("add-qemu")
def source_add_qemu(
    name: str,
    node: Annotated[str, typer.Option(help="node_id or node name")],
    vm: Annotated[list[str], typer.Option(help="NAME=QMP_SOCKET, repeatable")],
) -> None:
    """Register a qemu source: running QEMU / qemu-storage-daemon processes."""
    c = client()
    node_id = _node_id(c, node)
    vms = []
    for item in vm:
        vm_name, sep, sock = item.partition("=")
        if not sep:
            err.print(f"[red]--vm {item!r}: expected NAME=QMP_SOCKET")
            raise typer.Exit(2)
        vms.append({"name": vm_name, "qmp_socket": sock})
    data = call(
        c.post,
        "/api/v1/sources",
        {"name": name, "node_id": node_id, "type": "qemu", "config": {"vms": vms}},
    )
    out(data) if ctx.json else console.print(f"source {name} registered: {data['source_id']}")


def _node_id(c: HubClient, ref: str) -> str:
    for n in call(c.get, "/api/v1/nodes")["nodes"]:
        if ref in (n["node_id"], n["name"]):
            return str(n["node_id"])
    err.print(f"[red]node {ref} not found")
    raise typer.Exit(1)


@source_app.command("ls")
def source_ls() -> None:
    data = call(client().get, "/api/v1/sources")
    t = Table("source_id", "name", "type", "node_id")
    for s in data["sources"]:
        t.add_row(s["source_id"], s["name"], s["type"], s["node_id"])
    out(data, t)


# -------------------------------------------------------------------- vms


@vm_app.command("discover")
def vm_discover(source: Annotated[str, typer.Argument(help="source_id or source name")]) -> None:
    c = client()
    sid = source
    for s in call(c.get, "/api/v1/sources")["sources"]:
        if source in (s["source_id"], s["name"]):
            sid = s["source_id"]
    data = call(c.post, "/api/v1/vms/discover", {"source_id": sid})
    out(data, _vm_table(data["vms"]))


@vm_app.command("ls")
def vm_ls() -> None:
    data = call(client().get, "/api/v1/vms")
    out(data, _vm_table(data["vms"]))


@vm_app.command("show")
def vm_show(name: str) -> None:
    out(call(client().get, f"/api/v1/vms/{name}"))


def _vm_table(vms: list[dict[str, Any]]) -> Table:
    t = Table("vm", "disk", "key", "label", "capacity")
    for v in vms:
        for d in v["disks"]:
            t.add_row(
                v["name"],
                str(d["disk_id"]),
                str(d["disk_key"]),
                d["label"],
                human(d["capacity_bytes"]),
            )
    return t


# ---------------------------------------------------------------- backups


@backup_app.command("start")
def backup_start(
    vm: str,
    backup_type: Annotated[str, typer.Option("--type", help="full, incremental or auto")] = "auto",
    disk: Annotated[int | None, typer.Option(help="0-based disk (default: all)")] = None,
    repo: Annotated[str, typer.Option(help="repository_id")] = "default",
    wait: Annotated[bool, typer.Option(help="Follow the job with a progress bar.")] = False,
) -> None:
    """Start a backup of a VM (all disks, or one)."""
    c = client()
    body: dict[str, Any] = {"vm_name": vm, "repository_id": repo, "backup_type": backup_type}
    if disk is not None:
        body["disk_id"] = disk
    data = call(c.post, "/api/v1/backups", body)
    job_id = data["job_id"]
    if not wait:
        out(data) if ctx.json else console.print(f"job {job_id} started")
        return
    final = watch_job(c, job_id)
    if ctx.json:
        out(final)
    if final["status"] != "completed":
        raise typer.Exit(1)


def watch_job(c: HubClient, job_id: str, *, quiet: bool = False) -> dict[str, Any]:
    final: dict[str, Any] = {}
    show = not ctx.json and not quiet
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show,
    ) as bar:
        tasks: dict[int, Any] = {}
        for view in call(c.events, job_id):
            final = view
            for d in view["disks"]:
                key = d["disk_key"]
                if key not in tasks:
                    tasks[key] = bar.add_task(f"disk {key} ({d['backup_type']})", total=None)
                total = d["bytes_total"] or None
                if d["status"] == "completed":
                    # A disk with nothing to move is still done: a full bar.
                    total = total or 1
                    bar.update(tasks[key], completed=total, total=total)
                else:
                    bar.update(tasks[key], completed=d["bytes_done"], total=total)
    if show:
        colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(
            final.get("status", ""), "white"
        )
        console.print(
            f"job {job_id}: [{colour}]{final.get('status')}[/{colour}]"
            f" in {final.get('elapsed_seconds')}s"
        )
        for m in final.get("messages") or []:
            console.print(f"  note: {m}")
        if final.get("error"):
            console.print(f"  [red]{final['error']['code']}: {final['error']['message']}")
    return final


@backup_app.command("ls")
def backup_ls(
    vm: Annotated[str | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option()] = 50,
) -> None:
    data = call(client().get, "/api/v1/backups", vm_name=vm, limit=limit)
    t = Table("backup_id", "vm", "disk", "type", "status", "transferred", "on disk", "created")
    for b in data["backups"]:
        t.add_row(
            b["backup_id"],
            b["vm_name"],
            str(b["disk_id"]),
            b["backup_type"],
            b["status"],
            human(b["bytes_transferred"]),
            human(b["size_on_disk"]),
            b["created_at"][:19],
        )
    out(data, t)


@backup_app.command("show")
def backup_show(backup_id: str) -> None:
    out(call(client().get, f"/api/v1/backups/{backup_id}"))


@backup_app.command("chain")
def backup_chain(vm: str, disk: Annotated[int | None, typer.Option()] = None) -> None:
    data = call(client().get, f"/api/v1/backups/{vm}/chain", disk_id=disk)
    t = Table("disk", "#", "backup_id", "type", "on disk", "backing")
    for d in data["disks"]:
        for i, b in enumerate(d["chain"]):
            t.add_row(
                str(d["disk_key"]),
                str(i),
                b["backup_id"],
                b["backup_type"],
                human(b["size_on_disk"]),
                b["parent_backup_id"] or "-",
            )
    out(data, t)


# ------------------------------------------------------------------- jobs


@job_app.command("ls")
def job_ls(status: Annotated[str | None, typer.Option()] = None) -> None:
    data = call(client().get, "/api/v1/jobs", status=status)
    t = Table("job_id", "vm", "status", "step", "done", "created")
    for j in data["jobs"]:
        t.add_row(
            j["job_id"],
            j["vm_name"],
            j["status"],
            j["step"],
            f"{j['percent']}%",
            j["created_at"][:19],
        )
    out(data, t)


@job_app.command("show")
def job_show(job_id: str) -> None:
    out(call(client().get, f"/api/v1/jobs/{job_id}"))


@job_app.command("watch")
def job_watch(job_id: str) -> None:
    final = watch_job(client(), job_id)
    if ctx.json:
        out(final)


@job_app.command("cancel")
def job_cancel(job_id: str) -> None:
    data = call(client().post, f"/api/v1/jobs/{job_id}/cancel")
    out(data) if ctx.json else console.print(f"job {job_id}: cancel requested ({data['status']})")


# Command groups in cli/commands/ (imported last: they use the helpers above).
from sendense.cli.commands import repos  # noqa: E402

repos.bind(sys.modules[__name__])
app.add_typer(repos.app, name="repo")

# backup rm / consolidate / verify join the backup group.
from sendense.cli.commands import backups as backup_commands  # noqa: E402

backup_commands.bind(sys.modules[__name__])


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
