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
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Table
from rich.text import Text

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

# When the output is not a terminal (a pipe, a file, a script), rich would fold
# lines and table cells at 80 columns and break digests, paths and ids over
# lines: there, print everything at its natural width instead.
NOT_A_TTY_WIDTH = 100_000


def make_console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=NOT_A_TTY_WIDTH, soft_wrap=True)


console = make_console()
err = make_console(stderr=True)

DISK_NOTE = (
    "disk N is the disk's 0-based index in the VM (--disk, disk_id in the API); "
    "key is its VMware-style key (2000 + N for QEMU), which names its folder "
    "in the repository and its NBD export"
)


class Ctx:
    url: str = "http://127.0.0.1:8082"
    token: str | None = None
    json: bool = False
    ca_file: Path | None = None


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
    ca_file: Annotated[
        Path | None,
        typer.Option(
            envvar="SENDENSE_CA_FILE",
            help="PEM file of the CA (or the self-signed certificate) of an https hub.",
        ),
    ] = None,
) -> None:
    ctx.url = url
    ctx.json = as_json
    ctx.ca_file = ca_file
    if token is None:
        path = data_dir / "admin.token"
        if path.exists():
            token = path.read_text().strip()
    ctx.token = token


def client() -> HubClient:
    if not ctx.token:
        err.print("[red]no token: set SENDENSE_TOKEN or --token, or run next to the hub's data dir")
        raise typer.Exit(2)
    return HubClient(ctx.url, ctx.token, ca_file=ctx.ca_file)


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


def out(data: Any, table: Table | None = None, *, disk_note: bool = False) -> None:
    if ctx.json or table is None:
        print(json.dumps(data, indent=2))
    else:
        console.print(table)
        if disk_note:
            console.print(f"[dim]{DISK_NOTE}[/dim]")


def disk_name(d: dict[str, Any]) -> str:
    """One name for a disk everywhere: index and key, ``disk 0 (key 2000)``."""
    return f"disk {d['disk_id']} (key {d['disk_key']})"


def disk_cell(d: dict[str, Any]) -> str:
    """The same in a table's ``disk`` column: ``0 (key 2000)``."""
    return f"{d['disk_id']} (key {d['disk_key']})"


def print_details(rows: list[tuple[str, Any]]) -> None:
    """``name  value`` lines, values whole (ids, paths, digests) and taken
    literally (no rich markup); ``-`` for no value."""
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        text = "-" if value is None or value == "" else str(value)
        console.print(f"{name:<{width}}  {text}", markup=False, soft_wrap=True)


def seconds(value: float | None) -> str:
    """A duration: ``4.2s`` under a minute, else ``h:mm:ss``; ``-`` if unknown."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    s = round(value)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


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
    tls_cert_file: Annotated[
        Path | None, typer.Option(help="Serve HTTPS with this certificate (PEM).")
    ] = None,
    tls_key_file: Annotated[Path | None, typer.Option(help="Its private key (PEM).")] = None,
) -> None:
    """Run the hub (REST API, catalog, NBD targets). Flags override SENDENSE_* settings.

    Serves from SENDENSE_API_WORKERS processes (default: one per core, at most 4)."""
    from sendense.hub.serve import serve
    from sendense.settings import HubSettings

    given = {
        "host": host,
        "port": port,
        "data_dir": data_dir,
        "database_url": database_url,
        "tls_cert_file": tls_cert_file,
        "tls_key_file": tls_key_file,
    }
    settings = HubSettings(**_given(log_level=log_level, **given))
    _logging(settings.log_level)
    serve(settings)


@node_app.command("serve")
def node_serve(
    host: Annotated[str | None, typer.Option(help="Listen address [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port [8081].")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Token, job logs [var/node].")] = None,
    log_level: Annotated[str | None, typer.Option(help="[info]")] = None,
) -> None:
    """Run a node agent next to the hypervisor. Flags override SENDENSE_NODE_* settings.

    Serves HTTPS with a certificate made on first start (<data-dir>/tls/) and
    prints its fingerprint, which `sendense node add` pins on the hub;
    SENDENSE_NODE_TLS=false serves plain HTTP (loopback only)."""
    from sendense.node.serve import serve
    from sendense.settings import NodeSettings

    given = {"host": host, "port": port, "data_dir": data_dir, "log_level": log_level}
    settings = NodeSettings(**_given(**given))
    _logging(settings.log_level)
    serve(settings)


def _given(**flags: Any) -> dict[str, Any]:
    """The flags the user gave; the others fall back to SENDENSE_* settings."""
    return {k: v for k, v in flags.items() if v is not None}


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


# node add / ls / fingerprint / edit / rm: cli/commands/nodes.py


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


@source_app.command("add-file")
def source_add_file(
    name: str,
    node: Annotated[str, typer.Option(help="node_id or node name")],
    vm: Annotated[
        list[str],
        typer.Option(help="NAME=PATH, repeatable; a VM's disks in the order given"),
    ],
) -> None:
    """Register a file source: raw/qcow2 images or block devices on the node
    (``--vm db1=/images/db1.qcow2 --vm db1=/dev/vg0/db1-data``)."""
    c = client()
    node_id = _node_id(c, node)
    paths: dict[str, list[str]] = {}
    for item in vm:
        vm_name, sep, path = item.partition("=")
        if not sep or not path:
            err.print(f"[red]--vm {item!r}: expected NAME=PATH")
            raise typer.Exit(2)
        paths.setdefault(vm_name, []).append(path)
    config = {"vms": [{"name": n, "paths": p} for n, p in paths.items()]}
    data = call(
        c.post,
        "/api/v1/sources",
        {"name": name, "node_id": node_id, "type": "file", "config": config},
    )
    out(data) if ctx.json else console.print(f"source {name} registered: {data['source_id']}")


@source_app.command("add-vmware")
def source_add_vmware(
    name: str,
    node: Annotated[str, typer.Option(help="node_id or node name")],
    host: Annotated[str, typer.Option(help="vCenter or ESXi host name")],
    user: Annotated[str, typer.Option(help="e.g. backup@vsphere.local")],
    password_file: Annotated[
        Path | None,
        typer.Option(
            help="file holding the password (first line); else $SENDENSE_VSPHERE_PASSWORD, "
            "else asked for on the terminal. Never a command-line argument."
        ),
    ] = None,
    datacenter: Annotated[str | None, typer.Option(help="limit discovery to one")] = None,
    port: Annotated[int, typer.Option()] = 443,
    thumbprint: Annotated[
        str | None, typer.Option(help="SHA-1 or SHA-256 certificate thumbprint to pin")
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="accept any certificate (tests and labs only)")
    ] = False,
) -> None:
    """Register a vmware source: a vCenter (or ESXi host) the node reaches."""
    if password_file is not None:
        try:
            password = password_file.read_text().splitlines()[0]
        except (OSError, IndexError) as e:
            err.print(f"[red]--password-file {password_file}: cannot read a password ({e})")
            raise typer.Exit(2) from None
    elif os.environ.get("SENDENSE_VSPHERE_PASSWORD"):
        password = os.environ["SENDENSE_VSPHERE_PASSWORD"]
    else:
        password = typer.prompt(f"password of {user} on {host}", hide_input=True)
    c = client()
    config: dict[str, Any] = {"host": host, "port": port, "user": user, "password": password}
    if datacenter:
        config["datacenter"] = datacenter
    if thumbprint:
        config["thumbprint"] = thumbprint
    if insecure:
        config["insecure"] = True
    data = call(
        c.post,
        "/api/v1/sources",
        {"name": name, "node_id": _node_id(c, node), "type": "vmware", "config": config},
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
    out(data, _vm_table(data["vms"]), disk_note=True)


@vm_app.command("ls")
def vm_ls(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="VMs per page")] = 100,
    offset: Annotated[int, typer.Option(min=0, help="VMs skipped (by name)")] = 0,
    name: Annotated[str | None, typer.Option(help="only names containing this")] = None,
) -> None:
    """VMs by name, a page at a time (``total``: all that match)."""
    data = call(client().get, "/api/v1/vms", limit=limit, offset=offset, name=name)
    out(data, _vm_table(data["vms"]), disk_note=True)
    shown, total = len(data["vms"]), data.get("total", len(data["vms"]))
    if not ctx.json and offset + shown < total:
        console.print(
            f"[dim]VMs {offset + 1}-{offset + shown} of {total}: "
            f"--offset {offset + shown} for the next page[/dim]"
        )


@vm_app.command("show")
def vm_show(name: str) -> None:
    data = call(client().get, f"/api/v1/vms/{name}")
    if ctx.json:
        out(data)
        return
    last = data.get("last_backup")
    print_details(
        [
            ("vm", data["name"]),
            ("vm_context_id", data["vm_context_id"]),
            ("source_id", data["source_id"]),
            ("path", data["path"]),
            ("discovered", (data.get("discovered_at") or "")[:19]),
            (
                "last backup",
                last
                and f"{last['backup_id']} {disk_name(last)} {last['backup_type']} "
                f"{last['status']} {(last.get('created_at') or '')[:19]}",
            ),
        ]
    )
    t = Table("disk", "label", "capacity", "path")
    for d in data["disks"]:
        t.add_row(disk_cell(d), d["label"], human(d["capacity_bytes"]), d["path"])
    out(data, t, disk_note=True)


def _vm_table(vms: list[dict[str, Any]]) -> Table:
    t = Table("vm", "disk", "label", "capacity")
    for v in vms:
        for d in v["disks"]:
            t.add_row(v["name"], disk_cell(d), d["label"], human(d["capacity_bytes"]))
    return t


# ---------------------------------------------------------------- backups


@backup_app.command("start")
def backup_start(
    vm: str,
    backup_type: Annotated[str, typer.Option("--type", help="full, incremental or auto")] = "auto",
    disk: Annotated[int | None, typer.Option(help="0-based disk (default: all)")] = None,
    repo: Annotated[str, typer.Option(help="repository_id")] = "default",
    wait: Annotated[bool, typer.Option(help="Follow the job with a progress bar.")] = False,
    queue: Annotated[
        bool, typer.Option(help="If the VM already has a job, wait for it instead of failing.")
    ] = False,
) -> None:
    """Start a backup of a VM (all disks, or one). On a node at its job limit
    the backup is queued and starts when a slot frees."""
    c = client()
    body: dict[str, Any] = {"vm_name": vm, "repository_id": repo, "backup_type": backup_type}
    if disk is not None:
        body["disk_id"] = disk
    if queue:
        body["queue"] = True
    data = call(c.post, "/api/v1/backups", body)
    job_id = data["job_id"]
    job = data.get("job") or {}
    if not ctx.json and job.get("step") == "queued":
        reason = ((job.get("params") or {}).get("queue") or {}).get("reason") or ""
        console.print(f"job {job_id} queued: {reason}" if reason else f"job {job_id} queued")
    if not wait:
        if ctx.json:
            out(data)
        elif job.get("step") != "queued":
            console.print(f"job {job_id} started")
        return
    final = watch_job(c, job_id)
    if ctx.json:
        out(final)
    if final["status"] != "completed":
        raise typer.Exit(1)


class _PercentColumn(ProgressColumn):
    """``42.0%``; ``-`` while the total is not known yet (rich would say 0.0%)."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("    -", style="progress.percentage")
        return Text(f"{task.percentage:>5.1f}%", style="progress.percentage")


class _BytesColumn(ProgressColumn):
    """``12.0 MiB / 256.0 MiB`` as the hub reports them; ``-`` for a total not
    known yet."""

    def render(self, task: Task) -> Text:
        done, total = task.fields.get("bytes_done", 0), task.fields.get("bytes_total")
        size = human(total) if total or task.finished else "-"
        return Text(f"{human(done)} / {size}", style="progress.download")


class _RateColumn(ProgressColumn):
    """The node's measured rate; ``-`` until it has one (rich would show ``?``)."""

    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate")
        return Text(f"{human(rate)}/s" if rate else "-", style="progress.data.speed")


class _EtaColumn(ProgressColumn):
    """Time left as the node estimates it; ``done`` at the end, else ``-``."""

    def render(self, task: Task) -> Text:
        status = task.fields.get("status")
        if status in ("completed", "failed", "cancelled"):
            return Text(str(status), style="progress.elapsed")
        eta = task.fields.get("eta")
        return Text(f"eta {seconds(eta)}" if eta is not None else "-", style="progress.remaining")


def retry_text(r: dict[str, Any] | None) -> str | None:
    """A copy reconnecting (issue 11): why, which attempt, until when."""
    if not r:
        return None
    until = f", gives up at {r['deadline'][11:19]}" if r.get("deadline") else ""
    return f"{r['reason']} (attempt {r['attempt']}{until})"


def watch_job(c: HubClient, job_id: str, *, quiet: bool = False) -> dict[str, Any]:
    final: dict[str, Any] = {}
    show = not ctx.json and not quiet
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        _PercentColumn(),
        _BytesColumn(),
        _RateColumn(),
        _EtaColumn(),
        console=console,
        disable=not show,
    ) as bar:
        tasks: dict[int | None, Any] = {}
        said: set[tuple[str, int]] = set()
        for view in call(c.events, job_id):
            final = view
            # A copy reconnecting (issue 11): one line per attempt, and the
            # bar's label says so while it lasts.
            for r in [view.get("retry"), *(d.get("retry") for d in view["disks"])]:
                if r and (r["reason"], r["attempt"]) not in said:
                    said.add((r["reason"], r["attempt"]))
                    if show:
                        bar.console.print(f"retrying: {retry_text(r)}")
            # A backup job has one bar per disk; a job the hub runs itself
            # (consolidate, verify) has one for the whole job.
            rows = [
                (d["disk_key"], f"{disk_name(d)} {d['backup_type']}", d) for d in view["disks"]
            ] or [(None, f"{view['kind']} {view.get('vm_name') or ''}".strip(), view)]
            for key, label, d in rows:
                if key not in tasks:
                    tasks[key] = bar.add_task(label, total=None)
                total = d["bytes_total"] or None
                fields = {
                    "rate": d.get("rate"),
                    "eta": d.get("eta"),
                    "status": d["status"],
                    "bytes_done": d["bytes_done"],
                    "bytes_total": d["bytes_total"],
                }
                if d["status"] == "completed":
                    # A disk with nothing to move is still done: a full bar.
                    total = total or d["bytes_done"] or 1
                    done = total
                else:
                    done = d["bytes_done"]
                retry = d.get("retry") or (view.get("retry") if key is None else None)
                if retry:
                    label = f"{label} retrying: {retry['reason']}"
                bar.update(tasks[key], description=label, completed=done, total=total, **fields)
    if show:
        colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(
            final.get("status", ""), "white"
        )
        elapsed = final.get("elapsed_seconds")
        console.print(
            f"job {job_id}: [{colour}]{final.get('status')}[/{colour}]"
            + (f" in {elapsed:.1f}s" if elapsed is not None else "")
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
            disk_cell(b),
            b["backup_type"],
            b["status"],
            human(b["bytes_transferred"]),
            human(b["size_on_disk"]),
            b["created_at"][:19],
        )
    out(data, t, disk_note=True)


@backup_app.command("show")
def backup_show(backup_id: str) -> None:
    b = call(client().get, f"/api/v1/backups/{backup_id}")
    if ctx.json:
        out(b)
        return
    verify = b.get("verify_status")
    if verify:
        verify = f"{verify} {(b.get('verified_at') or '')[:19]} {b.get('verify_error') or ''}"
    print_details(
        [
            ("backup_id", b["backup_id"]),
            ("vm", b["vm_name"]),
            ("disk", disk_name(b)),
            ("type", b["backup_type"] + (" (synthetic)" if b.get("synthetic") else "")),
            ("status", b["status"]),
            ("parent", b["parent_backup_id"]),
            ("file", b["file_path"]),
            ("digest", b["digest"]),
            ("change id", b["change_id"]),
            ("previous change id", b["previous_change_id"]),
            ("disk size", human(b["total_bytes"])),
            ("transferred", human(b["bytes_transferred"])),
            ("on disk", human(b["size_on_disk"])),
            ("job", b["job_id"]),
            ("repository", b["repository_id"]),
            ("created", (b.get("created_at") or "")[:19]),
            ("finished", (b.get("finished_at") or "")[:19]),
            ("verified", verify),
            ("immutable until", (b.get("immutable_until") or "")[:19]),
            ("error", b.get("error")),
        ]
    )
    console.print(f"[dim]{DISK_NOTE}[/dim]")


@backup_app.command("chain")
def backup_chain(vm: str, disk: Annotated[int | None, typer.Option()] = None) -> None:
    data = call(client().get, f"/api/v1/backups/{vm}/chain", disk_id=disk)
    t = Table("disk", "#", "backup_id", "type", "on disk", "backing")
    for d in data["disks"]:
        for i, b in enumerate(d["chain"]):
            t.add_row(
                disk_cell(d),
                str(i),
                b["backup_id"],
                b["backup_type"],
                human(b["size_on_disk"]),
                b["parent_backup_id"] or "-",
            )
    out(data, t, disk_note=True)


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
    j = call(client().get, f"/api/v1/jobs/{job_id}")
    if ctx.json:
        out(j)
        return
    error = j.get("error")
    print_details(
        [
            ("job_id", j["job_id"]),
            ("kind", j["kind"]),
            ("status", j["status"]),
            ("step", j["step"]),
            ("retrying", retry_text(j.get("retry"))),
            ("vm", j["vm_name"]),
            ("requested", j["backup_type"]),
            ("progress", f"{j['percent']}% of {human(j['bytes_total'])}"),
            ("rate", f"{human(j['rate'])}/s" if j.get("rate") else None),
            ("eta", seconds(j.get("eta"))),
            ("created", (j.get("created_at") or "")[:19]),
            ("finished", (j.get("finished_at") or "")[:19]),
            ("elapsed", seconds(j.get("elapsed_seconds"))),
            ("error", error and f"{error['code']}: {error['message']}"),
        ]
        + [("note", m) for m in j.get("messages") or []]
    )
    if not j["disks"]:
        return
    t = Table("disk", "backup_id", "type", "status", "mode", "done", "total", "fallback")
    for d in j["disks"]:
        t.add_row(
            disk_cell(d),
            d["backup_id"],
            d["backup_type"],
            d["status"],
            d.get("mode") or "-",
            f"{d['percent']}%",
            human(d["bytes_total"]),
            d.get("fallback_reason") or "-",
        )
    out(j, t, disk_note=True)


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

# node rm / edit and source rm join the node and source groups.
from sendense.cli.commands import nodes as node_commands  # noqa: E402

node_commands.bind(sys.modules[__name__])

# token create / ls / revoke and audit ls.
from sendense.cli.commands import tokens as token_commands  # noqa: E402

token_commands.bind(sys.modules[__name__])
app.add_typer(token_commands.token_app, name="token")
app.add_typer(token_commands.audit_app, name="audit")

# restore disk / nbd, export ls, backup export / unexport.
from sendense.cli.commands import restores as restore_commands  # noqa: E402

restore_commands.bind(sys.modules[__name__])
app.add_typer(restore_commands.restore_app, name="restore")
app.add_typer(restore_commands.export_app, name="export")

# policy create / ls / show / edit / rm / run / plan / apply, and vm tag.
from sendense.cli.commands import policy as policy_commands  # noqa: E402

policy_commands.bind(sys.modules[__name__])
app.add_typer(policy_commands.policy_app, name="policy")

# webhook add / ls / rm / deliveries.
from sendense.cli.commands import webhook as webhook_commands  # noqa: E402

webhook_commands.bind(sys.modules[__name__])
app.add_typer(webhook_commands.webhook_app, name="webhook")


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
