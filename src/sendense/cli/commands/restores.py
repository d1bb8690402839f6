"""``sendense restore disk | nbd`` and ``sendense backup export | unexport``,
``sendense export ls``: whole-disk restores and instant access.

Bound to the main module like the other command groups (see backups.py).
Exit status: 0 when the command did what it said; 1 on an API error or a
restore job that did not complete.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape as markup_escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from sendense.cli.client import ApiError
from sendense.cli.commands.backups import _ended, follow

if TYPE_CHECKING:
    from types import ModuleType

restore_app = typer.Typer(
    help="Restores: files through restore sessions, whole disks.", no_args_is_help=True
)
export_app = typer.Typer(
    help="Restore points served over NBD (instant access).", no_args_is_help=True
)

_main: ModuleType | None = None


def _m() -> ModuleType:
    assert _main is not None
    return _main


def _restore(backup_id: str, destination: dict[str, Any], wait: bool, label: str) -> None:
    m = _m()
    c = m.client()
    data = m.call(c.post, "/api/v1/restores", {"backup_id": backup_id, "destination": destination})
    job_id = data["job_id"]
    if not wait:
        m.out(data) if m.ctx.json else m.console.print(f"job {job_id} started")
        return
    final = follow(c, job_id, label)
    if m.ctx.json:
        m.out(final)
    else:
        _ended(m, job_id, final)
        dest = (final.get("result") or {}).get("destination") or {}
        if final.get("status") == "completed" and dest.get("path"):
            m.console.print(f"  {dest['path']} ({dest['format']})")
    if final.get("status") != "completed":
        raise typer.Exit(1)


@restore_app.command("disk")
def restore_disk(
    backup_id: str,
    to: Annotated[
        str, typer.Option("--to", help="New file, absolute, inside SENDENSE_RESTORE_DIRS.")
    ],
    format: Annotated[str, typer.Option(help="qcow2 or raw.")] = "qcow2",
    wait: Annotated[bool, typer.Option(help="Follow the job with a progress bar.")] = False,
) -> None:
    """Write a restore point out as a standalone image file (never over an existing file)."""
    _restore(
        backup_id,
        {"type": "file", "path": to, "format": format},
        wait,
        f"restore {backup_id[:8]}",
    )


@restore_app.command("nbd")
def restore_nbd(
    backup_id: str,
    url: Annotated[str, typer.Option(help="nbd://host:port/export or nbd+unix:///x?socket=P")],
    wait: Annotated[bool, typer.Option(help="Follow the job with a progress bar.")] = False,
) -> None:
    """Write a restore point into an NBD export at least as large as the disk."""
    _restore(backup_id, {"type": "nbd", "url": url}, wait, f"restore {backup_id[:8]}")


@restore_app.command("mount")
def restore_mount(backup_id: str) -> None:
    """Open a restore session on a restore point and show its partitions."""
    m = _m()
    data = m.call(m.client().post, "/api/v1/restore/mounts", {"backup_id": backup_id})
    t = Table("partition", "filesystem", "label", "size", "warnings")
    for p in data["partitions"]:
        t.add_row(
            str(p["index"]),
            p["filesystem"] or "-",
            p["label"] or "",
            m.human(p["size"]),
            "; ".join(p["warnings"]),
        )
    if not m.ctx.json:
        m.console.print(f"session {data['mount_id']} ({data['status']})", soft_wrap=True)
    m.out(data, t)


@restore_app.command("sessions")
def restore_sessions() -> None:
    """Open restore sessions."""
    m = _m()
    data = m.call(m.client().get, "/api/v1/restore/mounts")
    t = Table("session", "backup", "vm", "last access")
    for x in data["mounts"]:
        t.add_row(x["mount_id"], x["backup_id"], x["vm_name"] or "", str(x["last_access"]))
    m.out(data, t)


EscapedOpt = Annotated[
    bool,
    typer.Option(
        "--escaped", help="PATH is in escaped form, as `restore ls` shows a name that is not UTF-8."
    ),
]


@restore_app.command("ls")
def restore_ls(
    session: str,
    path: Annotated[str, typer.Argument(help="Directory inside the filesystem.")] = "/",
    partition: Annotated[int | None, typer.Option(help="Partition index.")] = None,
    escaped: EscapedOpt = False,
) -> None:
    """List a directory of a restore session (all pages). Names that are not
    UTF-8 are shown escaped (%XX for each such byte) and marked [escaped]:
    give such a path with --escaped."""
    m = _m()
    c = m.client()
    entries: list[dict[str, Any]] = []
    offset, total = 0, None
    while total is None or offset < total:
        params: dict[str, Any] = {"path": path, "offset": offset, "limit": 5000}
        if partition is not None:
            params["partition"] = partition
        if escaped:
            params["escaped"] = "true"
        page = m.call(c.request, "GET", f"/api/v1/restore/mounts/{session}/files", params=params)
        entries += page["entries"]
        total = page["total"]
        offset += len(page["entries"])
        if not page["entries"]:
            break
    t = Table("type", "size", "mtime", "name")
    for e in entries:
        name = e["name"] + (f" -> {e['target']}" if e["target"] else "")
        if e.get("escaped"):
            name += " [escaped]"
        # guest names are data, not rich markup ("[bold]x" is a valid file name)
        t.add_row(e["type"], m.human(e["size"]), str(e["mtime"] or ""), markup_escape(name))
    m.out({"path": path, "entries": entries, "total": total}, t)


def _raise(e: Exception) -> None:
    raise e


def _save(session: str, route: str, params: dict[str, Any], out: str, label: str) -> None:
    m = _m()
    if os.path.lexists(out):
        m.err.print(
            f"{markup_escape(out)} exists: give another name with -o (nothing is overwritten)"
        )
        raise typer.Exit(1)
    c = m.client()
    with c.http.stream("GET", f"/api/v1/restore/mounts/{session}/{route}", params=params) as r:
        if r.status_code >= 400:
            r.read()
            m.call(_raise, ApiError(r.status_code, r.json()))
        total = int(r.headers.get("content-length") or 0) or None
        done = 0
        with (
            open(out, "xb") as f,
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=m.console,
                disable=m.ctx.json,
            ) as bar,
        ):
            task = bar.add_task(markup_escape(label), total=total)
            for chunk in r.iter_bytes():
                f.write(chunk)
                done += len(chunk)
                bar.update(task, completed=done)
    m.out({"path": out, "bytes": done}) if m.ctx.json else m.console.print(
        f"{out}: {m.human(done)}"
    )


@restore_app.command("get")
def restore_get(
    session: str,
    path: str,
    output: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--output",
            help="File to write (must not exist); default: the file's name, here.",
        ),
    ] = None,
    partition: Annotated[int | None, typer.Option(help="Partition index.")] = None,
    escaped: EscapedOpt = False,
) -> None:
    """Download a file of a restore session, with a progress bar."""
    params: dict[str, Any] = {"path": path}
    if partition is not None:
        params["partition"] = partition
    if escaped:
        params["escaped"] = "true"
    _save(session, "download", params, output or _local_name(path), path)


@restore_app.command("get-dir")
def restore_get_dir(
    session: str,
    path: str,
    output: Annotated[
        str | None,
        typer.Option(
            "-o",
            "--output",
            help="Archive to write (must not exist); default: the directory's name "
            "and the format's suffix, here.",
        ),
    ] = None,
    format: Annotated[str, typer.Option(help="zip or tar.gz.")] = "zip",
    partition: Annotated[int | None, typer.Option(help="Partition index.")] = None,
    escaped: EscapedOpt = False,
) -> None:
    """Download a directory of a restore session as a ZIP or tar.gz archive."""
    params: dict[str, Any] = {"path": path, "format": format}
    if partition is not None:
        params["partition"] = partition
    if escaped:
        params["escaped"] = "true"
    out = output or f"{_local_name(path)}.{format}"
    _save(session, "download-directory", params, out, path)


def _local_name(path: str) -> str:
    """The last component of a path inside the filesystem, as a file name
    here ("root" for the root). An escaped name stays escaped (%XX)."""
    name = PurePosixPath(path.rstrip("/")).name
    return "root" if name in ("", ".", "..") else name


@restore_app.command("close")
def restore_close(session: str) -> None:
    """Close a restore session."""
    m = _m()
    data = m.call(m.client().request, "DELETE", f"/api/v1/restore/mounts/{session}")
    m.out(data) if m.ctx.json else m.console.print(f"session {session}: {data['status']}")


def backup_export(
    backup_id: str,
    writable: Annotated[
        bool, typer.Option(help="Writes go to a throw-away overlay; the backup never changes.")
    ] = False,
) -> None:
    """Serve a restore point over NBD until ``backup unexport``."""
    m = _m()
    data = m.call(m.client().post, f"/api/v1/backups/{backup_id}/export", {"writable": writable})
    if m.ctx.json:
        m.out(data)
        return
    m.console.print(f"export {data['export_id']}: {data['status']}")
    m.console.print(data["url"] or "", soft_wrap=True)
    if data.get("tls_psk"):
        # Shown once (the hub cannot show it again): a psktool line for the
        # hypervisor's key file (docs/security.md).
        m.console.print(
            "TLS pre-shared key (shown only now; save it as a psktool file, mode 0600):",
        )
        m.console.print(f"{data['tls_username']}:{data['tls_psk']}", soft_wrap=True)


def backup_unexport(backup_id: str) -> None:
    """Stop serving a restore point (a writable export's overlay is deleted)."""
    m = _m()
    data = m.call(m.client().request, "DELETE", f"/api/v1/backups/{backup_id}/export")
    m.out(data) if m.ctx.json else m.console.print(f"export {data['export_id']}: {data['status']}")


@export_app.command("ls")
def export_ls() -> None:
    """Restore points served over NBD right now."""
    m = _m()
    data = m.call(m.client().get, "/api/v1/exports")
    t = Table("backup", "vm", "mode", "url", "since")
    for e in data["exports"]:
        t.add_row(
            e["backup_id"],
            e["vm_name"] or "",
            "writable" if e["writable"] else "read-only",
            e["url"] or e["status"],
            str(e["created_at"]),
        )
    m.out(data, t)


def bind(main: ModuleType) -> None:
    global _main
    _main = main
    main.backup_app.command("export")(backup_export)
    main.backup_app.command("unexport")(backup_unexport)
