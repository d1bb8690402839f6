"""The web console (/ui/) over plain HTTP: sign-in, cookies, CSRF, security
headers, roles, scopes and escaping, against a real hub process.

The browser suite (tests/browser/) drives the same pages in Chromium; these
tests check what a browser hides: headers, cookie attributes, status codes,
the raw HTML.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from fixtures.cluster import Cluster

XSS = "<script>alert(1)</script>"
HEADERS = {
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}


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


def console(c: Cluster) -> httpx.Client:
    return httpx.Client(base_url=c.hub_url, timeout=60, follow_redirects=False)


def sign_in(c: Cluster, token: str) -> httpx.Client:
    client = console(c)
    form = client.get("/ui/signin")
    r = client.post("/ui/signin", data={"csrf": csrf_of(form.text), "token": token, "next": "/ui/"})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/ui/"
    return client


def assert_secure_headers(r: httpx.Response) -> None:
    for name, value in HEADERS.items():
        assert r.headers.get(name) == value, (r.url, name, r.headers.get(name))
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp


def assert_no_inline_code(html: str) -> None:
    """What the CSP would block anyway, and must not be needed: inline
    scripts, event handler attributes, inline styles."""
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in tag, tag
    assert not re.search(r"<[^>]+\son[a-z]+\s*=", html), "event handler attribute in the page"
    assert not re.search(r"<[^>]+\sstyle\s*=", html), "inline style in the page"


def make_token(c: Cluster, name: str, role: str, scope: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"name": name, "role": role}
    if scope is not None:
        body["scope"] = scope
    r = c.http("POST", "/api/v1/tokens", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def audit(c: Cluster, route: str) -> list[dict[str, Any]]:
    r = c.http("GET", "/api/v1/audit", params={"route": route})
    assert r.status_code == 200, r.text
    entries: list[dict[str, Any]] = r.json()["entries"]
    return entries


def test_sign_in_cookie_headers_csrf_and_revocation(cluster: Cluster) -> None:
    c = cluster
    anon = console(c)
    r = anon.get("/ui/")
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/signin")
    assert_secure_headers(r)
    form = anon.get("/ui/signin")
    assert form.status_code == 200
    assert_secure_headers(form)
    assert_no_inline_code(form.text)

    # A wrong token: refused, no session cookie.
    bad = anon.post("/ui/signin", data={"csrf": csrf_of(form.text), "token": "nope"})
    assert bad.status_code == 401 and "not valid" in bad.text
    assert "sendense_session" not in bad.headers.get("set-cookie", "")
    # The sign-in form without its pre-session cookie (another site's form): 403.
    stranger = console(c)
    r = stranger.post("/ui/signin", data={"csrf": csrf_of(form.text), "token": c.admin_token})
    assert r.status_code == 403 and "Form refused" in r.text

    admin = sign_in(c, c.admin_token)
    raw = admin.cookies.jar
    session = next(k for k in raw if k.name == "sendense_session")
    assert session.path == "/ui" and not session.secure  # plain http here
    r = sign_in_raw(c, c.admin_token)
    line = next(v for v in r.headers.get_list("set-cookie") if v.startswith("sendense_session="))
    cookie = SimpleCookie(line)["sendense_session"]
    assert cookie["httponly"] and cookie["samesite"].lower() == "strict", line
    assert c.admin_token not in line  # the token never goes to the browser

    page = admin.get("/ui/")
    assert page.status_code == 200 and "Dashboard" in page.text
    assert_secure_headers(page)
    assert_no_inline_code(page.text)
    assert "cache-control" in page.headers and "no-store" in page.headers["cache-control"]
    js = admin.get("/ui/static/htmx-2.0.10.min.js")
    assert js.status_code == 200 and 'version:"2.0.10"' in js.text

    # CSRF: a form without its token, or with another session's, is refused.
    r = admin.post("/ui/signout", data={})
    assert r.status_code == 403 and "Form refused" in r.text
    assert_secure_headers(r)
    other = sign_in(c, c.admin_token)
    r = admin.post("/ui/signout", data={"csrf": csrf_of(other.get("/ui/").text)})
    assert r.status_code == 403
    refused = audit(c, "/ui/signout")
    assert any(e["status"] == 403 and e["method"] == "POST" for e in refused), refused
    signins = audit(c, "/ui/signin")  # sign-ins are audited, the refused one as 401
    assert {(e["status"], e["token_name"]) for e in signins} >= {(401, None), (303, "admin")}

    # A changed cookie is no session.
    forged = console(c)
    value = session.value
    forged.cookies.set("sendense_session", value[:-2] + ("AA" if value[-2:] != "AA" else "BB"))
    assert forged.get("/ui/").status_code == 303

    # Revoking a token ends its console sessions at once.
    token = make_token(c, "ops", "operator")
    ops = sign_in(c, token)
    assert ops.get("/ui/jobs").status_code == 200
    token_id = c.http("GET", "/api/v1/tokens").json()["tokens"][0]["token_id"]
    assert c.http("DELETE", f"/api/v1/tokens/{token_id}").status_code == 200
    r = ops.get("/ui/jobs")
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/signin")

    # The dashboard's running jobs arrive as server-sent events.
    with admin.stream("GET", "/ui/fragments/running/events") as events:
        assert events.status_code == 200
        assert events.headers["content-type"].startswith("text/event-stream")
        lines = events.iter_lines()
        first = [next(lines) for _ in range(4)]
    assert "event: progress" in first and any("Nothing running" in x for x in first), first

    # Sign-out clears the cookie and revokes the session: a copy of the
    # cookie taken before (a lost laptop's disk) no longer works either.
    copy = console(c)
    copy.cookies.set("sendense_session", admin.cookies["sendense_session"], path="/ui")
    assert copy.get("/ui/").status_code == 200
    r = admin.post("/ui/signout", data={"csrf": csrf_of(admin.get("/ui/").text)})
    assert r.status_code == 303 and r.headers["location"] == "/ui/signin"
    assert (
        'sendense_session=""' in r.headers["set-cookie"] or "Max-Age=0" in r.headers["set-cookie"]
    )
    assert admin.get("/ui/").status_code == 303
    r = copy.get("/ui/")
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/signin")
    # Without a session: a form goes to sign-in, a refreshing fragment says where.
    r = console(c).post("/ui/signout", data={"csrf": "x"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/signin"
    r = console(c).get("/ui/fragments/running", headers={"HX-Request": "true"})
    assert r.status_code == 401 and r.headers["hx-redirect"] == "/ui/signin"


def sign_in_raw(c: Cluster, token: str) -> httpx.Response:
    client = console(c)
    form = client.get("/ui/signin")
    return client.post("/ui/signin", data={"csrf": csrf_of(form.text), "token": token})


def test_roles_scopes_and_escaping(cluster: Cluster, make_vm: Any) -> None:
    """A viewer gets no buttons and a 403 page for a forced POST; a scoped
    token sees only its VM; a VM named like a script renders as text."""
    c = cluster
    vm = make_vm("plain", [16 << 20])
    odd = SimpleNamespace(name=XSS, qmp_socket=vm.qmp_socket)
    c.register(vm, odd)  # the same qsd twice: two VMs in the catalog
    viewer = sign_in(c, make_token(c, "watcher", "viewer"))
    admin = sign_in(c, c.admin_token)

    listing = admin.get("/ui/vms")
    assert listing.status_code == 200
    assert XSS not in listing.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in listing.text
    page = admin.get("/ui/vms/" + quote(XSS, safe=""))
    assert page.status_code == 200, page.text
    assert XSS not in page.text and "&lt;script&gt;" in page.text
    assert_no_inline_code(page.text)
    assert 'id="backup-now"' in page.text  # admin: the button is there

    vm_page = viewer.get("/ui/vms/plain")
    assert vm_page.status_code == 200
    assert 'id="backup-now"' not in vm_page.text and "<button" in vm_page.text  # only sign-out
    assert vm_page.text.count("<button") == 1
    assert 'href="/ui/tokens"' not in vm_page.text
    assert viewer.get("/ui/tokens").status_code == 403
    r = viewer.post(
        "/ui/vms/plain/backup",
        data={"csrf": csrf_of(vm_page.text), "backup_type": "full", "repository_id": "default"},
    )
    assert r.status_code == 403 and "operator" in r.text
    assert c.http("GET", "/api/v1/jobs").json()["total"] == 0  # nothing started

    # Tags: admins edit them on the VM page; a malformed one is refused, naming it.
    admin_page = admin.get("/ui/vms/plain").text
    assert 'id="tags-form"' in admin_page and 'id="tags-form"' not in vm_page.text
    r = admin.post(
        "/ui/vms/plain/tags", data={"csrf": csrf_of(admin_page), "tags": "tier=gold, env=prod"}
    )
    assert r.status_code == 303, r.text
    assert "Tags saved" in admin.get(r.headers["location"]).text  # the notice, signed
    forged = admin.get("/ui/vms/plain", params={"done": "Call 555-0100 now", "n": "0" * 32})
    assert "555-0100" not in forged.text  # a link from elsewhere cannot make it speak
    assert c.http("GET", "/api/v1/vms/plain").json()["tags"] == {"tier": "gold", "env": "prod"}
    r = admin.post("/ui/vms/plain/tags", data={"csrf": csrf_of(admin_page), "tags": "oops"})
    assert r.status_code == 400 and "not key=value" in r.text

    tenant = sign_in(c, make_token(c, "tenant", "operator", {"vms": ["plain"]}))
    seen = tenant.get("/ui/vms").text
    assert "/ui/vms/plain" in seen and "&lt;script&gt;" not in seen
    assert tenant.get("/ui/vms/" + quote(XSS, safe="")).status_code == 404


def test_whole_disk_restore_and_export_from_the_console(
    cluster: Cluster, make_vm: Any, tmp_path: Any
) -> None:
    """Restore to file: the image reads as the VM's disk did; Export over NBD
    shows the URL, which serves the same; while exported, Delete is refused
    with the in-use reason; Stop serving frees it."""
    from fixtures.lifecycle import MiB, raw_copy, write_random
    from sendense.qemu import img

    c = cluster
    vm = make_vm("disk1", [16 * MiB])
    c.register(vm)
    write_random(vm, 0, 0, 5 * MiB)
    (backup_id,) = c.backup("disk1", "full")["backups"]
    reference = raw_copy(vm.disks[0], tmp_path / "reference.raw")
    admin = sign_in(c, c.admin_token)
    # The backups list's day filters (UTC days, "to" inclusive).
    today = datetime.now(UTC).date()
    listed = admin.get("/ui/backups", params={"since": str(today), "until": str(today)})
    assert f"/ui/backups/{backup_id}" in listed.text
    later = admin.get("/ui/backups", params={"since": str(today + timedelta(days=1))})
    assert f"/ui/backups/{backup_id}" not in later.text and "No restore point" in later.text
    assert admin.get("/ui/backups", params={"since": "yesterday"}).status_code == 400
    page = admin.get(f"/ui/backups/{backup_id}")
    assert page.status_code == 200 and 'id="restore-form"' in page.text
    target = c.hub_dir.resolve() / "restores" / "disk1.qcow2"
    r = admin.post(
        f"/ui/backups/{backup_id}/restore",
        data={"csrf": csrf_of(page.text), "path": str(target), "format": "qcow2"},
    )
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].split("/ui/jobs/", 1)[1].split("?")[0]
    assert c.wait_job(job_id)["status"] == "completed"
    assert img.compare(str(target), str(reference))
    events = admin.get(f"/ui/jobs/{job_id}/events")  # a job that ended: one "end" event
    assert events.headers["content-type"].startswith("text/event-stream")
    assert events.text.startswith("retry: 1000\n\nevent: end\ndata: ")
    assert events.text.endswith("\n\n")
    assert 'data-status="completed"' in events.text
    assert console(c).get(f"/ui/jobs/{job_id}/events").status_code == 303  # not signed in
    again = admin.post(
        f"/ui/backups/{backup_id}/restore",
        data={"csrf": csrf_of(page.text), "path": str(target), "format": "qcow2"},
    )
    assert again.status_code == 409 and "exists" in again.text  # never over a file

    r = admin.post(f"/ui/backups/{backup_id}/export", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303, r.text
    page = admin.get(f"/ui/backups/{backup_id}")
    m = re.search(r'<code id="export-url">(nbd://[^<]+)</code>', page.text)
    assert m, page.text
    assert img.compare(m.group(1), str(reference))
    refused = admin.post(f"/ui/backups/{backup_id}/delete", data={"csrf": csrf_of(page.text)})
    assert refused.status_code == 409 and "In use" in refused.text
    assert "A running job or an open restore session reads it" in refused.text
    r = admin.post(f"/ui/backups/{backup_id}/export/close", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303
    assert c.http("GET", f"/api/v1/backups/{backup_id}/export").status_code == 404


def test_verify_and_consolidate_from_the_console(cluster: Cluster, make_vm: Any) -> None:
    from fixtures.lifecycle import MiB, write_random

    c = cluster
    vm = make_vm("chain1", [8 * MiB])
    c.register(vm)
    points = []
    for kind in ("full", "incremental", "incremental"):
        write_random(vm, 0, len(points) * MiB, MiB)
        points.append(c.backup("chain1", kind)["backups"][0])
    admin = sign_in(c, c.admin_token)
    page = admin.get(f"/ui/backups/{points[-1]}")
    r = admin.post(f"/ui/backups/{points[-1]}/verify", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].split("/ui/jobs/", 1)[1].split("?")[0]
    assert c.wait_job(job_id)["status"] == "completed"
    shown = admin.get(f"/ui/backups/{points[-1]}").text
    assert '<span class="status s-ok">ok</span>' in shown

    r = admin.post(
        f"/ui/backups/{points[-1]}/consolidate", data={"csrf": csrf_of(page.text), "keep": "1"}
    )
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].split("/ui/jobs/", 1)[1].split("?")[0]
    assert c.wait_job(job_id)["status"] == "completed"
    chain = c.http("GET", "/api/v1/backups/chain1/chain").json()["disks"][0]
    assert chain["chain_length"] == 1 and chain["chain"][0]["synthetic"]
    assert "synthetic full" in admin.get("/ui/vms/chain1").text
    bad = admin.post(
        f"/ui/backups/{points[-1]}/consolidate", data={"csrf": csrf_of(page.text), "keep": "0"}
    )
    assert bad.status_code == 400 and "keep" in bad.text


def test_locked_restore_point_shows_its_lock_and_refuses_delete(
    cluster: Cluster, make_vm: Any
) -> None:
    from fixtures.lifecycle import catalog_exec

    c = cluster
    c.register(make_vm("locked1", [8 << 20]))
    (backup_id,) = c.backup("locked1", "full")["backups"]
    until = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    catalog_exec(
        c, "UPDATE backups SET immutable_until = :until WHERE id = :id", until=until, id=backup_id
    )
    admin = sign_in(c, c.admin_token)
    shown = until.strftime("%Y-%m-%d %H:%M:%S")
    page = admin.get(f"/ui/backups/{backup_id}")
    assert f"immutable until {shown}" in page.text
    assert f"locked until {shown}" in admin.get("/ui/vms/locked1").text
    r = admin.post(f"/ui/backups/{backup_id}/delete", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 409
    assert "This restore point is locked" in r.text and f"Locked until <strong>{shown}" in r.text
    assert c.http("GET", f"/api/v1/backups/{backup_id}").status_code == 200
