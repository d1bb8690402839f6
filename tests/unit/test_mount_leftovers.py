"""Restore sessions and exports a killed hub process left serving.

When a hub is killed -9 while a restore session runs and another hub on the
same catalog ends the job, nobody can stop the session's qemu-nbd but the
killed hub's next process, which finds its pid file. `ended_leftovers` names
those (jobs that ended or that the catalog does not know); active jobs'
pid files stay, since they may be another API worker's of this hub.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

from sendense.catalog.db import Database, sqlite_url
from sendense.catalog.models import BackupJob
from sendense.restore.sessions import ended_leftovers


def add_job(db: Database, status: str) -> str:
    with db.session() as s:
        job = BackupJob(
            kind="mount",
            status=status,
            step=status,
            requested_type="mount",
            params={},
            tags={},
            created_by="admin",
            created_at=datetime.now(UTC),
        )
        s.add(job)
        s.flush()
        return job.id


def test_only_ended_and_unknown_jobs_are_leftovers(tmp_path: Path) -> None:
    db = Database(sqlite_url(tmp_path / "catalog.db"))
    db.upgrade()
    folder = tmp_path / "mounts"
    folder.mkdir()
    running, failed = add_job(db, "running"), add_job(db, "failed")
    unknown = "0f0e0d0c-0000-4000-8000-000000000000"
    for job_id in (running, failed, unknown):
        (folder / f"{job_id}.pid").write_text("1\n")
    (folder / "not-a-pidfile.sock").write_text("")
    assert sorted(ended_leftovers(db, folder)) == sorted([failed, unknown])
    db.dispose()


def test_a_hub_start_stops_the_qemu_nbd_of_an_ended_session(tmp_path: Path) -> None:
    """The real path: MountJob.recover on what ended_leftovers names stops a
    live qemu-nbd whose pid file is in the folder."""
    from sendense.qemu import img
    from sendense.qemu.nbd_server import is_qemu_nbd, stop_pid

    db = Database(sqlite_url(tmp_path / "catalog.db"))
    db.upgrade()
    folder = tmp_path / "mounts"
    folder.mkdir()
    job_id = add_job(db, "failed")
    image = tmp_path / "disk.qcow2"
    img.create(str(image), 1 << 20)
    pidfile = folder / f"{job_id}.pid"
    proc = subprocess.Popen(
        ["qemu-nbd", "--read-only", "--persistent", f"--socket={tmp_path / 's.sock'}",
         f"--pid-file={pidfile}", "-f", "qcow2", str(image)]
    )  # fmt: skip
    try:
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text().strip():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert is_qemu_nbd(proc.pid)
        for leftover in ended_leftovers(db, folder):
            stop_pid(int((folder / f"{leftover}.pid").read_text().strip()))
        proc.wait(timeout=10)
        assert proc.returncode is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        db.dispose()
