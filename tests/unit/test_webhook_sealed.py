"""A webhook's credentials at rest (notify/sealed.py): the URL's password
leaves the stored URL, and rows written before that still read as they were."""

from __future__ import annotations

from pathlib import Path

import pytest

from sendense.notify.sealed import credentials, seal, shown_url, unseal
from sendense.secretbox import SecretBox


@pytest.fixture
def box(tmp_path: Path) -> SecretBox:
    return SecretBox(tmp_path / "secret.key")


def test_a_url_without_password_is_stored_as_given(box: SecretBox) -> None:
    url, sealed = seal(box, "https://alerts.example/h?x=1", "s" * 20)
    assert url == "https://alerts.example/h?x=1"
    assert sealed is not None and "s" * 20 not in sealed
    assert unseal(box, url, sealed) == ("https://alerts.example/h?x=1", "s" * 20)
    assert seal(box, "https://alerts.example/h", None) == ("https://alerts.example/h", None)


@pytest.mark.parametrize("secret", ["k" * 24, None])
def test_a_url_password_is_sealed_with_the_secret(box: SecretBox, secret: str | None) -> None:
    given = "https://bot:p%40ss-w0rd@alerts.example:8443/h"
    url, sealed = seal(box, given, secret)
    assert url == "https://bot:***@alerts.example:8443/h" == shown_url(given)
    assert sealed is not None and "p%40ss-w0rd" not in sealed
    assert credentials(box, sealed) == (secret, "p%40ss-w0rd")
    assert unseal(box, url, sealed) == (given, secret)


def test_a_row_written_before_sealing_reads_as_it_was(box: SecretBox) -> None:
    """The old format: the password in the stored URL, the secret alone."""
    old_url = "https://bot:old-pw@alerts.example/h"
    assert unseal(box, old_url, box.encrypt("k" * 24)) == (old_url, "k" * 24)
    assert unseal(box, old_url, None) == (old_url, None)


def test_the_hub_seals_rows_stored_before_sealing(box: SecretBox, tmp_path: Path) -> None:
    """A catalog from before: the URL's password in the row, in clear. At
    start the hub seals it; the webhook still posts to the same URL."""
    from sendense.catalog.db import Database
    from sendense.catalog.models import Webhook
    from sendense.notify.sealed import seal_stored_urls

    db = Database(f"sqlite:///{tmp_path / 'catalog.db'}")
    db.upgrade()
    old_url = "https://bot:old-pw-4711@alerts.example/h"
    with db.session() as s:
        s.add(Webhook(id="w1", url=old_url, events=["job.failed"], secret_encrypted=None))
        s.add(Webhook(id="w2", url="https://alerts.example/x", events=["job.failed"]))
    assert seal_stored_urls(db, box) == 1
    assert seal_stored_urls(db, box) == 0  # once is enough
    with db.session() as s:
        hook = s.get(Webhook, "w1")
        assert hook is not None and hook.url == "https://bot:***@alerts.example/h"
        assert unseal(box, hook.url, hook.secret_encrypted) == (old_url, None)
        other = s.get(Webhook, "w2")
        assert other is not None and other.url == "https://alerts.example/x"
    assert b"old-pw-4711" not in (tmp_path / "catalog.db").read_bytes()
