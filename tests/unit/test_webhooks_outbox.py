"""The webhook outbox on SQLite and PostgreSQL: an event recorded once per
webhook whichever hub records it, claims, backoff, giving up, job ends."""

from __future__ import annotations

import hashlib
import hmac
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from sendense.catalog.db import Database
from sendense.catalog.models import BackupJob, Policy, Repository, Webhook, WebhookDelivery
from sendense.notify import outbox
from sendense.notify.outbox import Backoff, claim_due, record_event, settle
from sendense.notify.sender import JobPoller, sign, url_for_log

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def add_hook(
    db: Database,
    events: list[str],
    *,
    policy_id: str | None = None,
    enabled: bool = True,
    created_at: datetime = T0 - timedelta(days=1),
) -> str:
    with db.session() as s:
        hook = Webhook(
            url="http://127.0.0.1:9/hook",
            events=events,
            policy_id=policy_id,
            enabled=enabled,
            created_at=created_at,
        )
        s.add(hook)
        s.flush()
        return hook.id


def add_policy(db: Database, name: str = "p1") -> str:
    with db.session() as s:
        repo = Repository(name=f"r-{name}", path=f"/srv/{name}")
        s.add(repo)
        s.flush()
        policy = Policy(name=name, repository_id=repo.id, schedule="0 3 * * *")
        s.add(policy)
        s.flush()
        return policy.id


def deliveries(db: Database) -> list[WebhookDelivery]:
    with db.session() as s:
        return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)))


def test_backoff_doubles_up_to_its_cap_and_gives_up() -> None:
    b = Backoff(base=5, cap=3600, max_attempts=12)
    assert [b.delay(n).total_seconds() for n in range(1, 13)] == [
        5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600,
    ]  # fmt: skip
    assert b.delay(10_000).total_seconds() == 3600
    assert not b.gives_up(11) and b.gives_up(12)


def test_an_event_is_recorded_once_per_matching_webhook(database: Database) -> None:
    policy = add_policy(database)
    other = add_policy(database, "p2")
    everything = add_hook(database, ["run.missed", "job.failed"])
    mine = add_hook(database, ["run.missed"], policy_id=policy)
    add_hook(database, ["run.missed"], policy_id=other)  # another policy's
    add_hook(database, ["job.completed"])  # another event
    add_hook(database, ["run.missed"], enabled=False)
    payload = {"policy_id": policy, "run_id": "run-1", "missed_count": 3}

    # Two hubs record the same event, one after the other and in one session twice.
    for _ in range(2):
        with database.session() as s:
            first = record_event(s, "run.missed", payload, policy_id=policy, now=T0)
            again = record_event(s, "run.missed", payload, policy_id=policy, now=T0)
        assert again == 0
    assert first == 0  # the second pass found both recorded
    rows = deliveries(database)
    assert sorted(r.webhook_id for r in rows) == sorted([everything, mine])
    assert {r.event_key for r in rows} == {"run.missed:run-1"}
    assert rows[0].payload["data"] == payload and rows[0].payload["event"] == "run.missed"
    assert all(r.status == "pending" and r.attempts == 0 for r in rows)


def test_two_hubs_recording_at_once_record_once(database: Database) -> None:
    """Both transactions open at the same time: on PostgreSQL the second insert
    waits for the first commit, then does nothing; on SQLite the write lock
    serializes them. Neither raises."""
    add_hook(database, ["job.failed"])
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def hub() -> None:
        try:
            with database.session() as s:
                s.execute(select(Webhook.id)).all()
                barrier.wait(timeout=10)
                record_event(s, "job.failed", {"job_id": "j1"}, now=T0)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=hub) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert [r.event_key for r in deliveries(database)] == ["job.failed:j1"]


def test_claims_backoff_and_giving_up(database: Database) -> None:
    add_hook(database, ["job.failed"])
    with database.session() as s:
        record_event(s, "job.failed", {"job_id": "j1"}, now=T0)
    backoff = Backoff(base=5, cap=60, max_attempts=3)
    lease = timedelta(seconds=40)

    with database.session() as s:
        (due,) = claim_due(s, lease=lease, limit=10, now=T0)
    assert due.attempts == 1 and due.event == "job.failed"
    with database.session() as s:  # another hub during the lease: nothing
        assert claim_due(s, lease=lease, limit=10, now=T0 + timedelta(seconds=1)) == []
    with database.session() as s:
        assert settle(s, due, "HTTP 500", backoff, now=T0 + timedelta(seconds=2)) == "pending"
    (row,) = deliveries(database)
    assert row.next_attempt_at == T0 + timedelta(seconds=7) and row.last_error == "HTTP 500"

    with database.session() as s:
        assert claim_due(s, lease=lease, limit=10, now=T0 + timedelta(seconds=6)) == []
        (due,) = claim_due(s, lease=lease, limit=10, now=T0 + timedelta(seconds=7))
    assert due.attempts == 2
    with database.session() as s:
        settle(s, due, "timed out", backoff, now=T0 + timedelta(seconds=8))
    (row,) = deliveries(database)
    assert row.next_attempt_at == T0 + timedelta(seconds=18)  # 8 s + 5 * 2

    # A hub died mid-POST: once its lease is over another claims it.
    with database.session() as s:
        (lost,) = claim_due(s, lease=lease, limit=10, now=T0 + timedelta(seconds=18))
    with database.session() as s:
        (due,) = claim_due(s, lease=lease, limit=10, now=T0 + timedelta(seconds=59))
    assert lost.attempts == 3 and due.attempts == 4
    with database.session() as s:
        assert settle(s, due, "refused", backoff, now=T0 + timedelta(seconds=60)) == "failed"
        # The dead hub's late outcome changes nothing any more.
        assert settle(s, lost, None, backoff, now=T0 + timedelta(seconds=61)) == "delivered"
    (row,) = deliveries(database)
    assert row.status == "failed" and row.attempts == 4 and row.delivered_at is None
    with database.session() as s:
        assert claim_due(s, lease=lease, limit=10, now=T0 + timedelta(days=1)) == []
        assert outbox.counts_by_status(s) == {"failed": 1}


def test_a_delivered_event_is_never_claimed_again(database: Database) -> None:
    add_hook(database, ["job.failed"])
    with database.session() as s:
        record_event(s, "job.failed", {"job_id": "j1"}, now=T0)
    with database.session() as s:
        (due,) = claim_due(s, lease=timedelta(seconds=40), limit=10, now=T0)
        settle(s, due, None, Backoff(), now=T0)
    with database.session() as s:
        assert claim_due(s, lease=timedelta(seconds=40), limit=10, now=T0 + timedelta(days=1)) == []
    (row,) = deliveries(database)
    assert row.status == "delivered" and row.delivered_at == T0


def add_job(db: Database, status: str, finished_at: datetime, **tags: str) -> str:
    with db.session() as s:
        job = BackupJob(
            kind="verify",
            status=status,
            requested_type="verify",
            created_at=finished_at - timedelta(minutes=1),
            finished_at=finished_at,
            error_code="boom" if status == "failed" else None,
            error_message="it broke" if status == "failed" else None,
            tags=tags,
        )
        s.add(job)
        s.flush()
        return job.id


def test_job_ends_are_recorded_once_and_only_for_older_webhooks(database: Database) -> None:
    policy = add_policy(database)
    glob = add_hook(database, ["job.failed", "job.completed"])
    scoped = add_hook(database, ["job.failed"], policy_id=policy)
    late = add_hook(database, ["job.failed"], created_at=T0 + timedelta(minutes=30))
    ok = add_job(database, "completed", T0 + timedelta(minutes=1))
    bad = add_job(database, "failed", T0 + timedelta(minutes=2), policy=policy, policy_id=policy)
    add_job(database, "cancelled", T0 + timedelta(minutes=3))
    add_job(database, "running", T0 + timedelta(minutes=3))

    poller = JobPoller(database, now=T0)
    assert poller.poll(now=T0 + timedelta(minutes=5)) == 3
    assert poller.poll(now=T0 + timedelta(minutes=5)) == 0
    # Another hub's poller from scratch records nothing new either.
    assert JobPoller(database, now=T0).poll(now=T0 + timedelta(minutes=6)) == 0
    rows = deliveries(database)
    got = sorted((r.webhook_id, r.event_key) for r in rows)
    assert got == sorted(
        [
            (glob, f"job.completed:{ok}"),
            (glob, f"job.failed:{bad}"),
            (scoped, f"job.failed:{bad}"),
        ]
    ), got
    assert late not in {r.webhook_id for r in rows}
    failed = next(r for r in rows if r.event_key == f"job.failed:{bad}")
    data = failed.payload["data"]
    assert data["status"] == "failed" and data["kind"] == "verify"
    assert data["error"] == {"code": "boom", "message": "it broke"}
    assert data["policy_id"] == policy and data["policy"] == policy
    assert failed.payload["occurred_at"] == (T0 + timedelta(minutes=2)).isoformat()


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"event":"job.failed"}'
    expected = hmac.new(b"k" * 16, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k" * 16, "1700000000", body) == f"sha256={expected}"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.slack.com/services/T0/B0/SECRET", "https://hooks.slack.com"),
        ("http://user:pw@10.0.0.1:8080/x?token=t", "http://10.0.0.1:8080"),
    ],
)
def test_logs_name_a_url_by_scheme_and_host(url: str, shown: str) -> None:
    assert url_for_log(url) == shown


def test_prune_drops_ended_deliveries_past_the_retention_only(database: Database) -> None:
    add_hook(database, ["job.failed"])
    backoff = Backoff(base=5, cap=60, max_attempts=1)
    with database.session() as s:
        for job in ("delivered", "failed", "pending", "recent"):
            record_event(s, "job.failed", {"job_id": job}, now=T0)
    with database.session() as s:
        due = {
            d.payload["data"]["job_id"]: d
            for d in claim_due(s, lease=timedelta(1), limit=9, now=T0)
        }
        settle(s, due["delivered"], None, backoff, now=T0)
        settle(s, due["failed"], "HTTP 500", backoff, now=T0)
        settle(s, due["recent"], None, backoff, now=T0 + timedelta(days=40))
    with database.session() as s:
        assert outbox.prune(s, T0 + timedelta(days=30)) == 2
    left = {r.payload["data"]["job_id"]: r.status for r in deliveries(database)}
    assert left == {"pending": "pending", "recent": "delivered"}


def test_a_disabled_webhooks_deliveries_wait(database: Database) -> None:
    hook = add_hook(database, ["job.failed"])
    with database.session() as s:
        record_event(s, "job.failed", {"job_id": "j1"}, now=T0)
        s.get_one(Webhook, hook).enabled = False
    with database.session() as s:
        assert claim_due(s, lease=timedelta(seconds=40), limit=10, now=T0) == []
        s.get_one(Webhook, hook).enabled = True
    with database.session() as s:
        assert len(claim_due(s, lease=timedelta(seconds=40), limit=10, now=T0)) == 1


def test_the_poller_sees_long_jobs_end_and_short_ones_between_passes(database: Database) -> None:
    """A job created hours ago that ends now (it was active at the last
    pass), and one created and ended between two passes, both told; the
    hour-old job that ended before the first pass's look-back is not."""
    glob = add_hook(database, ["job.failed", "job.completed"], created_at=T0 - timedelta(days=9))
    old = add_job(database, "completed", T0 - timedelta(hours=2))
    long = add_job(database, "running", T0 - timedelta(hours=5))
    with database.session() as s:
        s.get_one(BackupJob, long).finished_at = None
    poller = JobPoller(database, now=T0)
    assert poller.poll(now=T0) == 0
    assert poller.watch == {long}
    with database.session() as s:
        job = s.get_one(BackupJob, long)
        job.status, job.finished_at = "failed", T0 + timedelta(minutes=10)
    short = add_job(database, "completed", T0 + timedelta(minutes=11))
    assert poller.poll(now=T0 + timedelta(minutes=12)) == 2
    assert poller.poll(now=T0 + timedelta(minutes=13)) == 0
    got = {r.event_key for r in deliveries(database) if r.webhook_id == glob}
    assert got == {f"job.failed:{long}", f"job.completed:{short}"}
    assert old not in str(got)
