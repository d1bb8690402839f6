"""GET /api/v1/vms in pages (issue 12: catalogs of thousands of VMs).

- ``limit``/``offset`` take a page by name, ``total`` counts every VM the
  caller may see, ``name`` filters by substring whatever the case; without
  ``limit`` the answer is every VM, as before; bad values are 400s naming the
  parameter. The CLI (`sendense vm ls`) pages.
- A scoped token's pages and total hold only its VMs, and follow its tags.
- The answers are cached with the catalog topic ``vms`` (catalog/topics.py):
  a tag change, a completed backup, its deletion, and a write by another
  process straight into the catalog are all seen at the next request; job
  and lease writes do not move the topic's version.
- Two hubs on one PostgreSQL catalog: a change through one is seen through
  the other at once.
- The console's VM list pages and searches names and tags.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text, update

from fixtures.cluster import Cluster, cli
from sendense.catalog.db import Database, sqlite_url
from sendense.catalog.models import Vm
from sendense.qemu import img

NAMES = [f"App-{i:02d}" for i in range(1, 8)] + [f"db-{i:02d}" for i in range(1, 6)]


def error_body(r: Any, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body: dict[str, Any] = r.json()
    assert set(body) == {"error", "message", "details"} and body["error"] == code, body
    return body


def file_vms(c: Cluster, tmp_path: Path, names: list[str]) -> None:
    """``names`` as VMs of a file source (one 1 MiB qcow2 image each)."""
    node = c.client.post("/api/v1/nodes", c.node_body("node1"))
    config = []
    for name in names:
        image = tmp_path / "images" / f"{name}.qcow2"
        image.parent.mkdir(exist_ok=True)
        img.create(str(image), 1 << 20, fmt="qcow2")
        config.append({"name": name, "paths": [str(image)]})
    src = c.client.post(
        "/api/v1/sources",
        {"name": "files", "node_id": node["node_id"], "type": "file", "config": {"vms": config}},
    )
    c.client.post("/api/v1/vms/discover", {"source_id": src["source_id"]})


def get(c: Cluster, token: str = "admin", **params: Any) -> dict[str, Any]:
    r = c.http("GET", "/api/v1/vms", token=token, params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def names(answer: dict[str, Any]) -> list[str]:
    return [v["name"] for v in answer["vms"]]


def catalog(c: Cluster) -> Database:
    return Database(c.database_url or sqlite_url(c.hub_dir / "catalog.db"))


def version(db: Database) -> int:
    with db.engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT version FROM catalog_topics WHERE topic = 'vms'")
            ).scalar_one()
        )


@pytest.mark.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)
def test_pages_totals_filter_and_bad_values(cluster: Cluster, tmp_path: Path) -> None:
    file_vms(cluster, tmp_path, NAMES)
    everything = get(cluster)
    assert names(everything) == sorted(NAMES) and everything["total"] == 12
    assert all(len(v["disks"]) == 1 and v["last_backup"] is None for v in everything["vms"])

    pages = [get(cluster, limit=5, offset=offset) for offset in (0, 5, 10)]
    assert [len(p["vms"]) for p in pages] == [5, 5, 2]
    assert {p["total"] for p in pages} == {12}
    assert [v for p in pages for v in p["vms"]] == everything["vms"]
    assert get(cluster, limit=5, offset=12) == {"vms": [], "total": 12}
    assert get(cluster, limit=1000, offset=100) == {"vms": [], "total": 12}
    assert names(get(cluster, offset=10)) == sorted(NAMES)[10:]  # no limit: the rest

    assert names(get(cluster, name="app")) == NAMES[:7]
    page = get(cluster, name="APP-0", limit=3, offset=6)
    assert names(page) == ["App-07"] and page["total"] == 7
    assert get(cluster, name="db-03") == {"vms": [get(cluster, name="b-03")["vms"][0]], "total": 1}
    # "%" and "_" are characters like any other, not patterns.
    assert get(cluster, name="%") == {"vms": [], "total": 0}
    assert get(cluster, name="app_01") == {"vms": [], "total": 0}

    for params, field in [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": -1}, "offset"),
        ({"offset": "x"}, "offset"),
        ({"name": "x" * 201}, "name"),
    ]:
        r = cluster.http("GET", "/api/v1/vms", params=params)
        body = error_body(r, 400, "invalid_request")
        assert field in body["message"], (params, body)

    listed = cli(cluster, "--json", "vm", "ls", "--limit", "4", "--offset", "4")
    assert names(json.loads(listed.stdout)) == sorted(NAMES)[4:8]
    table = cli(cluster, "vm", "ls", "--limit", "4", "--name", "db").stdout
    assert "db-04" in table and "db-05" not in table and "App-01" not in table
    assert "VMs 1-4 of 5: --offset 4 for the next page" in table
    cli(cluster, "vm", "ls", "--limit", "0", ok=False)


@pytest.mark.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)
def test_a_scoped_token_pages_only_its_vms(cluster: Cluster, tmp_path: Path) -> None:
    file_vms(cluster, tmp_path, NAMES)
    made = cluster.client.post(
        "/api/v1/tokens",
        {
            "name": "tenant",
            "role": "viewer",
            "scope": {"vms": ["db-02", "tag:tenant=t1"], "repositories": ["default"]},
        },
    )
    token = made["token"]
    assert get(cluster, token) == {"vms": [get(cluster, name="db-02")["vms"][0]], "total": 1}
    for vm in ("App-03", "db-05"):
        cluster.client.request("PATCH", f"/api/v1/vms/{vm}", json={"tags": {"tenant": "t1"}})
    mine = get(cluster, token)
    assert names(mine) == ["App-03", "db-02", "db-05"] and mine["total"] == 3
    page = get(cluster, token, limit=2, offset=1)
    assert names(page) == ["db-02", "db-05"] and page["total"] == 3
    assert get(cluster, token, name="app", limit=10) == {"vms": [mine["vms"][0]], "total": 1}
    assert get(cluster, token, limit=2, offset=3) == {"vms": [], "total": 3}
    assert get(cluster)["total"] == 12  # the admin still sees all

    cluster.client.request("PATCH", "/api/v1/vms/App-03", json={"tags": {}})
    after = get(cluster, token, limit=2)
    assert names(after) == ["db-02", "db-05"] and after["total"] == 2


@pytest.mark.parametrize("cluster", ["sqlite", "postgresql"], indirect=True)
def test_cached_answers_follow_what_they_show(cluster: Cluster, tmp_path: Path) -> None:
    file_vms(cluster, tmp_path, NAMES[:3])
    db = catalog(cluster)
    try:
        before = get(cluster)
        assert get(cluster, limit=2)["vms"] == before["vms"][:2]  # now cached, both

        job = cluster.backup("App-02", "full")
        last = get(cluster, limit=2)["vms"][1]["last_backup"]
        assert last is not None and last["status"] == "completed", last
        assert last["backup_id"] == job["backups"][0]
        assert get(cluster)["vms"][1]["last_backup"] == last

        # Writes that GET /vms does not show leave the topic's version alone.
        v = version(db)
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE backup_jobs SET lease_until = CURRENT_TIMESTAMP"))
            conn.execute(
                text("UPDATE backups SET bytes_transferred = 1 WHERE status <> 'completed'")
            )
        assert version(db) == v

        # Another process writes into the catalog: the next answer has it.
        with db.engine.begin() as conn:
            conn.execute(
                text("UPDATE backups SET verify_status = 'ok' WHERE id = :id"),
                {"id": last["backup_id"]},
            )
            conn.execute(update(Vm).where(Vm.name == "App-01").values(tags={"moved": "by-sql"}))
        assert version(db) > v
        now = get(cluster)
        assert now["vms"][0]["tags"] == {"moved": "by-sql"}
        assert now["vms"][1]["last_backup"]["verify_status"] == "ok"
        assert get(cluster, limit=2)["vms"] == now["vms"][:2]

        # Renamed: the whole list (rebuilt from the VMs that changed) keeps
        # the order of the pages.
        with db.engine.begin() as conn:
            conn.execute(update(Vm).where(Vm.name == "App-01").values(name="zz-renamed"))
        assert names(get(cluster)) == ["App-02", "App-03", "zz-renamed"]
        assert names(get(cluster, limit=1, offset=2)) == ["zz-renamed"]
        assert get(cluster)["vms"][2]["tags"] == {"moved": "by-sql"}

        r = cluster.http("DELETE", f"/api/v1/backups/{last['backup_id']}")
        assert r.status_code == 200, r.text
        assert get(cluster)["vms"][0]["last_backup"] is None
        assert get(cluster, limit=2)["vms"][0]["last_backup"] is None
    finally:
        db.dispose()


@pytest.fixture
def two_hubs(pg_server: Any, tmp_path: Path) -> Iterator[tuple[Cluster, Cluster]]:
    url = str(pg_server.create_database(f"vms_{uuid.uuid4().hex[:10]}"))
    a = Cluster(tmp_path / "a", url)
    b = Cluster(tmp_path / "b", url)
    b.nbd_first, b.nbd_last = a.nbd_first, a.nbd_last
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a.start_node()
    a.start_hub()
    b.hub_dir.mkdir(parents=True)
    for name in ("secret.key", "admin.token"):
        shutil.copy2(a.hub_dir / name, b.hub_dir / name)
    b.start_hub()
    try:
        yield a, b
    finally:
        b.stop()
        a.stop()


def test_two_hubs_see_each_others_changes(
    two_hubs: tuple[Cluster, Cluster], tmp_path: Path
) -> None:
    a, b = two_hubs
    file_vms(a, tmp_path, NAMES[:4])
    for _ in range(2):  # cached on every API worker of B
        assert names(get(b)) == sorted(NAMES[:4]) and get(b, limit=2)["total"] == 4
    a.client.request("PATCH", "/api/v1/vms/App-04", json={"tags": {"tier": "gold"}})
    for _ in range(4):
        assert get(b)["vms"][3]["tags"] == {"tier": "gold"}
        assert get(b, limit=2, offset=2)["vms"][1]["tags"] == {"tier": "gold"}


def test_console_vm_list_filters_by_name_and_tag(cluster: Cluster, tmp_path: Path) -> None:
    """The console's VM list reads one page (hub/vms/service.list_vms); its
    search matches names and ``key=value`` tags."""
    file_vms(cluster, tmp_path, NAMES)
    cluster.client.request("PATCH", "/api/v1/vms/db-04", json={"tags": {"tier": "gold"}})
    ui = httpx.Client(base_url=cluster.hub_url, timeout=60, follow_redirects=False)
    form = ui.get("/ui/signin").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', form)
    assert csrf, form
    r = ui.post(
        "/ui/signin", data={"csrf": csrf.group(1), "token": cluster.admin_token, "next": "/ui/"}
    )
    assert r.status_code == 303, r.text

    def listed(**params: Any) -> list[str]:
        r = ui.get("/ui/vms", params=params)
        assert r.status_code == 200, r.text
        return re.findall(r'<a href="/ui/vms/([^"]+)">', r.text)

    assert listed() == sorted(NAMES)
    assert listed(q="APP-0") == NAMES[:7]
    assert listed(q="tier=gold") == ["db-04"]
    assert listed(q="nothing") == []
    assert listed(offset=10) == sorted(NAMES)[10:]
