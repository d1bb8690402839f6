"""The catalog never holds a key or a credential in clear (issue 10).

One test per catalog backend makes every kind of secret the product stores,
through the API of a real hub and node, and uses them the way they are
used (discovery, a backup, a webhook delivery, a console sign-in and
sign-out), then looks for each secret in what an attacker with a copy of
the catalog has: the raw bytes of the SQLite file and its ``-wal`` (free
pages and old WAL frames included), or a ``pg_dump`` of the PostgreSQL
database. Each secret is looked for as it is, in hex (lower and upper
case) and in base64 (both alphabets, at each of the three alignments a
string can have inside a longer base64 text). A hit names the file and
offset, and the table: from the page (SQLite's ``dbstat``; a WAL frame's
page number) or from the ``COPY`` section of the dump.

Secrets made here:

- API tokens (the strings answered at creation), the hub's bootstrap token,
  the node's token;
- source credentials: a qemu source config with a password (nested in a VM
  entry and at the top), a vmware source's password (registered without a
  vCenter: the hub checks the config's shape only; its discovery fails
  against a closed port, and that failure must not store the password);
- a webhook's HMAC secret, and a password in its URL's user part;
- a console session: the signed cookie and the random id inside it;
- an encrypted repository's data key (its exported passphrase, and the raw
  key bytes), and a backup into that repository;
- the hub's own keys: every ``*.key`` file in its data folder (the Fernet
  key that encrypts the rest; the master key of encrypted repositories), and
  the node's (its TLS private key);
- NBD TLS pre-shared keys: any ``*psk*`` file written under the hub's data
  folder while a backup runs (the keys exist only during a job).

Not made: a cifs repository's password. The hub stores it only after the
share mounted, and this machine has no CIFS server to mount.
"""

from __future__ import annotations

import base64
import re
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from fixtures.cluster import Cluster
from fixtures.lifecycle import catalog_exec, cluster_env, lifecycle_cluster
from pgserver import PgNotFound, find_bindir
from sendense.cli.services import stop_service
from sendense.settings import HubSettings

MiB = 1 << 20
BOTH = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
# Webhook deliveries retried quickly, and given up after a few attempts.
FAST_WEBHOOKS = {
    "SENDENSE_WEBHOOK_INTERVAL": "0.2",
    "SENDENSE_WEBHOOK_BACKOFF": "0.5",
    "SENDENSE_WEBHOOK_MAX_ATTEMPTS": "3",
    "SENDENSE_WEBHOOK_TIMEOUT": "3",
}


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from lifecycle_cluster(request, tmp_path)


def unique(kind: str) -> str:
    """A secret no other test writes (so a hit is this test's, not noise)."""
    return f"scan-{kind}-{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ spellings


def base64_fragments(raw: bytes) -> set[bytes]:
    """The base64 text that encodes ``raw`` wherever it sits in a longer
    input: for each alignment (0, 1 or 2 bytes before it in its group of 3),
    the characters that depend on ``raw`` alone."""
    found: set[bytes] = set()
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * shift + raw)
            first = -(-8 * shift // 6)  # the first character with no padding bit in it
            last = 8 * (shift + len(raw)) // 6  # past the last character made of raw's bits only
            found.add(text[first:last])
    return found


def spellings(secret: str | bytes) -> dict[bytes, str]:
    """Byte patterns of ``secret`` -> what they are."""
    raw = secret.encode() if isinstance(secret, str) else secret
    forms = {raw: "clear", raw.hex().encode(): "hex", raw.hex().upper().encode(): "HEX"}
    for fragment in base64_fragments(raw):
        forms.setdefault(fragment, "base64")
    return forms


@dataclass(frozen=True)
class Hit:
    secret: str  # its name
    spelling: str
    where: str

    def __str__(self) -> str:
        return f"{self.secret} ({self.spelling}) at {self.where}"


Secrets = dict[str, str | bytes]


def find_all(data: bytes, secrets: Secrets) -> list[tuple[str, str, int]]:
    """(secret name, spelling, offset) of every occurrence."""
    hits = []
    for name, secret in secrets.items():
        for pattern, spelling in spellings(secret).items():
            offset = data.find(pattern)
            while offset >= 0:
                hits.append((name, spelling, offset))
                offset = data.find(pattern, offset + 1)
    return hits


# ------------------------------------------------------------------ where


def sqlite_page_tables(db_file: Path) -> tuple[int, dict[int, str]]:
    """(page size, page number -> table or index) of a SQLite file."""
    con = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    try:
        page_size = int(con.execute("PRAGMA page_size").fetchone()[0])
        pages = {int(p): str(n) for n, p in con.execute("SELECT name, pageno FROM dbstat")}
    finally:
        con.close()
    return page_size, pages


def scan_sqlite(db_file: Path, secrets: Secrets) -> list[Hit]:
    """Hits in the SQLite file and its WAL, each named by offset and table."""
    page_size, pages = sqlite_page_tables(db_file)
    hits: list[Hit] = []
    data = db_file.read_bytes()
    for name, spelling, offset in find_all(data, secrets):
        page = offset // page_size + 1
        table = pages.get(page, "a free page")
        hits.append(Hit(name, spelling, f"{db_file.name} offset {offset} page {page} ({table})"))
    wal = db_file.with_name(db_file.name + "-wal")
    if wal.exists():
        # WAL format: a 32-byte header, then frames of a 24-byte header (the
        # page number first, big-endian) and one page (sqlite.org/walformat).
        data = wal.read_bytes()
        for name, spelling, offset in find_all(data, secrets):
            frame = max(0, (offset - 32) // (24 + page_size))
            start = 32 + frame * (24 + page_size)
            page = int.from_bytes(data[start : start + 4], "big")
            table = pages.get(page, "a page no longer in use")
            where = f"{wal.name} offset {offset} frame {frame} page {page} ({table})"
            hits.append(Hit(name, spelling, where))
    return hits


def pg_dump(url: str) -> bytes:
    """A plain-text dump of the database (data and schema), as an attacker
    with the database's credentials gets it."""
    try:  # the server's own version first (a newer pg_dump reads older servers)
        dump = find_bindir() / "pg_dump"
    except PgNotFound:  # an external server (SENDENSE_TEST_PG_URL)
        dump = Path("/nonexistent")
    if not dump.exists():
        found = shutil.which("pg_dump")
        assert found, "pg_dump not found (Debian's postgresql package has it)"
        dump = Path(found)
    u = make_url(url)
    cmd = [
        str(dump),
        "--no-owner",
        "-h",
        u.host or "127.0.0.1",
        "-p",
        str(u.port or 5432),
        "-U",
        u.username or "postgres",
        "-d",
        u.database or "postgres",
    ]
    env = {"PGPASSWORD": u.password} if u.password else {}
    proc = subprocess.run(cmd, capture_output=True, timeout=120, env={"PATH": "/usr/bin", **env})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"COPY public.api_tokens" in proc.stdout, "the dump has no catalog data"
    return proc.stdout


def scan_dump(dump: bytes, secrets: Secrets) -> list[Hit]:
    sections = [(m.start(), m.group(1).decode()) for m in re.finditer(rb"\nCOPY (\S+)", dump)]
    hits = []
    for name, spelling, offset in find_all(dump, secrets):
        table = "the schema"
        for start, section in sections:
            if start > offset:
                break
            table = section
        line = dump.count(b"\n", 0, offset) + 1
        hits.append(Hit(name, spelling, f"pg_dump offset {offset} line {line} ({table})"))
    return hits


# ------------------------------------------------------------------ secrets


def key_files(folder: Path) -> dict[str, str]:
    """Keys kept in files (``*.key``, at any depth): the whole text, and each
    line of a PEM body (a stored copy may have other line ends)."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.key")):
        text = path.read_text(errors="replace").strip()
        if not text:
            continue
        name = f"{folder.name}/{path.relative_to(folder)}"
        found[name] = text
        body = [ln for ln in text.splitlines() if ln and not ln.startswith("-----")]
        if len(body) > 1:
            for i, line in enumerate(body):
                if len(line) >= 16:
                    found[f"{name} line {i + 1}"] = line
    return found


class PskWatcher:
    """Reads every ``*psk*`` file under a folder while it runs: a job's NBD
    TLS keys exist only while the job does."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.keys: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PskWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for path in self.folder.rglob("*psk*"):
                try:
                    text = path.read_text(errors="replace")
                except OSError:  # gone already (the job ended)
                    continue
                # qemu's tls-creds-psk file: "identity:hexkey" per line.
                for line in text.splitlines():
                    key = line.rsplit(":", 1)[-1].strip()
                    if len(key) >= 16:
                        self.keys[f"psk {path.name}"] = key


def post(c: Cluster, path: str, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    r = c.http("POST", path, json=body)
    assert r.status_code == status, (path, r.status_code, r.text)
    out: dict[str, Any] = r.json()
    return out


def sign_in_console(c: Cluster, token: str) -> str:
    """Sign in to the web console with ``token``; its session cookie."""
    with httpx.Client(
        base_url=c.hub_url, timeout=60, follow_redirects=False, verify=c.hub_verify
    ) as client:
        form = client.get("/ui/signin")
        m = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert m, "no CSRF field on the sign-in page"
        r = client.post("/ui/signin", data={"csrf": m.group(1), "token": token, "next": "/ui/"})
        assert r.status_code == 303, r.text
        cookie = str(client.cookies.get("sendense_session"))
        page = client.get("/ui/")
        assert page.status_code == 200
        m = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert m, "no CSRF field on the dashboard"
        out = client.post("/ui/signout", data={"csrf": m.group(1)})
        assert out.status_code in (200, 303), out.text
    return cookie


def session_id(cookie: str) -> str:
    """The random id inside a console cookie (``<base64 json>.<mac>``)."""
    body = cookie.split(".")[0]
    data = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    m = re.search(rb'"sid":"([^"]+)"', data)
    assert m, data
    return m.group(1).decode()


def make_every_secret(c: Cluster, make_vm: Any) -> Secrets:
    """Every kind of secret the hub stores, made and used through the API."""
    secrets: Secrets = {
        "hub admin.token": c.admin_token,
        "node token": c.node_token,
    }
    node = post(c, "/api/v1/nodes", c.node_body("node1"))  # HTTPS, fingerprint pinned

    tokens = {}
    for role in ("admin", "viewer"):
        made = post(c, "/api/v1/tokens", {"name": f"scan-{role}", "role": role})
        tokens[role] = secrets[f"api token ({role})"] = str(made["token"])

    vm = make_vm("scan1", [8 * MiB])
    secrets["qemu source password (nested)"] = unique("qemu-nested")
    secrets["qemu source api_key"] = unique("qemu-top")
    qemu = post(
        c,
        "/api/v1/sources",
        {
            "name": "qemu1",
            "node_id": node["node_id"],
            "type": "qemu",
            "config": {
                "vms": [
                    {
                        "name": vm.name,
                        "qmp_socket": vm.qmp_socket,
                        "password": secrets["qemu source password (nested)"],
                    }
                ],
                "api_key": secrets["qemu source api_key"],
            },
        },
    )
    post(c, "/api/v1/vms/discover", {"source_id": qemu["source_id"]}, status=200)

    # A vmware source registers without a vCenter (the shape is checked);
    # its discovery fails against a closed port and must not store the password.
    secrets["vmware source password"] = unique("vmware")
    vmware = post(
        c,
        "/api/v1/sources",
        {
            "name": "vcenter1",
            "node_id": node["node_id"],
            "type": "vmware",
            "config": {
                "host": "127.0.0.1",
                "port": 9,
                "user": "backup@vsphere.local",
                "password": secrets["vmware source password"],
                "insecure": True,
            },
        },
    )
    r = c.http("POST", "/api/v1/vms/discover", json={"source_id": vmware["source_id"]})
    assert r.status_code >= 400, r.text

    # A webhook with a secret and a password in its URL; the backup below
    # makes a delivery, which fails (nothing listens on port 9) and is retried.
    hook_secret = secrets["webhook secret"] = unique("hook-hmac")
    hook_password = secrets["webhook URL password"] = unique("hook-url")
    post(
        c,
        "/api/v1/webhooks",
        {
            "url": f"http://alerts:{hook_password}@127.0.0.1:9/sendense",
            "events": ["job.completed", "job.failed"],
            "secret": hook_secret,
        },
    )

    # An encrypted repository: its data key is wrapped by the hub's master
    # key (a file, scanned for below); the key as exported must not be there.
    vault = post(
        c,
        "/api/v1/repositories",
        {"name": "vault", "path": str(c.root / "vault"), "encrypted": True},
    )
    exported = post(c, f"/api/v1/repositories/{vault['repository_id']}/key/export", {}, 200)
    secrets["repository passphrase"] = exported["passphrase"]
    secrets["repository data key (bytes)"] = base64.b64decode(exported["passphrase"])

    # A backup into it: the hub hands the node the source's credentials (and
    # a TLS key per disk), and qemu the repository's key; none may stay.
    with PskWatcher(c.hub_dir) as psk:
        c.backup(vm.name, "full", repository_id=vault["repository_id"])
    if "nbd_tls" in HubSettings.model_fields:
        assert psk.keys, "no NBD pre-shared key file was seen while the backup ran"
    secrets.update(psk.keys)

    cookie = sign_in_console(c, tokens["admin"])
    secrets["console cookie"] = cookie
    secrets["console session id"] = session_id(cookie)

    secrets.update(key_files(c.hub_dir))
    secrets.update(key_files(c.node_dir))
    return secrets


@cluster_env(hub=FAST_WEBHOOKS)
@pytest.mark.parametrize("cluster", BOTH, indirect=True)
def test_the_catalog_holds_no_secret_in_clear(cluster: Cluster, make_vm: Any) -> None:
    c = cluster
    secrets = make_every_secret(c, make_vm)
    assert "hub/secret.key" in secrets, "the hub's Fernet key was not found"
    assert "hub/master.key" in secrets, "the hub's master key was not found"
    if (c.node_dir / "tls").exists():
        assert any(k.startswith("node/tls/") for k in secrets), "the node's TLS key was not found"
    assert len(secrets) >= 10, sorted(secrets)
    # Every secret is long and random enough that a match is no accident.
    assert all(len(v) >= 16 for v in secrets.values()), sorted(secrets)

    if c.database_url:
        hits = scan_dump(pg_dump(c.database_url), secrets)
    else:
        db_file = c.hub_dir / "catalog.db"
        assert db_file.exists()
        hits = scan_sqlite(db_file, secrets)  # while the hub runs: the WAL holds the latest
        stop_service(c.hub)  # a clean stop checkpoints the WAL into the file
        hits += scan_sqlite(db_file, secrets)
    assert not hits, "secrets in the catalog:\n" + "\n".join(sorted({str(h) for h in hits}))


def test_the_scan_finds_each_spelling(tmp_path: Path) -> None:
    """The scanner itself: a secret planted in clear, in hex and in base64 at
    each alignment inside a SQLite file is found, and named by its table."""
    secret = unique("planted")
    db_file = tmp_path / "planted.db"
    con = sqlite3.connect(db_file)
    con.execute("CREATE TABLE plain (v TEXT)")
    con.execute("CREATE TABLE hexed (v TEXT)")
    con.execute("CREATE TABLE b64 (v TEXT)")
    con.execute("INSERT INTO plain VALUES (?)", ("x" + secret + "y",))
    con.execute("INSERT INTO hexed VALUES (?)", (secret.encode().hex(),))
    for prefix in (b"", b"a", b"ab"):
        con.execute("INSERT INTO b64 VALUES (?)", (base64.b64encode(prefix + secret.encode()),))
    con.commit()
    con.close()
    hits = scan_sqlite(db_file, {"planted": secret})
    by_table = {(h.spelling, h.where.rsplit("(", 1)[1].rstrip(")")) for h in hits}
    assert ("clear", "plain") in by_table and ("hex", "hexed") in by_table, hits
    assert sum(1 for h in hits if h.spelling == "base64") >= 3, hits
    assert not scan_sqlite(db_file, {"other": unique("absent")})


class Receiver:
    """An HTTP server on 127.0.0.1 that records the headers of each POST."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next_post(self, seen: int, timeout: float = 30) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while len(self.headers) <= seen:
            assert time.monotonic() < deadline, f"no POST after {seen} in {timeout}s"
            time.sleep(0.05)
        return self.headers[seen]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@cluster_env(hub=FAST_WEBHOOKS)
def test_a_webhook_url_password_is_sealed_and_still_sent(cluster: Cluster) -> None:
    """A password in a webhook's URL is stored encrypted with its secret (the
    row keeps ``***`` in its place), and deliveries still carry it (HTTP Basic
    from the URL's user part), through edits of the secret and of the URL."""
    c = cluster
    password = unique("url-pw")
    secret = unique("hmac")
    rx = Receiver()
    try:
        url = f"http://alerts:{password}@127.0.0.1:{rx.port}/hook"
        hook = post(c, "/api/v1/webhooks", {"url": url, "events": ["job.failed"]})
        shown = f"http://alerts:***@127.0.0.1:{rx.port}/hook"
        assert hook["url"] == shown and hook["has_secret"] is False, hook
        path = f"/api/v1/webhooks/{hook['webhook_id']}"
        (row,) = catalog_exec(c, "SELECT url, secret_encrypted FROM webhooks")
        assert row[0] == shown and password not in str(row[1]), row

        basic = "Basic " + base64.b64encode(f"alerts:{password}".encode()).decode()
        post(c, f"{path}/test", {}, status=202)
        first = rx.next_post(0)
        assert first.get("authorization") == basic and "x-sendense-signature" not in first

        # A new secret keeps the URL's password; the answer never shows either.
        r = c.http("PATCH", path, json={"secret": secret})
        assert r.status_code == 200 and r.json()["has_secret"] is True, r.text
        assert r.json()["url"] == shown and password not in r.text and secret not in r.text
        post(c, f"{path}/test", {}, status=202)
        second = rx.next_post(1)
        assert second.get("authorization") == basic and "x-sendense-signature" in second

        # A new URL without a password drops it and keeps the secret.
        plain = f"http://127.0.0.1:{rx.port}/hook2"
        r = c.http("PATCH", path, json={"url": plain})
        assert r.status_code == 200 and r.json()["url"] == plain, r.text
        assert r.json()["has_secret"] is True
        post(c, f"{path}/test", {}, status=202)
        third = rx.next_post(2)
        assert "authorization" not in third and "x-sendense-signature" in third
        (row,) = catalog_exec(c, "SELECT url, secret_encrypted FROM webhooks")
        assert row[0] == plain and password not in str(row[1]) and secret not in str(row[1])
    finally:
        rx.close()
