"""Console sign-in: a signed session cookie, CSRF tokens, and the caller.

The cookie holds no secret, only what the hub needs to find the caller again
(``{"tid": token id, "exp": unix seconds, "sid": random}``, the bootstrap
admin token as ``tid = "bootstrap"`` with a fingerprint of that token), signed
with HMAC-SHA256 under a key derived from the hub's ``secret.key``. Every API
process of the hub reads the same file, so any of them accepts the cookie.

Each sign-in is also a catalog row (``console_sessions``, keyed by a hash of
the random ``sid``): signing out revokes it, so a copy of the cookie taken
before stops working at once, in every hub process.

On every request the session row and the token behind the cookie are looked
up again: signing out, revoking the token (``DELETE /api/v1/tokens/{id}``),
its expiry, or a new bootstrap token end the session at once; at the latest
it ends after `SESSION_SECONDS`.

CSRF: every form carries ``HMAC(key, "csrf:" + sid)``, bound to the session;
the sign-in form (no session yet) is bound to a random pre-session cookie
instead (double submit). POSTs from another origin are refused too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from sendense.auth import token_matches
from sendense.catalog.models import ApiToken, ConsoleSessionRecord
from sendense.core.access import ADMIN, SCOPED_ROLE_MAX, Principal, Role, Scope

COOKIE = "sendense_session"
PRE_COOKIE = "sendense_signin"
COOKIE_PATH = "/ui"
SESSION_SECONDS = 8 * 3600
BOOTSTRAP = "bootstrap"


def derive_key(secret_key_file: Path) -> bytes:
    """The console's signing key: HMAC of a fixed label under the hub's
    Fernet key (the key itself signs nothing else here)."""
    return hmac.new(
        secret_key_file.read_bytes().strip(), b"sendense/console/session/v1", hashlib.sha256
    ).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(key: bytes, payload: dict[str, Any]) -> str:
    body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    mac = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())
    return f"{body}.{mac}"


def unsign(key: bytes, value: str | None) -> dict[str, Any] | None:
    """The payload of a cookie this hub signed, or None."""
    if not value or value.count(".") != 1:
        return None
    body, mac = value.split(".")
    good = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(mac, good):
        return None
    try:
        data = json.loads(_unb64(body))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def fingerprint(key: bytes, admin_token: str) -> str:
    return hmac.new(key, b"bootstrap:" + admin_token.encode(), hashlib.sha256).hexdigest()[:32]


def csrf_for(key: bytes, sid: str) -> str:
    return hmac.new(key, b"csrf:" + sid.encode(), hashlib.sha256).hexdigest()


def csrf_ok(key: bytes, sid: str | None, given: str | None) -> bool:
    return bool(sid and given) and hmac.compare_digest(csrf_for(key, sid or ""), given or "")


def new_sid() -> str:
    return secrets.token_urlsafe(18)


@dataclass(frozen=True)
class ConsoleSession:
    who: Principal
    sid: str
    expires: int


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _principal(row: ApiToken) -> Principal:
    # The same rule as hub/deps.principal_of: a scoped token is at most an operator.
    scope = Scope.parse(row.scope) if row.scope is not None else None
    role = Role(row.role)
    if scope is not None and not SCOPED_ROLE_MAX.allows(role):
        role = SCOPED_ROLE_MAX
    return Principal(name=row.name, role=role, token_id=row.id, scope=scope)


def _usable(row: ApiToken | None, now: datetime) -> bool:
    return (
        row is not None
        and row.revoked_at is None
        and (row.expires_at is None or row.expires_at > now)
    )


def sign_in(st: Any, key: bytes, token: str) -> tuple[str, ConsoleSession] | None:
    """A signed cookie for a valid API token (and its session), or None."""
    token = token.strip()
    if not token:
        return None
    now = datetime.now(UTC)
    expires = int(time.time()) + SESSION_SECONDS
    sid = new_sid()
    payload: dict[str, Any]
    if token_matches(token, st.admin_token):
        payload = {"tid": BOOTSTRAP, "fp": fingerprint(key, st.admin_token)}
        who = ADMIN
    else:
        with st.db.session() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash(token)))
            if row is None or not _usable(row, now):
                return None
            row.last_used_at = now
            if row.expires_at is not None:
                expires = min(expires, int(row.expires_at.timestamp()))
            payload = {"tid": row.id}
            who = _principal(row)
    payload.update({"exp": expires, "sid": sid})
    with st.db.session() as s:
        # Sessions ended a day ago go, so the table stays small.
        s.execute(
            delete(ConsoleSessionRecord).where(
                ConsoleSessionRecord.expires_at < now - timedelta(days=1)
            )
        )
        s.add(
            ConsoleSessionRecord(
                id=record_id(sid),
                token_id=None if payload["tid"] == BOOTSTRAP else payload["tid"],
                created_at=now,
                expires_at=datetime.fromtimestamp(expires, UTC),
            )
        )
    return sign(key, payload), ConsoleSession(who, sid, expires)


def record_id(sid: str) -> str:
    """The catalog's name for a session: a hash, so the table holds no cookie."""
    return hashlib.sha256(f"console-session:{sid}".encode()).hexdigest()


def _live(s: Any, sid: str) -> bool:
    row = s.get(ConsoleSessionRecord, record_id(sid))
    return row is not None and row.revoked_at is None


def sign_out(st: Any, key: bytes, cookie: str | None) -> bool:
    """Revoke the session behind a cookie (for every copy of it); whether
    there was one to revoke."""
    data = unsign(key, cookie)
    sid = data.get("sid") if data else None
    if not sid:
        return False
    with st.db.session() as s:
        row = s.get(ConsoleSessionRecord, record_id(str(sid)))
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = datetime.now(UTC)
        return True


def resume(st: Any, key: bytes, cookie: str | None) -> ConsoleSession | None:
    """The session behind a cookie, if the cookie is ours, unexpired, and its
    token still valid (looked up now: a revoked token ends its sessions)."""
    data = unsign(key, cookie)
    if data is None:
        return None
    expires, sid, tid = data.get("exp"), data.get("sid"), data.get("tid")
    if not isinstance(expires, int) or expires <= time.time() or not sid or not tid:
        return None
    if tid == BOOTSTRAP:
        if not hmac.compare_digest(str(data.get("fp", "")), fingerprint(key, st.admin_token)):
            return None
        with st.db.session() as s:
            return ConsoleSession(ADMIN, sid, expires) if _live(s, sid) else None
    now = datetime.now(UTC)
    with st.db.session() as s:
        if not _live(s, sid):
            return None
        row = s.get(ApiToken, tid)
        if row is None or not _usable(row, now):
            return None
        if row.last_used_at is None or (now - _aware(row.last_used_at)).total_seconds() > 60:
            row.last_used_at = now  # at most one write a minute, as the API does
        return ConsoleSession(_principal(row), sid, expires)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
