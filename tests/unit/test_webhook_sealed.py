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
