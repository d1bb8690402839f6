"""``sendense backup rm | consolidate | verify``: a restore point's later life.

These join the ``backup`` group of ``cli/main.py`` (start, ls, show, chain):
`bind` is handed the main module (it may run as ``__main__`` under ``python
-m``, so this module does not import it by name) and adds the commands to
its ``backup_app``, using its global options (``--json``, URL, token) and
output helpers.

Exit status: 0 when the command did what it said; 1 on an API error, a job
that did not complete, or a verify that found the restore point damaged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

if TYPE_CHECKING:
    from types import ModuleType

_main: ModuleType | None = None


def _m() -> ModuleType:
    if _main is None:
        from sendense.cli import main

        return main
    return _main


def follow(c: Any, job_id: str, label: str) -> dict[str, Any]:
    """Follow a hub-run job (consolidate, verify) to its end with one bar."""
    m = _m()
    final: dict[str, Any] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[step]}"),
        console=m.console,
        disable=m.ctx.json,
    ) as bar:
        task = bar.add_task(label, total=None, step="")
        for view in m.call(c.events, job_id):
            final = view
            total = view["bytes_total"] or None
            if view["status"] == "completed":
                total = total or 1
                bar.update(task, completed=total, total=total, step="")
            else:
                bar.update(task, completed=view["bytes_done"], total=total, step=view["step"])
    return final


def _ended(m: ModuleType, job_id: str, final: dict[str, Any]) -> None:
    if m.ctx.json:
        return
    colour = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(
        final.get("status", ""), "white"
    )
    m.console.print(
        f"job {job_id}: [{colour}]{final.get('status')}[/{colour}]"
        f" in {final.get('elapsed_seconds')}s"
    )
    if final.get("error"):
        m.console.print(f"  [red]{final['error']['code']}: {final['error']['message']}")


def backup_rm(
    backup_id: str,
    cascade: Annotated[
        bool, typer.Option(help="Also delete every newer restore point that depends on it.")
    ] = False,
) -> None:
    """Delete a restore point: its QCOW2, sidecar and record go together."""
    m = _m()
    c = m.client()
    params = {"cascade": "true"} if cascade else {}
    data = m.call(c.request, "DELETE", f"/api/v1/backups/{backup_id}", params=params)
    if m.ctx.json:
        m.out(data)
        return
    m.console.print(
        f"deleted {len(data['deleted'])} restore point(s), freed {m.human(data['freed_bytes'])}"
    )
    for deleted in data["deleted"]:
        m.console.print(f"  {deleted}")


def backup_consolidate(
    vm: str,
    keep: Annotated[int, typer.Option(help="Restore points to keep per disk (at least 1).")],
    disk: Annotated[int | None, typer.Option(help="0-based disk (default: all)")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan; change nothing.")
    ] = False,
    wait: Annotated[bool, typer.Option(help="Follow the job to its end.")] = False,
) -> None:
    """Merge the oldest restore points of each disk's chain so that at most
    KEEP remain; the oldest kept one becomes a synthetic full."""
    m = _m()
    c = m.client()
    body: dict[str, Any] = {"vm_name": vm, "keep": keep}
    if disk is not None:
        body["disk_id"] = disk
    path = "/api/v1/backups/consolidate" + ("?dry_run=true" if dry_run else "")
    data = m.call(c.post, path, body)
    if dry_run:
        t = Table("disk", "new base", "merged away", "chain before", "after", "to write")
        for d in data["disks"]:
            t.add_row(
                f"{d['disk_id']} (key {d['disk_key']})",
                d["new_base"]["backup_id"],
                "\n".join(r["backup_id"] for r in d["remove"]),
                str(d["chain_length_before"]),
                str(d["chain_length_after"]),
                m.human(d["merge_bytes"]),
            )
        if not data["disks"] and not m.ctx.json:
            m.console.print(f"nothing to merge: no chain of {vm} is longer than {keep}")
            return
        m.out(data, t)
        return
    job_id = data["job_id"]
    if not wait:
        m.out(data) if m.ctx.json else m.console.print(f"job {job_id} started")
        return
    final = follow(c, job_id, f"consolidate {vm}")
    if m.ctx.json:
        m.out(final)
    else:
        _ended(m, job_id, final)
        for d in (final.get("result") or {}).get("disks") or []:
            m.console.print(
                f"  disk {d['disk_id']}: {len(d['removed'])} merged into {d['new_base']}, "
                f"{d['chain_length']} left, freed {m.human(d['freed_bytes'])}"
            )
    if final.get("status") != "completed":
        raise typer.Exit(1)


def backup_verify(
    backup_id: str,
    wait: Annotated[bool, typer.Option(help="Follow the job and show the outcome.")] = False,
) -> None:
    """Check a restore point: qemu-img check of its chain, and its digest."""
    m = _m()
    c = m.client()
    data = m.call(c.post, f"/api/v1/backups/{backup_id}/verify")
    job_id = data["job_id"]
    if not wait:
        m.out(data) if m.ctx.json else m.console.print(f"job {job_id} started")
        return
    final = follow(c, job_id, f"verify {backup_id[:8]}")
    result = final.get("result") or {}
    if m.ctx.json:
        m.out(final)
    else:
        _ended(m, job_id, final)
        status = result.get("verify_status")
        if status == "ok":
            m.console.print(f"backup {backup_id}: [green]ok[/green]")
        elif status:
            m.console.print(
                f"backup {backup_id}: [red]{status}[/red]: {result.get('verify_error')}"
            )
    if final.get("status") != "completed" or result.get("verify_status") != "ok":
        raise typer.Exit(1)


def bind(main: ModuleType) -> None:
    """Add the commands to ``main.backup_app``."""
    global _main
    _main = main
    main.backup_app.command("rm")(backup_rm)
    main.backup_app.command("consolidate")(backup_consolidate)
    main.backup_app.command("verify")(backup_verify)
