"""GET /metrics end to end, read with Prometheus' own parser and compared
with what the test did and what the API says."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fixtures.cluster import Cluster
from fixtures.lifecycle import (
    MiB,
    catalog_exec,
    cluster_env,
    error_body,
    lifecycle_cluster,
    write_random,
)

BOTH = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
SCRAPER_TOKEN = "scrape-" + "x" * 30


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


def scrape(c: Cluster, token: str | None = "admin") -> dict[str, list[Sample]]:
    r = c.http("GET", "/metrics", token=token)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(r.text):
        assert family.type == "gauge", family
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], metric: str, /, **labels: str) -> float:
    found = [s.value for s in samples.get(metric, []) if labels.items() <= s.labels.items()]
    assert len(found) == 1, (metric, labels, samples.get(metric))
    return found[0]


@cluster_env(hub={"SENDENSE_METRICS_TOKEN": SCRAPER_TOKEN, "SENDENSE_SCHEDULER": "false"})
@pytest.mark.parametrize("cluster", BOTH, indirect=True)
def test_metrics_say_what_happened(cluster: Cluster, make_vm) -> None:
    c = cluster
    error_body(c.http("GET", "/metrics", token=None), 401, "unauthorized")
    error_body(c.http("GET", "/metrics", token="sdt_wrong"), 401, "unauthorized")
    # The scrapers' token reads metrics and nothing else.
    error_body(c.http("GET", "/api/v1/vms", token=SCRAPER_TOKEN), 401, "unauthorized")

    a, b = make_vm("met1", [8 * MiB]), make_vm("met2", [8 * MiB])
    write_random(a, 0, 0, 2 * MiB)
    write_random(b, 0, 0, MiB)
    reg = c.register(a, b)
    vm_ids = {v["name"]: v["vm_id"] for v in reg["vms"]}
    t0 = time.time()
    jobs = [c.backup("met1", "full"), c.backup("met2", "full")]
    write_random(a, 0, 4 * MiB, MiB)
    jobs.append(c.backup("met1", "incremental"))
    t1 = time.time()

    viewer = c.client.post("/api/v1/tokens", {"name": "mv", "role": "viewer"})["token"]
    for token in (SCRAPER_TOKEN, viewer):
        m = scrape(c, token)
        assert value(m, "sendense_jobs", kind="backup", status="completed") == 3
        assert not [s for s in m["sendense_jobs"] if s.labels["status"] == "failed"]
        points = [c.client.get(f"/api/v1/backups/{b}") for j in jobs for b in j["backups"]]
        moved = sum(p["bytes_transferred"] for p in points)
        assert moved > 0
        assert value(m, "sendense_backup_transferred_bytes", repository_id="default") == moved
        for name in ("met1", "met2"):
            last = value(
                m, "sendense_vm_last_success_timestamp_seconds", vm_id=vm_ids[name], vm=name
            )
            assert t0 - 1 <= last <= t1 + 1, (name, t0, last, t1)
        (repo,) = [
            r
            for r in c.client.get("/api/v1/repositories")["repositories"]
            if r["name"] == "default"
        ]
        labels = {"repository_id": repo["repository_id"], "name": "default"}
        assert value(m, "sendense_repository_total_bytes", **labels) == repo["total_bytes"]
        # Other tests write on the same filesystem meanwhile: close, not equal.
        for key in ("used", "available"):
            got = value(m, f"sendense_repository_{key}_bytes", **labels)
            assert abs(got - repo[f"{key}_bytes"]) < 512 * MiB, (key, got, repo)
        assert value(m, "sendense_repository_backup_bytes", **labels) == repo["backup_bytes"]
        assert value(m, "sendense_repository_online", **labels) == 1
        assert value(m, "sendense_scheduler_lag_seconds") == 0
        assert value(m, "sendense_scheduler_overdue_seconds") == 0
        assert value(m, "sendense_scheduler_queued_vms") == 0
        assert value(m, "sendense_policy_runs_missed") == 0
        assert value(m, "sendense_build_info") == 1

    # A policy due ten minutes ago and no scheduler (it is off here): overdue.
    policy = c.client.post(
        "/api/v1/policies",
        {
            "name": "late",
            "selector": {"vms": ["ghost"]},
            "repository_id": "default",
            "schedule": "* * * * *",
            "retention": {"keep_last": 1},
        },
    )["policy_id"]
    catalog_exec(
        c,
        "UPDATE policies SET last_scheduled_at = :at WHERE id = :id",
        at=datetime.now(UTC).replace(tzinfo=None) - timedelta(minutes=10),
        id=policy,
    )
    overdue = value(scrape(c), "sendense_scheduler_overdue_seconds")
    assert 9 * 60 - 5 < overdue <= 10 * 60 + 5, overdue

    r = c.http("GET", "/metrics", token=viewer)
    for secret in (c.admin_token, viewer, SCRAPER_TOKEN, c.node_token):
        assert secret not in r.text

    # A failed job is counted as such.
    c.kill("node")
    c.http("POST", "/api/v1/backups", json={"vm_name": "met2", "repository_id": "default"})
    m = scrape(c)
    assert value(m, "sendense_jobs", kind="backup", status="failed") == 1

    # A tenant: its VM only, no hub-wide figures; and, a scoped token being
    # live, no VM names for anyone (metrics_vm_names=auto).
    tenant = c.client.post(
        "/api/v1/tokens",
        {"name": "t", "role": "viewer", "scope": {"vms": ["met2"], "repositories": ["default"]}},
    )["token"]
    m = scrape(c, tenant)
    assert value(m, "sendense_jobs", kind="backup", status="completed") == 1
    assert value(m, "sendense_jobs", kind="backup", status="failed") == 1
    (last,) = m["sendense_vm_last_success_timestamp_seconds"]
    assert last.labels == {"vm_id": vm_ids["met2"]}
    assert "sendense_scheduler_lag_seconds" not in m
    assert "sendense_webhook_deliveries" not in m
    r = c.http("GET", "/metrics", token=tenant)
    assert "met1" not in r.text and vm_ids["met1"] not in r.text
    m = scrape(c)
    assert all("vm" not in s.labels for s in m["sendense_vm_last_success_timestamp_seconds"])
    assert len(m["sendense_vm_last_success_timestamp_seconds"]) == 2
