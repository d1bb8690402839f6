"""Queries of the api_tokens table. Only the SHA-256 of a secret is stored."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.orm import Session

from sendense.catalog.models import ApiToken

# last_used_at is written at most this often per token (a write per request
# would make every read of the API a write).
TOUCH_EVERY = timedelta(minutes=1)


class TokenStore:
    def __init__(self, s: Session) -> None:
        self.s = s

    def get(self, token_id: str) -> ApiToken | None:
        return self.s.get(ApiToken, token_id)

    def by_hash(self, token_hash: str) -> ApiToken | None:
        return self.s.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash))

    def live_by_name(self, name: str) -> ApiToken | None:
        """The token of that name that is not revoked, if any."""
        return self.s.scalar(
            select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None)).limit(1)
        )

    def list(self, *, include_revoked: bool = False) -> Sequence[ApiToken]:
        q = select(ApiToken)
        if not include_revoked:
            q = q.where(ApiToken.revoked_at.is_(None))
        return self.s.scalars(q.order_by(ApiToken.created_at.desc(), ApiToken.id.desc())).all()

    def count(self) -> int:
        return self.s.scalar(select(func.count()).select_from(ApiToken)) or 0

    def lock_names(self) -> None:
        """Serialize token creations (a name is unique among live tokens, and
        the table has no constraint that can say so).

        PostgreSQL: a transaction-scoped advisory lock (every hub process
        sharing the catalog takes the same key). SQLite: a write first, so the
        transaction holds the database's write lock from here on.
        """
        if self.s.get_bind().dialect.name == "sqlite":
            self.s.execute(update(ApiToken).where(text("1 = 0")).values(name=ApiToken.name))
        else:
            self.s.execute(select(func.pg_advisory_xact_lock(func.hashtext("sendense.api_tokens"))))

    def touch(self, token_id: str, now: datetime) -> None:
        """Record a use, unless one was recorded less than `TOUCH_EVERY` ago."""
        self.s.execute(
            update(ApiToken)
            .where(
                ApiToken.id == token_id,
                or_(ApiToken.last_used_at.is_(None), ApiToken.last_used_at < now - TOUCH_EVERY),
            )
            .values(last_used_at=now)
        )

    def revoke(self, token_id: str, now: datetime) -> None:
        """Set revoked_at once (a second revoke keeps the first time)."""
        self.s.execute(
            update(ApiToken)
            .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
            .values(revoked_at=now)
        )

    # Names used by hub/tokens/service.py.
    def by_name(self, name: str) -> ApiToken | None:
        return self.live_by_name(name)

    def all(self, *, include_revoked: bool = False) -> Sequence[ApiToken]:
        return self.list(include_revoked=include_revoked)
