"""The hub <-> node contract: validation, the wire format, no credentials in reprs."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sendense.protocol.node import (
    BackupStartAnswer,
    BackupStartRequest,
    DiscoverRequest,
    JobStatusReport,
    WorkerJob,
)

SECRET = "s3cret-pa55word"


def start_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "job_id": "job-1",
        "vm_name": "web1",
        "source": {"type": "vmware", "config": {"host": "vc", "password": SECRET}},
        "vm_path": "/dc/vm/web1",
        "nbd_targets": "2000:nbd://127.0.0.1:10100/a,2001:nbd://127.0.0.1:10101/b",
        "backup_type": "incremental",
        "previous_change_ids": {"2000": "sendense-aaaa"},
    }
    body.update(changes)
    return body


def errors_of(body: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as e:
        BackupStartRequest.model_validate(body)
    return [(".".join(map(str, err["loc"])), err["msg"]) for err in e.value.errors()]


def test_start_request_as_the_hub_sends_it() -> None:
    body = start_body()
    request = BackupStartRequest.model_validate(body)
    assert request.targets() == {
        2000: "nbd://127.0.0.1:10100/a",
        2001: "nbd://127.0.0.1:10101/b",
    }
    assert request.change_ids() == {2000: "sendense-aaaa"}
    # What the node hands on is what the hub sent (plus the optional tuning).
    assert request.model_dump() == {
        **body,
        "in_flight": None,
        "request_size": None,
        "nbd_tls": {},  # no keys: the hub sent plain targets
        "transfer": "push",  # the default: the node writes into the hub's targets
    }
    # A full backup reads no change id, whatever came with it.
    assert BackupStartRequest.model_validate(start_body(backup_type="full")).change_ids() == {}


@pytest.mark.parametrize(
    ("change_ids", "message"),
    [
        ({"disk0": "c"}, "key disk0 is not a disk key"),
        ({"2000": ""}, "the change id of disk 2000 is empty"),
        ({"2000": "c", "2002": "c"}, "disk(s) 2002 have no target in nbd_targets"),
        ({"2000": None}, "Input should be a valid string"),
    ],
)
def test_previous_change_ids_are_checked(change_ids: dict[str, Any], message: str) -> None:
    [(field, msg)] = errors_of(start_body(previous_change_ids=change_ids))
    assert field.startswith("previous_change_ids")
    assert message in msg


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"nbd_targets": "2000:http://h/e"}, "nbd_targets", "bad NBD target"),
        ({"job_id": "../etc"}, "job_id", "pattern"),
        ({"backup_type": "differential"}, "backup_type", "'full' or 'incremental'"),
        ({"source": {"config": {}}}, "source.type", "required"),
        ({"in_flight": 0}, "in_flight", "greater than or equal to 1"),
    ],
)
def test_other_fields_are_checked(changes: dict[str, Any], field: str, message: str) -> None:
    [(loc, msg)] = errors_of(start_body(**changes))
    assert loc == field
    assert message in msg


def test_no_credentials_in_reprs_or_validation_errors() -> None:
    request = BackupStartRequest.model_validate(start_body())
    job = WorkerJob.from_request(
        request,
        job_dir=Path("/var/node/jobs/job-1"),
        in_flight=8,
        request_size=4 << 20,
        max_rate=0,
        digest="x3-64k",
        parallel_disks=2,
    )
    discover = DiscoverRequest.model_validate({"source": start_body()["source"]})
    for model in (request, request.source, job, discover):
        assert SECRET not in repr(model)
        assert SECRET not in str(model)
        assert SECRET not in f"{model!r} {model}"
    # A validation error names the field but never quotes the input.
    with pytest.raises(ValidationError) as e:
        BackupStartRequest.model_validate(
            start_body(source={"type": "", "config": {"password": SECRET}})
        )
    assert SECRET not in str(e.value)
    assert "source.type" in str(e.value)
    # The wire still carries them: the node needs them.
    assert job.model_dump()["source"]["config"]["password"] == SECRET


def test_worker_job_takes_the_node_settings_where_the_request_has_none() -> None:
    request = BackupStartRequest.model_validate(start_body(request_size=1 << 20))
    settings = {"in_flight": 8, "request_size": 4 << 20, "max_rate": 5, "digest": "b3-64k"}
    job = WorkerJob.from_request(request, job_dir=Path("/j"), parallel_disks=3, **settings)
    assert (job.in_flight, job.request_size, job.max_rate, job.digest, job.parallel_disks) == (
        8,
        1 << 20,
        5,
        "b3-64k",
        3,
    )
    # Through the worker's stdin and back.
    assert WorkerJob.model_validate(json.loads(job.model_dump_json())) == job


def test_answers_keep_the_wire_format() -> None:
    started = datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    answer = BackupStartAnswer(job_id="j", message="m", started_at=started, pid=7)
    assert answer.model_dump(mode="json") == {
        "job_id": "j",
        "status": "started",
        "message": "m",
        "started_at": started.isoformat(),  # "+00:00", as the node always sent
        "pid": 7,
    }
    # A worker's status.json comes back as it was written, unknown keys too.
    written = {
        "job_id": "j",
        "status": "completed",
        "step": "completed",
        "pid": 7,
        "started_at": "2025-01-02T03:04:05.123456+00:00",
        "finished_at": "2025-01-02T03:04:09+00:00",
        "disks": {
            "2000": {
                "disk_key": 2000,
                "mode": "incremental",
                "bytes_done": 65536,
                "bytes_total": 65536,
                "status": "completed",
                "fallback_reason": None,
                "change_id": "sendense-bbbb",
                "digest": "x3-64k:00ff",
                "rate": 1000,
                "eta": 0.0,
                "a_newer_key": [1, 2],
            }
        },
        "error": None,
        "messages": [],
        "mover_peak_rss_bytes": 1 << 20,
        "updated_at": "2025-01-02T03:04:09.5+00:00",
    }
    report = JobStatusReport.model_validate_json(json.dumps(written))
    assert report.ended
    assert report.disks["2000"].change_id == "sendense-bbbb"
    again = json.loads(report.model_dump_json(exclude_unset=True))
    assert again == {**written, "updated_at": "2025-01-02T03:04:09.500000+00:00"}
