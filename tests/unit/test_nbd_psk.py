"""NBD TLS keys in the hub <-> node contract and on the node's disk."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from sendense.nbd import psk
from sendense.node.runner import JobRunner
from sendense.protocol.node import BackupStartRequest, WorkerJob

KEY = "ab" * 32


def request(**extra: object) -> dict[str, object]:
    return {
        "job_id": "job-1",
        "vm_name": "vm1",
        "source": {"type": "qemu", "config": {"password": "pw"}},
        "nbd_targets": "2000:nbds://hub:10100/sendense-1",
        "backup_type": "full",
        "nbd_tls": {"2000": {"username": "sendense", "psk": KEY}},
        **extra,
    }


def test_key_is_on_the_wire_but_never_in_a_repr() -> None:
    req = BackupStartRequest.model_validate(request())
    assert req.model_dump(mode="json")["nbd_tls"]["2000"]["psk"] == KEY
    assert KEY not in repr(req) and KEY not in str(req)
    assert KEY not in repr(req.nbd_tls["2000"])


def test_a_bad_key_is_refused_without_quoting_it() -> None:
    bad = "zz" + KEY[2:]
    with pytest.raises(ValidationError) as e:
        BackupStartRequest.model_validate(
            request(nbd_tls={"2000": {"username": "sendense", "psk": bad}})
        )
    assert bad not in str(e.value)


def test_a_tls_target_needs_its_key_and_a_key_its_target() -> None:
    with pytest.raises(ValidationError, match="have no key in nbd_tls"):
        BackupStartRequest.model_validate(request(nbd_tls={}))
    with pytest.raises(ValidationError, match="no target in nbd_targets"):
        BackupStartRequest.model_validate(
            request(
                nbd_tls={
                    "2000": {"username": "sendense", "psk": KEY},
                    "2001": {"username": "sendense", "psk": KEY},
                }
            )
        )
    # Plain targets (SENDENSE_NBD_TLS=false on the hub, or an older hub).
    plain = request(nbd_targets="2000:nbd://hub:10100/sendense-1", nbd_tls={})
    assert BackupStartRequest.model_validate(plain).nbd_tls == {}


def test_node_writes_keys_0600_and_the_worker_input_has_none(tmp_path: Path) -> None:
    runner = JobRunner(tmp_path)
    job_dir = tmp_path / "jobs" / "job-1"
    job_dir.mkdir()
    job = WorkerJob.from_request(
        BackupStartRequest.model_validate(request()),
        job_dir=job_dir,
        in_flight=4,
        request_size=1 << 20,
        max_rate=0,
        digest="sha256",
        parallel_disks=1,
    )
    handed = runner._write_keys(job)
    path = job_dir / "tls-2000.psk"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == f"sendense:{KEY}\n"
    stdin = handed.model_dump_json()
    assert KEY not in stdin
    again = WorkerJob.model_validate_json(stdin)  # what the worker reads
    tls = again.tls_file(2000)
    assert tls is not None and tls.psk_file == path and tls.username == "sendense"
    # A stale file is never reused.
    with pytest.raises(FileExistsError):
        runner._write_keys(job)
    runner.drop_keys("job-1")
    assert not path.exists()


def test_server_key_folder(tmp_path: Path) -> None:
    d = psk.make_server_dir(tmp_path / "tls-x", psk.new_key())
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "keys.psk").stat().st_mode) == 0o600
    assert psk.qemu_object("tls0", "/a,b").startswith(
        "tls-creds-psk,id=tls0,endpoint=server,dir=/a,,b,priority="
    )
    psk.remove_dir(d)
    assert not d.exists()
