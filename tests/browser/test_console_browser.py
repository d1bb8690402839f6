"""The web console in headless Chromium against real hub and node processes
and real backups of qemu-storage-daemon VMs.

Each test saves screenshots in its own output directory; with
``SENDENSE_SCREENSHOTS=docs/img/console`` the guide's images are rewritten.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest

from fixtures.cluster import Cluster
from fixtures.disks import PartitionSpec, build_ext4, build_partitioned, tools_missing
from fixtures.lifecycle import MiB, cluster_env, lifecycle_cluster

# About a minute in all: run by `make test`, left out of `make test-fast`.
pytestmark = pytest.mark.slow

XSS = "<script>alert(1)</script>"
# The mover at 3 MiB/s: a 24 MiB disk of random data takes about 8 s.
SLOW = {"SENDENSE_NODE_MAX_RATE": str(3 * MiB), "SENDENSE_NODE_REQUEST_SIZE": str(MiB)}


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


def fill(vm: Any, disk: int, size: int) -> None:
    """Random data over the disk, written through the guest's NBD export."""
    h = vm.guest(disk)
    try:
        for at in range(0, size, 4 * MiB):
            h.pwrite(os.urandom(min(4 * MiB, size - at)), at)
        h.flush()
    finally:
        h.shutdown()


def token(c: Cluster, name: str, role: str) -> str:
    r = c.http("POST", "/api/v1/tokens", json={"name": name, "role": role})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def percent_of(console: Any) -> float:
    text = console.find("#running").text
    m = re.search(r"(\d+\.\d) %", text)
    return float(m.group(1)) if m else -1.0


def test_sign_in_and_out(console: Any, cluster: Cluster) -> None:
    console.go("/ui/")
    assert console.finds("#signin-form"), "not signed in: the sign-in page"
    console.find("#token").send_keys("not-a-token")
    console.find("#signin-form button[type=submit]").click()
    console.wait(lambda: "not valid" in console.text(), 20, "the refusal")
    console.shot("signin-refused")
    console.go("/ui/signin")
    console.shot("signin", doc="signin")
    console.sign_in(cluster.admin_token)
    assert "Dashboard" in console.text() and "admin · admin" in console.text()
    console.shot("dashboard-empty")

    # Tokens: the secret is shown once, works on the API, and revoking it stops it.
    console.go("/ui/tokens")
    console.find("#token-form input[name=name]").send_keys("backup-script")
    console.find("#token-form select[name=role] option[value=operator]").click()
    console.find("#token-form button[type=submit]").click()
    secret = console.wait(lambda: console.find("#new-secret").text, 20, "the new secret")
    console.shot("token-created", doc="tokens")
    assert cluster.http("GET", "/api/v1/vms", token=secret).status_code == 200
    console.go("/ui/tokens")
    assert secret not in console.driver.page_source  # shown once only
    console.find("form[action$='/revoke'] button").click()
    console.driver.switch_to.alert.accept()
    console.wait(lambda: "revoked" in console.text(), 20, "the revocation")
    assert cluster.http("GET", "/api/v1/vms", token=secret).status_code == 401
    console.go("/ui/audit")
    assert "/ui/tokens/{token_id}/revoke" in console.text()
    console.shot("audit", doc="audit")
    console.go("/ui/repositories")
    console.wait(lambda: console.finds(".chart .uplot"), 20, "the repository chart")
    console.shot("repositories", doc="repositories")

    # Keyboard: the first Tab reaches "Skip to content", then the menu.
    from selenium.webdriver.common.keys import Keys

    console.go("/ui/")
    body = console.find("body")
    body.send_keys(Keys.TAB)
    focused = console.driver.switch_to.active_element
    assert focused.text == "Skip to content"
    focused.send_keys(Keys.TAB)
    assert console.driver.switch_to.active_element.text == "Sendense"
    console.driver.switch_to.active_element.send_keys(Keys.TAB)
    assert console.driver.switch_to.active_element.text == "Dashboard"

    # A phone's width: nothing wider than the screen (tables scroll in their box).
    console.driver.set_window_size(390, 844)
    try:
        for path in ("/ui/", "/ui/vms", "/ui/jobs", "/ui/backups", "/ui/tokens", "/ui/audit"):
            console.go(path)
            wide = console.driver.execute_script(
                "return document.documentElement.scrollWidth - window.innerWidth"
            )
            assert wide <= 1, (path, wide)
        console.go("/ui/")
        console.shot("dashboard-phone")
    finally:
        console.driver.set_window_size(1280, 900)
    console.sign_out()
    console.go("/ui/vms")
    console.wait(lambda: console.finds("#signin-form"), 20, "sign-in again after sign-out")


@cluster_env(node=SLOW)
def test_backup_from_vm_page_progress_and_cancel(
    console: Any, cluster: Cluster, make_vm: Any
) -> None:
    """Back up now from the VM page; the dashboard shows the job's progress
    moving; the job page shows it complete. A second full is cancelled from
    its job page."""
    c = cluster
    vm = make_vm("web1", [24 * MiB])
    fill(vm, 0, 24 * MiB)
    c.register(vm)
    console.sign_in(c.admin_token)
    console.go("/ui/vms")
    console.shot("vms", doc="vms")
    console.find("a[href='/ui/vms/web1']").click()
    console.wait(lambda: console.finds("#backup-now"), 20, "the VM page")
    console.find("#backup_type option[value=full]").click()
    console.find("#backup-now").click()
    console.wait(lambda: console.finds("#job-progress"), 20, "the job page")
    job_url = console.driver.current_url
    job_id = job_url.rsplit("/", 1)[1].split("?")[0]
    # The job page follows the job by server-sent events, without reloading.
    console.driver.execute_script("window.notReloaded = true")
    # (read through wait: the events may replace the element between the
    # lookup and the read)
    first = console.wait(lambda: console.find("#job-progress .progress").text, 20, "progress")
    console.wait(
        lambda: console.find("#job-progress .progress").text != first, 30, "job page progress"
    )
    assert console.driver.execute_script("return window.notReloaded") is True

    console.go("/ui/")
    console.driver.execute_script("window.notReloaded = true")
    seen: list[float] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        value = percent_of(console)  # replaced in place by server-sent events
        if value >= 0 and (not seen or value != seen[-1]):
            seen.append(value)
            if len(seen) == 2:
                console.shot("dashboard-running", doc="dashboard")
        if len(seen) >= 3:
            break
        time.sleep(0.3)
    assert len(seen) >= 2 and seen == sorted(seen), f"progress did not move: {seen}"
    assert console.driver.execute_script("return window.notReloaded") is True

    console.driver.get(job_url)
    console.wait(lambda: "completed" in console.find("#job-status").text, 90, "completion")
    console.shot("job-completed", doc="job")
    assert c.client.get(f"/api/v1/jobs/{job_id}")["status"] == "completed"
    console.go("/ui/vms/web1")
    assert "full" in console.find("ol.chain").text
    assert console.finds(".chart .uplot"), "the VM's chart was not drawn"
    console.shot("vm-chain", doc="vm", full=True)

    # A second full, cancelled from its page.
    console.find("#backup_type option[value=full]").click()
    console.find("#backup-now").click()
    console.wait(lambda: console.finds("#cancel-job"), 20, "the cancel button")
    second = console.driver.current_url.rsplit("/", 1)[1].split("?")[0]
    console.find("#cancel-job").click()
    console.driver.switch_to.alert.accept()
    console.wait(lambda: "cancelled" in console.find("#job-status").text, 60, "cancelled")
    console.shot("job-cancelled")
    assert c.client.get(f"/api/v1/jobs/{second}")["status"] == "cancelled"
    assert not console.finds("#cancel-job")
    console.go("/ui/jobs")
    console.shot("jobs", doc="jobs")
    console.go("/ui/nodes")
    assert "online" in console.text() or "unknown" in console.text()
    assert f"pinned {c.node_fingerprint[:16]}" in console.text()
    console.shot("nodes", doc="nodes")


def test_delete_refused_with_reason_and_viewer_sees_no_buttons(
    console: Any, cluster: Cluster, make_vm: Any
) -> None:
    c = cluster
    vm = make_vm("db1", [8 * MiB])
    c.register(vm)
    full = c.backup("db1", "full")["backups"][0]
    c.backup("db1", "incremental")
    console.sign_in(c.admin_token)
    console.go(f"/ui/backups/{full}")
    console.find("#delete").click()
    console.driver.switch_to.alert.accept()
    console.wait(lambda: console.finds("section.error"), 20, "the refusal")
    text = console.text()
    assert "Newer restore points depend on this one" in text
    assert "delete the newer ones first" in text.lower()
    assert "HTTP 409" in text
    console.shot("delete-refused", doc="delete-refused")
    assert c.http("GET", f"/api/v1/backups/{full}").status_code == 200  # still there
    console.go("/ui/backups?vm_name=db1")
    console.shot("backups", doc="backups")

    # A viewer: the same pages without a single action button.
    console.sign_out()
    console.sign_in(token(c, "watcher", "viewer"))
    for path in ("/ui/vms/db1", f"/ui/backups/{full}", "/ui/repositories", "/ui/restore"):
        console.go(path)
        buttons = [b.text for b in console.finds("main button, main form[method=post]")]
        assert buttons == [], (path, buttons)
    assert not console.finds("a[href='/ui/tokens']")
    console.go("/ui/vms/db1")
    console.shot("viewer-vm")


def test_escaping_and_csrf_refusal(console: Any, cluster: Cluster, make_vm: Any) -> None:
    """A VM named like a script shows its name as text and runs nothing; a
    form whose CSRF token was changed is refused with a page saying why."""
    c = cluster
    vm = make_vm("plain", [8 * MiB])
    c.register(vm, SimpleNamespace(name=XSS, qmp_socket=vm.qmp_socket))
    console.sign_in(c.admin_token)
    console.go("/ui/vms")
    link = console.find(f"a[href='/ui/vms/{quote(XSS, safe='')}']")
    assert link.text == XSS
    link.click()
    console.wait(lambda: console.finds(".vm-name"), 20, "the VM page")
    assert console.find(".vm-name").text == XSS
    sources = console.driver.execute_script(
        "return Array.from(document.scripts).map(function (s) { return s.src; })"
    )
    assert all(src.startswith(c.hub_url + "/ui/static/") for src in sources), sources
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        console.driver.switch_to.alert.text  # noqa: B018
    console.shot("xss-as-text")

    console.go("/ui/vms/plain")
    console.driver.execute_script(
        "document.querySelector('#backup-form input[name=csrf]').value = 'forged'"
    )
    console.find("#backup-now").click()
    console.wait(lambda: "Form refused" in console.text(), 20, "the CSRF refusal")
    assert "HTTP 403" in console.text()
    console.shot("csrf-refused")
    assert c.http("GET", "/api/v1/jobs").json()["total"] == 0


@pytest.mark.skipif(bool(tools_missing()), reason=f"test disk tools missing: {tools_missing()}")
def test_restore_browser_download_equals_source(
    console: Any, cluster: Cluster, make_vm: Any, tmp_path: Path
) -> None:
    """Backup -> Browse files -> partition -> directory -> file: the file
    downloaded by the browser has the sha256 of the source file."""
    c = cluster
    tree = tmp_path / "tree"
    (tree / "etc" / "app").mkdir(parents=True)
    payload = os.urandom(300_000)
    (tree / "etc" / "app" / "settings.bin").write_bytes(payload)
    (tree / "etc" / "hostname").write_text("guest1\n")
    (tree / "<img src=x onerror=alert(1)>.txt").write_text("odd name\n")
    (tree / "many").mkdir()
    for i in range(250):  # more than a page (200)
        (tree / "many" / f"f{i:03d}.txt").write_bytes(b"x" * (i * 10))
    ext4 = tmp_path / "p1.ext4"
    build_ext4(ext4, tree, size=32 * MiB)
    raw = tmp_path / "disk.raw"
    build_partitioned(raw, "gpt", [PartitionSpec(ext4, "linux")])
    vm = make_vm("files1", [raw.stat().st_size], start=False)
    import subprocess

    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(vm.disks[0])],
        check=True,
        capture_output=True,
    )
    vm.start()
    c.register(vm)
    backup = c.backup("files1", "full")["backups"][0]

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    console.driver.execute_cdp_cmd(
        "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    console.sign_in(c.admin_token)
    console.go(f"/ui/backups/{backup}")
    console.shot("backup", doc="backup", full=True)
    console.find("#open-session").click()
    console.wait(lambda: console.finds("table.files"), 60, "the file listing")
    assert console.find("table.files").text.count("<img src=x onerror=alert(1)>.txt") == 1
    console.find("table.files a[href*='path=%2Fetc']").click()
    console.wait(lambda: console.finds("table.files a[href*='app']"), 30, "/etc")
    console.find("table.files a[href*='app']").click()
    console.wait(lambda: console.finds("a.file"), 30, "/etc/app")
    console.shot("restore-browse", doc="restore")
    console.find("a.file").click()
    target = downloads / "settings.bin"
    console.wait(lambda: target.exists() and target.stat().st_size == len(payload), 60, "download")
    assert hashlib.sha256(target.read_bytes()).hexdigest() == hashlib.sha256(payload).hexdigest()
    # The same answer as the API's: a range is a 206 of exactly those bytes.
    href = console.find("a.file").get_attribute("href")
    got = console.driver.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {headers: {Range: 'bytes=10-19'}})"
        ".then(function (r) { return r.arrayBuffer().then(function (b) {"
        "  done([r.status, Array.from(new Uint8Array(b))]); }); })"
        ".catch(function (e) { done(String(e)); });",
        href,
    )
    assert got[0] == 206 and bytes(got[1]) == payload[10:20], got
    # The directory as a ZIP, streamed by the hub.
    console.find("#dir-zip").click()
    archive = downloads / "app.zip"
    console.wait(lambda: archive.exists() and zipfile.is_zipfile(archive), 60, "the ZIP")
    with zipfile.ZipFile(archive) as z:
        assert z.read("settings.bin") == payload

    # A big directory is paged by the hub, and sorts across pages.
    mount_path = console.driver.current_url.split("?")[0]
    console.driver.get(mount_path + "?path=/many")
    console.wait(lambda: "1\u2013200 of 250" in console.text(), 30, "the first page")
    console.find("a[rel=next]").click()
    console.wait(lambda: "201\u2013250 of 250" in console.text(), 30, "the second page")
    assert console.finds("table.files a.file")[0].text == "f200.txt"
    console.driver.get(mount_path + "?path=/many&sort=size&order=desc")
    console.wait(lambda: console.finds("table.files a.file"), 30, "sorted by size")
    assert console.finds("table.files a.file")[0].text == "f249.txt"

    # Close the session from the page: the restore point is free again.
    console.find("#close-session").click()
    console.wait(lambda: "Restore session closed" in console.text(), 30, "closed")
    mounts = c.http("GET", "/api/v1/restore/mounts").json()["mounts"]
    assert mounts == []


@cluster_env(hub={"SENDENSE_SCHEDULER": "false"})
def test_policy_editor_shows_next_runs_as_typed(
    console: Any, cluster: Cluster, make_vm: Any
) -> None:
    c = cluster
    c.register(make_vm("web1", [8 * MiB]))
    console.sign_in(c.admin_token)
    console.go("/ui/policies/new")
    console.find("input[name=name]").send_keys("nightly")
    console.find("input[name=vms]").send_keys("web1")
    schedule = console.find("#schedule")
    schedule.clear()
    schedule.send_keys("30 4 * * 1")
    console.wait(
        lambda: "04:30" in console.find("#schedule-preview").text, 20, "the preview updated"
    )
    runs = console.finds("#next-runs li")
    assert len(runs) == 5 and all("04:30:00 UTC" in r.text for r in runs)
    schedule.send_keys(" *")  # six fields
    console.wait(lambda: "6 field(s)" in console.find("#schedule-preview").text, 20, "error")
    schedule.send_keys("\b\b")
    console.wait(lambda: console.finds("#next-runs li"), 20, "valid again")
    console.shot("policy-edit", doc="policy-edit", full=True)
    console.find("#save-policy").click()
    console.wait(lambda: console.finds("#run-policy"), 20, "the policy page")
    policy = c.http("GET", "/api/v1/policies").json()["policies"][0]
    assert policy["schedule"] == "30 4 * * 1" and policy["matched_vms"] == ["web1"]
    for kind in ("full", "incremental", "full", "incremental"):
        c.backup("web1", kind)  # one day: keep_daily keeps the newest (and the oldest)
    console.find("#retention-plan").click()
    console.wait(lambda: console.finds("#plan"), 20, "the retention preview")
    plan = console.find("#plan").text
    assert "removes 2" in plan and "delete" in plan and "consolidate" in plan, plan
    console.shot("policy", doc="policy", full=True)
