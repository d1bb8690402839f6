"""``sendense demo``: everything on this machine, end to end.

Starts a hub and a node (real processes on loopback), a small VM
(qemu-storage-daemon with three disks, the third holding an ext4 filesystem,
and a QMP socket), registers and discovers it, runs a full backup, writes
into the VM's disks, runs an incremental, prints the chain, and proves the
newest restore point reads back identical to the disks (``qemu-img
compare``) and matches its recorded digest. Then: verify, a refused delete,
consolidation, roles and audit, whole-disk restore and an NBD export,
files restored from a backup without root, a policy whose schedule
takes a backup and whose retention removes a restore point, and security:
the node's pinned certificate, a key per NBD target, and a repository
encrypted at rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from sendense.cli.client import HubClient
from sendense.cli.main import DISK_NOTE, disk_name, watch_job
from sendense.cli.services import free_port, start_service, stop_service, wait_healthy
from sendense.mover.digest import algorithm_of
from sendense.mover.verify import digest_of_image
from sendense.qemu import img
from sendense.qemu.qsd import QsdVm
from sendense.tls import fingerprint

# Long lines (paths, digests) stay whole: the terminal wraps them, rich does not
# break them, and a log or a pipe gets them on one line.
console = Console(soft_wrap=True)


# The guest writes random blocks into the first two disks; the third holds
# a filesystem (files_disk) left as it was built.
RANDOM_DISKS = 2


def guest_writes(vm: QsdVm, rng: random.Random, count: int) -> int:
    written = 0
    for index, path in enumerate(vm.disks[:RANDOM_DISKS]):
        size = img.info(str(path))["virtual-size"]
        h = vm.guest(index)
        for _ in range(count):
            length = rng.choice([4096, 65536, 1 << 20])
            offset = rng.randrange(0, size - length) // 4096 * 4096
            h.pwrite(rng.randbytes(length), offset)
            written += length
        h.flush()
        h.shutdown()
    return written


def step(text: str) -> None:
    console.rule(f"[bold]{text}")


def run_demo(workdir: Path, disk_mib: int) -> int:
    workdir = workdir.resolve()
    if workdir.exists():
        _stop_leftovers(workdir)
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    hub_dir, node_dir, vm_dir = workdir / "hub", workdir / "node", workdir / "vm"
    hub_port, node_port = free_port(), free_port()
    # The node serves HTTPS with its own certificate; the hub pins it below.
    hub_url, node_url = f"http://127.0.0.1:{hub_port}", f"https://127.0.0.1:{node_port}"
    rng = random.Random(2026)
    vm = QsdVm(vm_dir, "demo-vm")
    hub = node = None
    try:
        step("1. hub and node")
        hub_dir.mkdir()
        node_dir.mkdir()
        hub = start_service(
            ["hub", "serve", "--port", str(hub_port), "--data-dir", str(hub_dir)],
            workdir / "hub.log",
            # The policy step waits for a one-minute schedule: look every 2 s.
            env={"SENDENSE_SCHEDULER_INTERVAL": "2"},
        )
        node_args = ["node", "serve", "--port", str(node_port), "--data-dir", str(node_dir)]
        node = start_service(node_args, workdir / "node.log")
        (workdir / "pids").write_text(f"{hub.pid} {node.pid}")
        wait_healthy(f"{hub_url}/api/v1/health", hub, workdir / "hub.log")
        wait_healthy(f"{node_url}/api/v1/health", node, workdir / "node.log")
        console.print(f"hub  {hub_url}  (token in {hub_dir / 'admin.token'})")
        node_fp = fingerprint((node_dir / "tls" / "node.crt").read_text())
        console.print(f"node {node_url}  (token in {node_dir / 'node.token'})")
        console.print(f"     certificate fingerprint {node_fp} (pinned by the hub)")

        step("2. a small VM: qemu-storage-daemon, three disks (one with files), QMP")
        vm.add_disk(disk_mib << 20)
        vm.add_disk((disk_mib // 2) << 20)
        guest_files = files_disk(vm, workdir, rng)
        vm.start()
        (workdir / "vm.pid").write_text(str(vm.pid))
        wrote = guest_writes(vm, rng, 40)
        console.print(f"VM demo-vm: QMP {vm.qmp_socket}; guest wrote {wrote >> 20} MiB")

        c = HubClient(hub_url, (hub_dir / "admin.token").read_text().strip())
        node_token = (node_dir / "node.token").read_text().strip()
        n = c.post(
            "/api/v1/nodes",
            {"name": "local", "url": node_url, "token": node_token, "fingerprint": node_fp},
        )
        src = c.post(
            "/api/v1/sources",
            {
                "name": "local-qemu",
                "node_id": n["node_id"],
                "type": "qemu",
                "config": {"vms": [{"name": "demo-vm", "qmp_socket": vm.qmp_socket}]},
            },
        )
        found = c.post("/api/v1/vms/discover", {"source_id": src["source_id"]})
        for v in found["vms"]:
            for d in v["disks"]:
                console.print(
                    f"discovered {v['name']} {disk_name(d)}: {d['capacity_bytes'] >> 20} MiB"
                )
        console.print(f"[dim]{DISK_NOTE}[/dim]")
        disks_found = sum(len(v["disks"]) for v in found["vms"] if v["name"] == "demo-vm")
        ok = check(disks_found == len(vm.disks), f"discovery found {disks_found} disks")

        step("3. full backup")
        full, good = backup(c, "full")
        ok &= good
        step("4. the guest writes, then an incremental backup")
        wrote = guest_writes(vm, rng, 10)
        console.print(f"guest wrote {wrote >> 10} KiB")
        incr, good = backup(c, "incremental")
        ok &= good

        step("5. the chain")
        chain = c.get("/api/v1/backups/demo-vm/chain")
        for d in chain["disks"]:
            parts = [f"{b['backup_type']} ({b['size_on_disk'] >> 10} KiB)" for b in d["chain"]]
            console.print(f"{disk_name(d)}: " + " -> ".join(parts))
            ok &= check(
                len(d["chain"]) == 2, f"{disk_name(d)}: chain of {len(d['chain'])}", quiet=True
            )

        step("6. proof: the newest restore point reads exactly as the disks")
        for b in incr["backups"]:
            bk = c.get(f"/api/v1/backups/{b['backup_id']}")
            disk = vm.disks[bk["disk_id"]]
            same = img.compare(bk["file_path"], str(disk))
            ok &= check(same, f"{disk_name(bk)}: newest restore point and disk are identical")
            ok &= check_digest(bk, "newest restore point")
        step("7. proof: the full restore points still read as recorded")
        for b in full["backups"]:
            ok &= check_digest(c.get(f"/api/v1/backups/{b['backup_id']}"), "full restore point")
        ok &= lifecycle(c, vm, rng, full, incr)
        ok &= restores(c, vm, hub_dir / "restores")
        ok &= file_restore(c, guest_files)
        ok &= policy(c, vm)
        ok &= security(c, vm, hub_dir)

        def restart_node(env: dict[str, str]) -> None:
            """The node again with other settings (the hub re-reads its health)."""
            nonlocal node
            stop_service(node)
            node = start_service(node_args, workdir / "node.log", env=env)
            (workdir / "pids").write_text(f"{hub.pid} {node.pid}")
            wait_healthy(f"{node_url}/api/v1/health", node, workdir / "node.log")

        ok &= dropped_connection(c, vm, hub_dir, restart_node)
        ok &= queue(c, vm, n["node_id"])
        ok &= pull(c, vm, restart_node)
        step("done: every check passed" if ok else "FAILED: see the checks marked FAILED above")
        console.print(f"Everything is under {workdir}:")
        console.print(f"  restore points  {hub_dir / 'repositories' / 'default'}")
        console.print(f"  catalog         {hub_dir / 'catalog.db'}")
        console.print(f"  logs            {workdir}/hub.log, node.log, {node_dir}/jobs/*/job.log")
        console.print("Run it again: make demo   (or .venv/bin/sendense demo)")
        console.print(
            "Explore the catalog: start the hub again; it stays in the foreground, so run it"
            " in another terminal or append & (stop it with Ctrl-C, or kill %1):"
        )
        console.print(f"  .venv/bin/sendense hub serve --data-dir {hub_dir} &")
        console.print(
            "  then open the web console at http://127.0.0.1:8082/ui/ and sign in with"
            f" the token in {hub_dir / 'admin.token'}"
        )
        console.print(f"  .venv/bin/sendense --data-dir {hub_dir} backup ls")
        console.print(f"  .venv/bin/sendense --data-dir {hub_dir} backup chain demo-vm")
        return 0 if ok else 1
    finally:
        vm.stop()
        stop_service(node)
        stop_service(hub)
        (workdir / "pids").unlink(missing_ok=True)


def lifecycle(
    c: HubClient, vm: QsdVm, rng: random.Random, full: dict[str, Any], incr: dict[str, Any]
) -> bool:
    """Verify, a refused delete, consolidation, and a viewer's limits."""
    ok = True
    step("8. verify: qemu-img check and the digest, read again through the chain")
    for b in incr["backups"]:
        job = c.post(f"/api/v1/backups/{b['backup_id']}/verify")
        done = wait_job(c, job["job_id"])
        bk = c.get(f"/api/v1/backups/{b['backup_id']}")
        ok &= check(
            done["status"] == "completed" and bk["verify_status"] == "ok",
            f"{disk_name(bk)}: verify_status {bk['verify_status']} at {bk['verified_at']}",
        )
    step("9. a full with incrementals on it cannot be deleted alone")
    base = full["backups"][0]["backup_id"]
    r = c.http.request("DELETE", f"/api/v1/backups/{base}")
    body = r.json()
    ok &= check(
        r.status_code == 409 and body.get("error") == "has_dependents",
        f"DELETE of the full: {r.status_code} {body.get('error')}: {body.get('message')}",
    )
    step("10. one more incremental, then consolidate down to 2 restore points")
    guest_writes(vm, rng, 5)
    newest, good = backup(c, "incremental")
    ok &= good
    job = c.post("/api/v1/backups/consolidate", {"vm_name": "demo-vm", "keep": 2})
    done = wait_job(c, job["job_id"])
    ok &= check(done["status"] == "completed", f"consolidation job {done['status']}")
    for d in c.get("/api/v1/backups/demo-vm/chain")["disks"]:
        links = d["chain"]
        ok &= check(
            len(links) == 2 and links[0]["synthetic"] and links[0]["parent_backup_id"] is None,
            f"{disk_name(d)}: "
            + " -> ".join(
                f"{x['backup_type']}{' (synthetic)' if x['synthetic'] else ''}" for x in links
            ),
        )
    for b in newest["backups"]:
        bk = c.get(f"/api/v1/backups/{b['backup_id']}")
        same = img.compare(bk["file_path"], str(vm.disks[bk["disk_id"]]))
        ok &= check(same, f"{disk_name(bk)}: newest restore point still reads as the disk")
    step("11. a viewer token reads but cannot delete; the audit log shows it")
    viewer = c.post("/api/v1/tokens", {"name": "demo-viewer", "role": "viewer"})
    as_viewer = HubClient(c.url, viewer["token"])
    ok &= check(len(as_viewer.get("/api/v1/vms")["vms"]) == 1, "the viewer lists the VM")
    r = as_viewer.http.request("DELETE", f"/api/v1/backups/{base}")
    ok &= check(r.status_code == 403, f"the viewer's DELETE: {r.status_code} {r.json()['message']}")
    entries = c.get("/api/v1/audit", token="demo-viewer")["entries"]
    ok &= check(
        bool(entries) and entries[0]["status"] == 403,
        f"audit: {entries[0]['token_name']} {entries[0]['method']} {entries[0]['route']} "
        f"-> {entries[0]['status']}"
        if entries
        else "audit: no entry for the viewer",
    )
    return ok


def restores(c: HubClient, vm: QsdVm, where: Path) -> bool:
    """A whole-disk restore to a raw file, and the same point served over NBD."""
    ok = True
    step("12. restore the newest point of disk 0 to a raw file; serve it over NBD")
    (bk,) = c.get("/api/v1/backups", vm_name="demo-vm", disk_id=0, status="completed", limit=1)[
        "backups"
    ]
    target = where / "demo-vm-disk0.raw"
    job = c.post(
        "/api/v1/restores",
        {
            "backup_id": bk["backup_id"],
            "destination": {"type": "file", "path": str(target), "format": "raw"},
        },
    )
    done = wait_job(c, job["job_id"])
    ok &= check(done["status"] == "completed", f"restore job {done['status']}: {target}")
    ok &= check(
        target.exists() and img.compare(str(target), str(vm.disks[0])),
        f"{disk_name(bk)}: the restored raw file reads as the disk",
    )
    export = c.post(f"/api/v1/backups/{bk['backup_id']}/export", {"writable": False})
    ok &= check(
        export["status"] == "serving" and img.compare(export["url"], str(vm.disks[0])),
        f"{disk_name(bk)}: served read-only at {export['url']} and reads as the disk",
    )
    closed = c.http.request("DELETE", f"/api/v1/backups/{bk['backup_id']}/export").json()
    ok &= check(closed.get("status") == "closed", f"export {closed.get('status')}")
    return ok


def files_disk(vm: QsdVm, workdir: Path, rng: random.Random) -> dict[str, str]:
    """A third disk holding an ext4 filesystem with a few files, built
    without mounting (``mkfs.ext4 -d``); answers each file's sha256."""
    tree = workdir / "guest-files"
    files = {
        "etc/hostname": b"demo-vm\n",
        "home/alice/notes.txt": "Ünïcode name, plain text\n".encode() * 100,
        "var/lib/app/data.bin": rng.randbytes(3 << 20),
    }
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    raw = workdir / "files.raw"
    with raw.open("wb") as f:
        f.truncate(64 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "demo-files", "-d", str(tree), str(raw)], check=True
    )
    path = vm.workdir / f"{vm.name}-disk{len(vm.disks)}.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True
    )
    raw.unlink()
    shutil.rmtree(tree)
    vm.disks.append(path)
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def file_restore(c: HubClient, files: dict[str, str]) -> bool:
    """Files out of a backup's filesystem, read in user space (no root, no mount)."""
    ok = True
    step("13. file-level restore without root: open a session on disk 2's newest point")
    (bk,) = c.get("/api/v1/backups", vm_name="demo-vm", disk_id=2, status="completed", limit=1)[
        "backups"
    ]
    session = c.post("/api/v1/restore/mounts", {"backup_id": bk["backup_id"]})
    mount = f"/api/v1/restore/mounts/{session['mount_id']}"
    try:
        for p in session["partitions"]:
            console.print(
                f"partition {p['index']}: {p['filesystem']} label {p['label']!r}, "
                f"{p['size'] >> 20} MiB {' '.join(p['warnings'])}"
            )
        (part,) = [p["index"] for p in session["partitions"] if p["filesystem"]]
        listing = c.http.request(
            "GET", f"{mount}/files", params={"path": "/home/alice", "partition": part}
        ).json()
        for e in listing["entries"]:
            console.print(f"  /home/alice/{e['name']}  {e['type']}  {e['size']} bytes")
        for rel, digest in files.items():
            r = c.http.request(
                "GET", f"{mount}/download", params={"path": f"/{rel}", "partition": part}
            )
            got = hashlib.sha256(r.content).hexdigest()
            ok &= check(
                r.status_code == 200 and got == digest,
                f"/{rel}: downloaded {len(r.content)} bytes, sha256 equal to the guest's file",
            )
    finally:
        closed = c.http.request("DELETE", mount).json()
    ok &= check(closed.get("status") == "closed", f"session {closed.get('status')}")
    return ok


def policy(c: HubClient, vm: QsdVm) -> bool:
    """A policy on a tag, every minute, keeping 2: the scheduler takes a backup
    and retention removes the oldest restore point of each disk."""
    ok = True
    step("14. a policy: VMs tagged tier=demo, every minute, keep the last 2 restore points")
    c.http.request(
        "PATCH", "/api/v1/vms/demo-vm", json={"tags": {"tier": "demo"}}
    ).raise_for_status()

    def points() -> int:
        return int(
            c.get("/api/v1/backups", vm_name="demo-vm", status="completed", limit=1)["total"]
        )

    before = points()
    p = c.post(
        "/api/v1/policies",
        {
            "name": "demo-every-minute",
            "selector": {"tags": {"tier": "demo"}},
            "repository_id": "default",
            "schedule": "* * * * *",
            "retention": {"keep_last": 2},
        },
    )
    console.print(
        f"policy {p['name']}: matches {p['matched_vms']}; next runs "
        + ", ".join(t[11:19] for t in p["next_runs"])
        + f" UTC; {before} restore points now"
    )
    deadline, seen, run = time.monotonic() + 180, "", None
    while time.monotonic() < deadline:
        runs = c.get(f"/api/v1/policies/{p['policy_id']}")["last_runs"]
        run = runs[0] if runs else None
        status = run["status"] if run else "waiting for the schedule"
        if status != seen:
            console.print(f"  {time.strftime('%H:%M:%S')} run: {status}")
            seen = status
        if run and run["status"] in ("done", "failed", "skipped"):
            break
        time.sleep(1)
    # No more runs while the demo ends.
    c.http.request("PATCH", f"/api/v1/policies/{p['policy_id']}", json={"enabled": False})
    if run is None or run["status"] != "done":
        return check(
            False,
            f"the scheduled run: {run['status'] if run else 'never ran'}"
            + (f" ({run['reason']})" if run and run.get("reason") else ""),
        )
    ok &= check(
        True,
        f"scheduled backup job {run['job_id']} ({run['backup_type']}), trigger {run['trigger']}",
    )
    for backup_id in run["backup_ids"]:
        bk = c.get(f"/api/v1/backups/{backup_id}")
        ok &= check(
            img.compare(bk["file_path"], str(vm.disks[bk["disk_id"]])),
            f"{disk_name(bk)}: the scheduled restore point reads as the disk",
        )
    job = c.get(f"/api/v1/jobs/{run['retention_job_id']}") if run["retention_job_id"] else None
    after = points()
    ok &= check(
        job is not None and job["status"] == "completed" and after == before,
        f"retention job {job['status'] if job else 'missing'}: {before} + {len(vm.disks)} - "
        f"{before + len(vm.disks) - after} = {after} restore points (one per disk removed)",
    )
    return ok


def security(c: HubClient, vm: QsdVm, hub_dir: Path) -> bool:
    """What crossed the wire was encrypted and authenticated (the node's
    pinned certificate, a key per NBD target, gone after the job); a
    repository encrypted at rest holds LUKS images that read back as the
    disks only with its key."""
    step("15. security: pinned node, TLS-PSK on NBD, an encrypted repository")
    ok = True
    (node,) = c.get("/api/v1/nodes")["nodes"]
    ok &= check(
        bool(node.get("tls")) and bool(node.get("fingerprint")),
        f"node {node['name']}: HTTPS, certificate pinned ({str(node.get('fingerprint'))[:16]}...)",
    )
    left = sorted(p.name for p in (hub_dir / "run").glob("tls-*"))
    ok &= check(
        not left,
        "every backup so far went over nbds:// with a key per disk; no key is left"
        + (f" (left: {left})" if left else ""),
    )
    vault = hub_dir.parent / "vault"  # a repository is never inside the hub's data dir
    repo = c.post("/api/v1/repositories", {"name": "vault", "path": str(vault), "encrypted": True})
    console.print(
        f"repository vault at {vault}: "
        + ("encrypted at rest" if repo["encrypted"] else "NOT encrypted")
    )
    full, good = backup(c, "full", repository_id=repo["repository_id"])
    ok &= good
    passphrase = c.post(f"/api/v1/repositories/{repo['repository_id']}/key/export", {})[
        "passphrase"
    ]
    key = img.ImageKey(passphrase.encode())
    for b in full["backups"]:
        bk = c.get(f"/api/v1/backups/{b['backup_id']}")
        fmt = img.info(bk["file_path"]).get("format-specific", {}).get("data", {})
        luks = fmt.get("encrypt", {}).get("format") == "luks"
        ok &= check(luks, f"{disk_name(bk)}: {Path(bk['file_path']).name} is LUKS-encrypted QCOW2")
        ok &= check(
            img.compare(bk["file_path"], str(vm.disks[bk["disk_id"]]), key=key),
            f"{disk_name(bk)}: with the repository's key it reads exactly as the disk",
        )
    first = full["backups"][0]["backup_id"]
    job = wait_job(c, c.post(f"/api/v1/backups/{first}/verify")["job_id"])
    bk = c.get(f"/api/v1/backups/{first}")
    ok &= check(
        job["status"] == "completed" and bk["verify_status"] == "ok",
        f"{disk_name(bk)}: verify of the encrypted restore point: {bk['verify_status']}",
    )
    console.print(
        "[dim]the key export above is what `sendense repo export-key vault` writes for"
        " disaster recovery; without it and the hub's master key the files are unreadable[/dim]"
    )
    return ok


def same_as_disks(c: HubClient, vm: QsdVm, job: dict[str, Any], what: str) -> bool:
    """Every restore point of ``job`` reads exactly as its disk (the guest
    does not write while these steps run)."""
    ok = check(
        job["status"] == "completed", f"{what}: job {job['status']} {job.get('error') or ''}"
    )
    for d in job["disks"]:
        bk = c.get(f"/api/v1/backups/{d['backup_id']}")
        same = img.compare(bk["file_path"], str(vm.disks[bk["disk_id"]]))
        ok &= check(same, f"{disk_name(bk)}: {what} {bk['backup_type']} identical to the disk")
    return ok


def dropped_connection(
    c: HubClient, vm: QsdVm, hub_dir: Path, restart_node: Callable[[dict[str, str]], None]
) -> bool:
    """Kill the hub's NBD target of a copy in flight: the hub serves it again,
    the node's mover reconnects and goes on from its last flushed position."""
    step("16. a dropped connection: the hub's target is killed mid-copy; the copy goes on")
    # A slow node (8 MiB/s) so that the copy is still running when we strike.
    restart_node({"SENDENSE_NODE_MAX_RATE": str(8 << 20), "SENDENSE_NODE_REQUEST_SIZE": "1048576"})
    job_id = c.post(
        "/api/v1/backups", {"vm_name": "demo-vm", "repository_id": "default", "backup_type": "full"}
    )["job_id"]
    deadline = time.monotonic() + 60
    job = c.get(f"/api/v1/jobs/{job_id}")
    while time.monotonic() < deadline:
        job = c.get(f"/api/v1/jobs/{job_id}")
        if job["status"] != "pending" and any(d["bytes_done"] > 0 for d in job["disks"]):
            break
        time.sleep(0.1)
    pidfile = hub_dir / "run" / f"nbd-{job['disks'][0]['backup_id']}.pid"
    killed = False
    try:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        killed = True
        console.print(f"killed the target of {disk_name(job['disks'][0])} (kill -9 qemu-nbd)")
    except (OSError, ValueError) as e:
        console.print(f"could not kill the target: {e}")
    retried = False
    while time.monotonic() < deadline + 240:
        job = c.get(f"/api/v1/jobs/{job_id}", wait=1)
        for r in [job.get("retry"), *(d.get("retry") for d in job["disks"])]:
            if r and not retried:
                retried = True
                console.print(f"retrying: {r['reason']} (attempt {r['attempt']})")
        if job["status"] in ("completed", "failed", "cancelled"):
            break
    ok = check(killed, "the target was killed while the copy ran")
    # The reconnect may take less than a poll: the job's messages keep it.
    said = [m for m in json.dumps(job.get("messages") or {}).split('"') if "reconnected" in m]
    for m in said:
        console.print(m)
    ok &= check(retried or bool(said), "the node's mover reconnected to the served-again target")
    ok &= same_as_disks(c, vm, job, "after the dropped connection:")
    restart_node({})
    return ok


def queue(c: HubClient, vm: QsdVm, node_id: str) -> bool:
    """A node limit of one job: a second backup waits queued, then runs."""
    step("17. node limits: one job at a time on this node; the next one waits in the queue")
    c.request("PATCH", f"/api/v1/nodes/{node_id}", json={"max_jobs": 1})
    first = c.post(
        "/api/v1/backups",
        {"vm_name": "demo-vm", "repository_id": "default", "backup_type": "incremental"},
    )
    # The same VM again: "queue" asks to wait for its job rather than 409 disk_busy.
    second = c.post(
        "/api/v1/backups",
        {
            "vm_name": "demo-vm",
            "repository_id": "default",
            "backup_type": "incremental",
            "queue": True,
        },
    )
    waiting = c.get(f"/api/v1/jobs/{second['job_id']}")
    console.print(f"second job: {waiting['status']}, step {waiting['step']!r}")
    ok = check(
        waiting["status"] == "pending" or waiting["step"] == "queued",
        "the second backup waits its turn (it is not refused)",
    )
    ok &= same_as_disks(c, vm, wait_job(c, first["job_id"]), "first:")
    ok &= same_as_disks(c, vm, wait_job(c, second["job_id"]), "queued, then run:")
    c.request("PATCH", f"/api/v1/nodes/{node_id}", json={"max_jobs": None})
    return ok


def pull(c: HubClient, vm: QsdVm, restart_node: Callable[[dict[str, str]], None]) -> bool:
    """Pull mode: the node serves the frozen disks, the hub writes QCOW2 itself."""
    step("18. pull mode: the node serves its frozen disks, the hub reads them in one hop")
    restart_node({"SENDENSE_NODE_TRANSFER": "pull"})
    full, ok = backup(c, "full")
    ok &= same_as_disks(c, vm, wait_job(c, full["job_id"]), "pulled")
    incr, good = backup(c, "incremental")  # incrementals stay push
    ok &= good & same_as_disks(c, vm, wait_job(c, incr["job_id"]), "pushed")
    restart_node({})
    return ok


def wait_job(c: HubClient, job_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = c.get(f"/api/v1/jobs/{job_id}", wait=5)
        if job["status"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            return job


def check(good: bool, text: str, *, quiet: bool = False) -> bool:
    """One of the demo's checks: printed as passed or FAILED (``quiet``: only
    when it fails); any failed check makes the demo's exit status 1."""
    if not good:
        console.print(f"[red]FAILED[/red] {text}")
    elif not quiet:
        console.print(f"[green]ok[/green]     {text}")
    return good


def check_digest(bk: dict[str, Any], what: str) -> bool:
    """Read a restore point through its chain and compare with the digest
    recorded at backup time."""
    recorded = bk["digest"]
    if not recorded:
        return check(False, f"{disk_name(bk)}: {what} has no recorded digest")
    digest = digest_of_image(bk["file_path"], algorithm=algorithm_of(recorded))
    return check(
        digest == recorded,
        f"{disk_name(bk)}: {what} reads as recorded, digest {recorded}"
        + ("" if digest == recorded else f" (read back: {digest})"),
    )


def backup(
    c: HubClient, kind: str, *, repository_id: str = "default"
) -> tuple[dict[str, Any], bool]:
    """Run a backup of ``kind`` and follow it; true if it completed as asked."""
    started = c.post(
        "/api/v1/backups",
        {"vm_name": "demo-vm", "repository_id": repository_id, "backup_type": kind},
    )
    final = watch_job(c, started["job_id"])
    if final["status"] != "completed":
        raise SystemExit(f"{kind} backup {final['status']}: {final.get('error')}")
    good = True
    for d in final["disks"]:
        note = f" ({d['fallback_reason']})" if d.get("fallback_reason") else ""
        good &= check(
            d["backup_type"] == kind,
            f"{disk_name(d)}: {d['backup_type']}{note}, {d['bytes_done'] >> 10} KiB moved",
        )
    return started, good


def _stop_leftovers(workdir: Path) -> None:
    for name in ("pids", "vm.pid"):
        p = workdir / name
        if p.exists():
            for pid in p.read_text().split():
                try:
                    os.kill(int(pid), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
    time.sleep(0.5)
