"""``sendense repo``: repositories (add, ls, show, edit, rm, rescan, export-key).

Shares the global options (``--json``, URL, token) and the output helpers
of ``cli/main.py``: main registers this module's ``app`` and hands itself
over with `bind` (it may run as ``__main__``, under ``python -m``, so this
module does not import it by name).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

if TYPE_CHECKING:
    from types import ModuleType

app = typer.Typer(help="Repositories: where restore points live.", no_args_is_help=True)


_main: ModuleType | None = None


def bind(main: ModuleType) -> None:
    global _main
    _main = main


def _m() -> ModuleType:
    if _main is None:
        from sendense.cli import main

        return main
    return _main


def _repo_id(c: Any, ref: str) -> str:
    """A repository_id, or the id of the repository with that name."""
    m = _m()
    for r in m.call(c.get, "/api/v1/repositories")["repositories"]:
        if ref in (r["repository_id"], r["name"]):
            return str(r["repository_id"])
    return ref  # the hub answers 404 for an unknown id


def _password(password_file: Path | None) -> str | None:
    if password_file is None:
        return None
    if str(password_file) == "-":
        return sys.stdin.readline().rstrip("\n")
    return password_file.read_text().rstrip("\n")


def _config(
    server: str | None,
    export: str | None,
    share: str | None,
    options: str | None,
    username: str | None,
    password: str | None,
) -> dict[str, Any]:
    given = {
        "server": server,
        "export": export,
        "share": share,
        "options": options,
        "username": username,
        "password": password,
    }
    return {k: v for k, v in given.items() if v is not None}


def _show(r: dict[str, Any]) -> None:
    m = _m()
    if m.ctx.json:
        m.out(r)
        return
    t = Table(show_header=False)
    t.add_column("field")
    t.add_column("value")
    rows = [
        ("repository_id", r["repository_id"]),
        ("name", r["name"]),
        ("type", r["type"]),
        ("path", r["path"]),
        ("online", "yes" if r["online"] else f"no: {r['status_message']}"),
        ("config", ", ".join(f"{k}={v}" for k, v in r["config"].items()) or "-"),
        ("capacity", m.human(r["total_bytes"])),
        ("available", m.human(r["available_bytes"])),
        ("restore points", f"{r['backup_count']} ({m.human(r['backup_bytes'])})"),
        ("immutable", f"{r['immutable']} (retention {r['retention_days']} days)"),
        ("encrypted", "yes (LUKS, AES-256-XTS)" if r.get("encrypted") else "no"),
        ("immutable attribute", {True: "yes", False: "no", None: "-"}[r["immutable_attribute"]]),
        ("locks live", f"{r['locks_live']} (until {r['locked_until'] or '-'})"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    m.console.print(t)


@app.command("add")
def repo_add(
    name: str,
    path: Annotated[str, typer.Argument(help="Absolute path on the hub")],
    kind: Annotated[str, typer.Option("--type", help="local, nfs or cifs")] = "local",
    immutable: Annotated[bool, typer.Option(help="Lock each new backup for the retention")] = False,
    retention_days: Annotated[int, typer.Option(help="Days a backup stays locked")] = 0,
    server: Annotated[str | None, typer.Option(help="nfs/cifs: the hub mounts the share")] = None,
    export: Annotated[str | None, typer.Option(help="nfs: exported path (/srv/backup)")] = None,
    share: Annotated[str | None, typer.Option(help="cifs: share name")] = None,
    options: Annotated[str | None, typer.Option(help="mount options (vers=4.2,hard)")] = None,
    username: Annotated[str | None, typer.Option(help="cifs user")] = None,
    password_file: Annotated[
        Path | None, typer.Option(help="cifs: file holding the password ('-': stdin)")
    ] = None,
    encrypted: Annotated[
        bool, typer.Option(help="Encrypt every backup (LUKS); cannot change later")
    ] = False,
    key_file: Annotated[
        Path | None,
        typer.Option(
            help="Disaster recovery: the key file `repo export-key` wrote (implies --encrypted)"
        ),
    ] = None,
) -> None:
    """Create a repository. nfs/cifs without --server: the share must be mounted at PATH."""
    m = _m()
    body: dict[str, Any] = {
        "name": name,
        "type": kind,
        "path": path,
        "immutable": immutable,
        "retention_days": retention_days,
        "config": _config(server, export, share, options, username, _password(password_file)),
    }
    if encrypted or key_file is not None:
        body["encrypted"] = True
    if key_file is not None:
        body["encryption_key"] = key_file.read_text().strip()
    r = m.call(m.client().post, "/api/v1/repositories", body)
    if m.ctx.json:
        m.out(r)
    else:
        m.console.print(f"repository {name} created: {r['repository_id']}")


@app.command("ls")
def repo_ls() -> None:
    m = _m()
    data = m.call(m.client().get, "/api/v1/repositories")
    t = Table("repository_id", "name", "type", "path", "available", "backups", "immutable")
    for r in data["repositories"]:
        t.add_row(
            r["repository_id"],
            r["name"],
            r["type"],
            r["path"] if r["online"] else f"{r['path']} (offline)",
            m.human(r["available_bytes"]),
            f"{r['backup_count']} ({m.human(r['backup_bytes'])})",
            f"{r['retention_days']} days" if r["immutable"] else "no",
        )
    m.out(data, t)


@app.command("show")
def repo_show(repository: Annotated[str, typer.Argument(help="repository_id or name")]) -> None:
    m = _m()
    c = m.client()
    _show(m.call(c.get, f"/api/v1/repositories/{_repo_id(c, repository)}"))


@app.command("edit")
def repo_edit(
    repository: Annotated[str, typer.Argument(help="repository_id or name")],
    name: Annotated[str | None, typer.Option(help="new name")] = None,
    path: Annotated[str | None, typer.Option(help="new path (only while empty)")] = None,
    immutable: Annotated[bool | None, typer.Option("--immutable/--no-immutable")] = None,
    retention_days: Annotated[int | None, typer.Option()] = None,
    server: Annotated[str | None, typer.Option()] = None,
    export: Annotated[str | None, typer.Option()] = None,
    share: Annotated[str | None, typer.Option()] = None,
    options: Annotated[str | None, typer.Option()] = None,
    username: Annotated[str | None, typer.Option()] = None,
    password_file: Annotated[Path | None, typer.Option(help="('-': stdin)")] = None,
) -> None:
    """Change a repository. Any of --server/--export/--share/--options/--username
    replaces the whole config (the password is kept unless --password-file)."""
    m = _m()
    c = m.client()
    body: dict[str, Any] = {}
    for key, value in (
        ("name", name),
        ("path", path),
        ("immutable", immutable),
        ("retention_days", retention_days),
    ):
        if value is not None:
            body[key] = value
    config = _config(server, export, share, options, username, _password(password_file))
    if config:
        body["config"] = config
    r = m.call(c.request, "PATCH", f"/api/v1/repositories/{_repo_id(c, repository)}", json=body)
    _show(r)


@app.command("rm")
def repo_rm(repository: Annotated[str, typer.Argument(help="repository_id or name")]) -> None:
    """Remove an empty repository's record (its folder and files stay)."""
    m = _m()
    c = m.client()
    r = m.call(c.request, "DELETE", f"/api/v1/repositories/{_repo_id(c, repository)}")
    if m.ctx.json:
        m.out(r)
    else:
        m.console.print(f"repository {repository} removed (its folder was left in place)")


@app.command("rescan")
def repo_rescan(
    repository: Annotated[str, typer.Argument(help="repository_id or name")],
    dry_run: Annotated[bool, typer.Option(help="Report what would be imported")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for the job and show its result")] = False,
) -> None:
    """Rebuild catalog records from the repository's files and sidecars."""
    m = _m()
    c = m.client()
    started = m.call(
        c.post, f"/api/v1/repositories/{_repo_id(c, repository)}/rescan", {"dry_run": dry_run}
    )
    job = started["job"]
    while wait and job["status"] not in ("completed", "failed", "cancelled"):
        job = m.call(c.get, f"/api/v1/jobs/{started['job_id']}", wait=20)
        time.sleep(0.1)
    if m.ctx.json:
        m.out(job if wait else started)
        return
    if not wait:
        m.console.print(f"job {started['job_id']} started")
        return
    if job["status"] != "completed":
        err = job.get("error") or {}
        m.err.print(f"[red]rescan {job['status']}: {err.get('message')}")
        raise typer.Exit(1)
    res = job["result"]
    verb = "would import" if res["dry_run"] else "imported"
    m.console.print(
        f"{res['restore_points_found']} restore point(s) found: {verb} {res['imported']}, "
        f"{res['already_known']} already known, {res['skipped']} skipped"
    )
    for vm, count in sorted(res["unknown_vms"].items()):
        m.console.print(
            f"  VM {vm}: {count} restore point(s) skipped, VM unknown (discover it, rescan again)"
        )
    for p in res["problems"]:
        m.console.print(f"  {p['path']}: {p['problem']}")


@app.command("export-key")
def repo_export_key(
    repo: Annotated[str, typer.Argument(help="repository_id or name")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="File to write (mode 0600; never overwritten)")
    ],
) -> None:
    """Write a recovery copy of an encrypted repository's key (admin).

    The file holds the LUKS passphrase of every image in the repository:
    keep it away from the repository and the hub. With it, `qemu-img` opens
    a backup by hand (docs/security.md); with it, `repo add --key-file`
    brings the repository back on a new hub.
    """
    m = _m()
    c = m.client()
    repository_id = _repo_id(c, repo)
    # The file first (O_EXCL): a refusal costs no key export in the audit log.
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        m.err.print(f"[red]{output} exists: choose another file (a key file is never overwritten)")
        raise typer.Exit(1) from None
    try:
        r = m.call(c.post, f"/api/v1/repositories/{repository_id}/key/export", {})
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(r["passphrase"].encode())
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        output.unlink(missing_ok=True)
        raise
    shown = {k: v for k, v in r.items() if k != "passphrase"}
    if m.ctx.json:
        m.out({**shown, "file": str(output)})
    else:
        m.console.print(
            f"key of repository {repository_id} written to {output} (mode 0600); keep it apart "
            "from the repository and the hub"
        )
