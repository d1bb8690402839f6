"""Webhooks end to end: a real hub and node, receivers in the test process.

What a user checks: the POSTs their receiver got (JSON body, the HMAC
signature recomputed here from its definition, the same delivery id on
every retry), the deliveries the API lists, and that the secret is in no
answer and not in the hub's log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fixtures.cluster import Cluster, cli
from fixtures.lifecycle import (
    MiB,
    catalog_exec,
    cluster_env,
    error_body,
    lifecycle_cluster,
    write_random,
)

SECRET = "whsec-" + "s3cr3t-do-not-leak-0123456789"
BOTH = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
FAST = {
    "SENDENSE_WEBHOOK_INTERVAL": "0.2",
    "SENDENSE_WEBHOOK_BACKOFF": "0.5",
    "SENDENSE_WEBHOOK_MAX_ATTEMPTS": "4",
    "SENDENSE_WEBHOOK_TIMEOUT": "3",
}


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers the
    next status of ``answers`` (200 once they are used up)."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.answers = list(answers or [])
        self.posts: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    status = receiver.answers.pop(0) if receiver.answers else 200
                    receiver.posts.append(
                        {
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "raw": body,
                            "json": json.loads(body),
                            "answered": status,
                        }
                    )
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no" if status >= 300 else b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait(self, n: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if len(self.posts) >= n:
                    return list(self.posts)
            assert time.monotonic() < deadline, f"{len(self.posts)} of {n} POSTs in {timeout}s"
            time.sleep(0.1)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for r in made:
        r.close()


def wait_delivery(
    c: Cluster, webhook_id: str, status: str, timeout: float = 60
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = c.client.get(f"/api/v1/webhooks/{webhook_id}/deliveries")["deliveries"]
        if found and all(d["status"] == status for d in found):
            return list(found)
        assert time.monotonic() < deadline, found
        time.sleep(0.2)


def assert_signed(post: dict[str, Any], secret: str) -> None:
    h = post["headers"]
    mac = hmac.new(
        secret.encode(), h["x-sendense-timestamp"].encode() + b"." + post["raw"], hashlib.sha256
    )
    assert h["x-sendense-signature"] == "sha256=" + mac.hexdigest(), h
    assert abs(time.time() - int(h["x-sendense-timestamp"])) < 120


@cluster_env(hub=FAST)
@pytest.mark.parametrize("cluster", BOTH, indirect=True)
def test_webhooks_completed_failed_retried_and_given_up(
    cluster: Cluster, make_vm, receivers: list[Receiver]
) -> None:
    ok, flaky = Receiver(), Receiver([500, 500])
    receivers += [ok, flaky]
    c = cluster
    signed = c.client.post(
        "/api/v1/webhooks",
        {"url": ok.url, "events": ["job.completed", "job.failed"], "secret": SECRET},
    )
    assert signed["has_secret"] is True and "secret" not in signed
    retried = c.client.post("/api/v1/webhooks", {"url": flaky.url, "events": ["job.completed"]})
    assert retried["has_secret"] is False
    # Nothing listens on port 9 (discard) here: every attempt fails, then it is given up.
    dead = c.client.post(
        "/api/v1/webhooks", {"url": "http://127.0.0.1:9/x?token=abc", "events": ["job.failed"]}
    )
    for path in ("/api/v1/webhooks", f"/api/v1/webhooks/{signed['webhook_id']}"):
        r = c.http("GET", path)
        assert r.status_code == 200 and SECRET not in r.text, r.text
    assert c.client.get(f"/api/v1/webhooks/{signed['webhook_id']}")["has_secret"] is True

    vm = make_vm("hook1", [8 * MiB])
    write_random(vm, 0, 0, MiB)
    c.register(vm)
    t0 = time.time()
    job = c.backup("hook1", "full")

    (post,) = ok.wait(1)
    assert post["path"] == "/hook"
    assert post["headers"]["x-sendense-event"] == "job.completed"
    assert post["headers"]["content-type"] == "application/json"
    assert_signed(post, SECRET)
    body = post["json"]
    assert body["event"] == "job.completed"
    assert body["event_key"] == f"job.completed:{job['job_id']}"
    data = body["data"]
    assert data["job_id"] == job["job_id"] and data["kind"] == "backup"
    assert data["status"] == "completed" and data["error"] is None
    assert data["vm_name"] == "hook1"
    assert data["backups"] == job["backups"]
    points = [c.client.get(f"/api/v1/backups/{b}") for b in job["backups"]]
    assert data["bytes_transferred"] == sum(p["bytes_transferred"] for p in points) > 0
    assert t0 - 1 <= time.time() and data["finished_at"]

    # 500, 500, then 200: delivered on the third attempt, one delivery id throughout.
    posts = flaky.wait(3)
    assert [p["answered"] for p in posts] == [500, 500, 200]
    assert len({p["headers"]["x-sendense-delivery"] for p in posts}) == 1
    assert "x-sendense-signature" not in posts[0]["headers"]
    assert all(p["raw"] == posts[0]["raw"] for p in posts)  # the same body each time
    (d,) = wait_delivery(c, retried["webhook_id"], "delivered")
    assert d["attempts"] == 3 and d["last_error"].startswith("HTTP 500"), d
    assert d["delivery_id"] == posts[0]["headers"]["x-sendense-delivery"]
    assert d["delivered_at"] and d["next_attempt_at"] is None

    # A job that fails: the node is gone.
    c.kill("node")
    r = c.http("POST", "/api/v1/backups", json={"vm_name": "hook1", "repository_id": "default"})
    error_body(r, 503, "node_unreachable")
    (failed_job,) = c.client.get("/api/v1/jobs", status="failed")["jobs"]
    posts = ok.wait(2)
    assert len(posts) == 2
    failed = posts[1]
    assert failed["headers"]["x-sendense-event"] == "job.failed"
    assert_signed(failed, SECRET)
    assert failed["json"]["data"]["job_id"] == failed_job["job_id"]
    assert failed["json"]["data"]["error"]["code"] == "node_unreachable"
    assert failed["json"]["event_key"] == f"job.failed:{failed_job['job_id']}"

    # The unreachable receiver: 4 attempts, then failed, with a reason and no URL path.
    (gone,) = wait_delivery(c, dead["webhook_id"], "failed")
    assert gone["attempts"] == 4 and gone["event"] == "job.failed", gone
    assert gone["last_error"] and "token=abc" not in gone["last_error"], gone
    listed = {h["webhook_id"]: h for h in c.client.get("/api/v1/webhooks")["webhooks"]}
    assert listed[dead["webhook_id"]]["failed"] == 1
    assert listed[retried["webhook_id"]]["pending"] == 0
    assert listed[signed["webhook_id"]]["last_delivered_at"]

    time.sleep(1)  # a pass that re-reads the same jobs sends nothing twice
    assert len(ok.posts) == 2 and len(flaky.posts) == 3

    # Deliveries listed, newest first; the secret in no answer and not in the log.
    r = c.http("GET", f"/api/v1/webhooks/{signed['webhook_id']}/deliveries")
    assert r.status_code == 200 and SECRET not in r.text
    listed_events = [d["event"] for d in r.json()["deliveries"]]
    assert listed_events == ["job.failed", "job.completed"]
    assert SECRET not in c.log("hub")
    assert "token=abc" not in c.log("hub")
    assert "webhook delivered" in c.log("hub")

    # Removed: it and its outbox are gone.
    gone_hook = c.client.request("DELETE", f"/api/v1/webhooks/{signed['webhook_id']}")
    assert gone_hook == {
        "webhook_id": signed["webhook_id"],
        "deleted": True,
        "deliveries_removed": 2,
    }
    error_body(c.http("GET", f"/api/v1/webhooks/{signed['webhook_id']}"), 404, "not_found")


@cluster_env(hub=FAST)
def test_a_test_delivery_reaches_the_receiver(cluster: Cluster, receivers: list[Receiver]) -> None:
    c = cluster
    rx = Receiver()
    receivers.append(rx)
    hook = c.client.post(
        "/api/v1/webhooks", {"url": rx.url, "events": ["job.failed"], "secret": SECRET}
    )["webhook_id"]
    queued = json.loads(cli(c, "--json", "webhook", "test", hook).stdout)
    assert queued["event"] == "webhook.test" and queued["status"] == "pending"
    (post,) = rx.wait(1)
    assert post["headers"]["x-sendense-event"] == "webhook.test"
    assert post["headers"]["x-sendense-delivery"] == queued["delivery_id"]
    assert_signed(post, SECRET)
    assert post["json"]["data"] == {"webhook_id": hook, "requested_by": "admin"}
    (d,) = wait_delivery(c, hook, "delivered")
    assert d["attempts"] == 1 and d["last_error"] is None
    c.client.request("PATCH", f"/api/v1/webhooks/{hook}", json={"enabled": False})
    r = c.http("POST", f"/api/v1/webhooks/{hook}/test")
    assert "disabled" in error_body(r, 409, "conflict")["message"]


def test_webhook_requests_are_checked(cluster: Cluster) -> None:
    c = cluster
    for body, field in [
        ({"url": "ftp://x.example/h", "events": ["job.failed"]}, "url"),
        ({"url": "http:///nohost", "events": ["job.failed"]}, "url"),
        ({"url": "https://x.example/h", "events": []}, "events"),
        ({"url": "https://x.example/h", "events": ["job.exploded"]}, "events"),
        ({"url": "https://x.example/h", "events": ["job.failed", "job.failed"]}, "events"),
        ({"url": "https://x.example/h", "events": ["job.failed"], "secret": "short"}, "secret"),
        (
            {"url": "https://x.example/h", "events": ["job.failed"], "policy_id": "nope"},
            "policy_id",
        ),
        ({"url": "https://x.example/h", "events": ["job.failed"], "extra": 1}, "extra"),
    ]:
        r = c.http("POST", "/api/v1/webhooks", json=body)
        err = error_body(r, 400, "invalid_request")
        assert field in r.text, (body, err)
    viewer = c.client.post("/api/v1/tokens", {"name": "v", "role": "viewer"})["token"]
    r = c.http("GET", "/api/v1/webhooks", token=viewer)
    assert error_body(r, 403, "forbidden")["details"]["role_needed"] == "admin"
    error_body(c.http("GET", "/api/v1/webhooks/nope/deliveries"), 404, "not_found")


def test_webhook_cli(cluster: Cluster) -> None:
    c = cluster
    added = json.loads(
        cli(
            c, "--json", "webhook", "add", "https://u:pw@x.example/h",
            "--event", "job.failed", "--event", "run.missed", "--secret", SECRET,
        ).stdout
    )  # fmt: skip
    assert added["has_secret"] is True and added["url"] == "https://u:***@x.example/h"
    out = cli(c, "webhook", "ls").stdout
    assert added["webhook_id"] in out and "job.failed" in out and SECRET not in out
    assert "pw" not in out
    out = cli(c, "webhook", "deliveries", added["webhook_id"]).stdout
    assert "no deliveries" in out
    edited = json.loads(
        cli(
            c, "--json", "webhook", "edit", added["webhook_id"], "--disable", "--remove-secret"
        ).stdout
    )
    assert edited["enabled"] is False and edited["has_secret"] is False, edited
    assert edited["events"] == ["job.failed", "run.missed"]
    out = cli(
        c, "webhook", "edit", added["webhook_id"], "--enable", "--event", "job.completed",
        "--secret", SECRET + "2",
    ).stdout  # fmt: skip
    assert "job.completed; signed; on" in out and SECRET not in out, out
    path = f"/api/v1/webhooks/{added['webhook_id']}"
    for body, field in [
        ({"url": None}, "url"),
        ({"events": []}, "events"),
        ({"enabled": None}, "enabled"),
        ({"secret": "short"}, "secret"),
        ({"policy_id": "nope"}, "policy_id"),
        ({"nope": 1}, "nope"),
    ]:
        r = c.http("PATCH", path, json=body)
        error_body(r, 400, "invalid_request")
        assert field in r.text, (body, r.text)
    error_body(c.http("PATCH", "/api/v1/webhooks/nope", json={}), 404, "not_found")
    cli(c, "webhook", "rm", added["webhook_id"])
    assert c.client.get("/api/v1/webhooks")["webhooks"] == []
    r = cli(c, "webhook", "rm", added["webhook_id"], ok=False)
    assert "not found" in r.stderr + r.stdout


@cluster_env(hub={**FAST, "SENDENSE_SCHEDULER_INTERVAL": "0.5"})
@pytest.mark.parametrize("cluster", BOTH, indirect=True)
def test_missed_runs_are_told_once(cluster: Cluster, receivers: list[Receiver]) -> None:
    """A policy that missed five minutes of a one-minute schedule: one
    ``run.missed`` with the count, then its ``run.finished``, to the
    policy's webhook; another policy's webhook hears nothing."""
    c = cluster
    rx, other_rx = Receiver(), Receiver()
    receivers += [rx, other_rx]
    body = {
        "selector": {"vms": ["ghost"]},  # matches no VM: no job, only the run
        "repository_id": "default",
        "schedule": "* * * * *",
        "retention": {"keep_last": 1},
        "enabled": False,
    }
    policy = c.client.post("/api/v1/policies", {"name": "minutely", **body})["policy_id"]
    other = c.client.post("/api/v1/policies", {"name": "other", **body})["policy_id"]
    events = ["run.missed", "run.finished"]
    c.client.post("/api/v1/webhooks", {"url": rx.url, "events": events, "policy_id": policy})
    c.client.post("/api/v1/webhooks", {"url": other_rx.url, "events": events, "policy_id": other})
    # As if the hub had been down for five minutes since the policy's last run.
    catalog_exec(
        c,
        "UPDATE policies SET enabled = :on, last_scheduled_at = :at WHERE id = :id",
        on=True,
        at=datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=5, seconds=30),
        id=policy,
    )
    missed, finished = rx.wait(2)
    assert missed["headers"]["x-sendense-event"] == "run.missed"
    data = missed["json"]["data"]
    assert data["policy_id"] == policy and data["policy"] == "minutely"
    assert data["missed_count"] >= 4 and data["first_missed"], data
    assert missed["json"]["event_key"] == f"run.missed:{data['run_id']}"
    assert finished["json"]["event"] == "run.finished"
    assert finished["json"]["data"]["run_id"] == data["run_id"]
    time.sleep(2)  # (a new minute may bring a scheduled run and its run.finished)
    told = [p["json"]["event"] for p in rx.posts]
    assert told.count("run.missed") == 1 and other_rx.posts == [], told


@pytest.mark.postgres
def test_two_hubs_on_one_catalog_send_an_event_once(
    pg_server, tmp_path: Path, make_vm, receivers: list[Receiver]
) -> None:  # type: ignore[no-untyped-def]
    """Both hubs poll job ends and send the outbox: one POST per event."""
    url = str(pg_server.create_database(f"hooks_{uuid.uuid4().hex[:10]}"))
    a = Cluster(tmp_path / "a", url, hub_env=FAST)
    b = Cluster(tmp_path / "b", url, hub_env=FAST)
    try:
        a.start_node()
        a.start_hub()
        # Hubs sharing a catalog share the key that encrypts its secrets.
        b.hub_dir.mkdir(parents=True)
        shutil.copy2(a.hub_dir / "secret.key", b.hub_dir / "secret.key")
        b.start_hub()
        rx = Receiver()
        receivers.append(rx)
        hook = a.client.post(
            "/api/v1/webhooks",
            {"url": rx.url, "events": ["job.completed", "job.failed"], "secret": SECRET},
        )["webhook_id"]
        vm = make_vm("twin1", [8 * MiB])
        a.register(vm)
        jobs = [a.backup("twin1", "full"), a.backup("twin1", "incremental")]
        posts = rx.wait(2)
        time.sleep(2)  # both hubs made several passes since
        assert len(rx.posts) == 2, [p["json"]["event_key"] for p in rx.posts]
        assert sorted(p["json"]["data"]["job_id"] for p in posts) == sorted(
            j["job_id"] for j in jobs
        )
        for p in posts:
            assert_signed(p, SECRET)
        listed = wait_delivery(b, hook, "delivered")
        assert len(listed) == 2 and all(d["attempts"] == 1 for d in listed), listed
    finally:
        b.stop()
        a.stop()
