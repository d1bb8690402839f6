"""The console's policies pages and the dashboard's RPO misses, over HTTP
against a real hub and node (the in-hub scheduler off: runs happen only when
the test asks)."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from fixtures.cluster import Cluster
from fixtures.lifecycle import catalog_exec, cluster_env, lifecycle_cluster


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


@pytest.fixture(autouse=True)
def templates_complete(cluster: Cluster) -> Iterator[None]:
    """A page rendered with a value missing (shown empty, logged by the hub)
    fails the test that showed it."""
    yield
    missing = [line for line in cluster.log("hub").splitlines() if "Template variable" in line]
    assert not missing, missing[:5]


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)


def sign_in(c: Cluster, token: str) -> httpx.Client:
    client = httpx.Client(base_url=c.hub_url, timeout=60)
    form = client.get("/ui/signin")
    r = client.post("/ui/signin", data={"csrf": csrf_of(form.text), "token": token})
    assert r.status_code == 303, r.text
    return client


def policy_form(csrf: str, **changes: str) -> dict[str, str]:
    form = {
        "csrf": csrf,
        "name": "nightly",
        "enabled": "on",
        "vms": "web1",
        "tags": "",
        "repository_id": "default",
        "schedule": "0 2 * * *",
        "timezone": "Europe/Berlin",
        "full_every": "",
        "keep_last": "3",
        "keep_daily": "7",
        "window_start": "",
        "window_end": "",
    }
    form.update(changes)
    return form


@pytest.mark.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)
@cluster_env(hub={"SENDENSE_SCHEDULER": "false"})
def test_policy_editor_preview_pages_and_rpo(cluster: Cluster, make_vm: Any) -> None:
    c = cluster
    c.register(make_vm("web1", [8 << 20]))
    admin = sign_in(c, c.admin_token)

    # The next runs as the cron expression is typed (the editor's fragment).
    r = admin.get("/ui/policies/preview", params={"schedule": "0 2 * * *", "timezone": "UTC"})
    assert r.status_code == 200
    assert "At 02:00" in r.text and r.text.count("<li>") == 5
    runs = re.findall(r"<li>(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", r.text)
    assert len(runs) == 5 and all(t.endswith("02:00:00") for t in runs)
    bad = admin.get("/ui/policies/preview", params={"schedule": "0 2 * *", "timezone": "UTC"})
    assert "has 4 field(s)" in bad.text
    zone = admin.get("/ui/policies/preview", params={"schedule": "0 2 * * *", "timezone": "Mars"})
    assert "notice bad" in zone.text

    # Create through the editor: a refusal keeps what was typed and says why.
    editor = admin.get("/ui/policies/new")
    assert editor.status_code == 200 and 'id="schedule"' in editor.text
    csrf = csrf_of(editor.text)
    refused = admin.post("/ui/policies", data=policy_form(csrf, schedule="0 25 * * *"))
    assert refused.status_code == 400 and 'id="policy-error"' in refused.text
    assert 'value="nightly"' in refused.text
    r = admin.post("/ui/policies", data=policy_form(csrf), follow_redirects=False)
    assert r.status_code == 303, r.text
    policy_id = r.headers["location"].split("/ui/policies/", 1)[1].split("?")[0]
    page = admin.get(f"/ui/policies/{policy_id}")
    assert page.status_code == 200
    assert "/ui/vms/web1" in page.text and "Run now" in page.text and "Edit" in page.text
    listed = admin.get("/ui/vms").text  # the VM list names the policies of each VM
    assert f'<a href="/ui/policies/{policy_id}">nightly</a>' in listed
    assert f'<a href="/ui/policies/{policy_id}">nightly</a>' in admin.get("/ui/vms/web1").text
    api = c.http("GET", f"/api/v1/policies/{policy_id}").json()
    assert api["timezone"] == "Europe/Berlin" and api["retention"]["keep_daily"] == 7
    assert api["retention"]["keep_last"] == 3 and api["selector"]["vms"] == ["web1"]

    # Edit: disable it.
    form = policy_form(csrf_of(admin.get(f"/ui/policies/{policy_id}/edit").text))
    del form["enabled"]
    r = admin.post(f"/ui/policies/{policy_id}", data=form, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert c.http("GET", f"/api/v1/policies/{policy_id}").json()["enabled"] is False
    r = admin.post(f"/ui/policies/{policy_id}", data=policy_form(csrf), follow_redirects=False)
    assert r.status_code == 303

    # A viewer reads the policy and its retention preview, with no button.
    viewer_token = c.http("POST", "/api/v1/tokens", json={"name": "v", "role": "viewer"})
    viewer = sign_in(c, viewer_token.json()["token"])
    seen = viewer.get(f"/ui/policies/{policy_id}").text
    assert "Run now" not in seen and "/edit" not in seen and "Retention preview" in seen
    plan = viewer.get(f"/ui/policies/{policy_id}/retention")
    assert plan.status_code == 200 and "dry run, nothing changed" in plan.text
    assert "apply-retention" not in plan.text

    # RPO: the policy existed before its last 02:00 run and web1 has no backup.
    created = datetime.now(UTC) - timedelta(days=3)
    catalog_exec(c, "UPDATE policies SET created_at = :t WHERE id = :id", t=created, id=policy_id)
    dash = admin.get("/ui/").text
    assert 'id="rpo-misses"' in dash and "/ui/vms/web1" in dash.split('id="rpo-misses"')[1]
    c.backup("web1", "full")
    dash = admin.get("/ui/").text
    assert 'id="rpo-misses"' not in dash and "recent enough backup" in dash

    # Run now (operator and up) starts a backup of each matched VM.
    r = admin.post(
        f"/ui/policies/{policy_id}/run",
        data={"csrf": csrf_of(admin.get(f"/ui/policies/{policy_id}").text)},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    jobs = c.http("GET", "/api/v1/jobs", params={"kind": "backup"}).json()["jobs"]
    assert len(jobs) == 2
    for j in jobs:
        assert c.wait_job(j["job_id"])["status"] == "completed"

    # The dashboard's counts and the charts' figures (per-day SQL on both catalogs).
    dash = admin.get("/ui/").text
    assert "2 ok" in dash and "0 failed" in dash, dash
    vm_page = admin.get("/ui/vms/web1")
    assert vm_page.status_code == 200
    chart = re.search(r'class="chart" data-chart="([^"]+)"', vm_page.text)
    assert chart is not None
    data = json.loads(html.unescape(chart.group(1)))
    taken = data["series"][0]["values"]
    assert data["days"][-1] == datetime.now(UTC).date().isoformat() and taken[-1] > 0, data
    repos = admin.get("/ui/repositories")
    assert repos.status_code == 200 and "Bytes held by today" in repos.text
