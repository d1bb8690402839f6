"""Credentials in source configs: split at any depth, merged back whole, and
kept out of messages in every spelling."""

from __future__ import annotations

from pathlib import Path

from sendense.secretbox import (
    SecretBox,
    is_secret_key,
    merge_secrets,
    redact,
    scrub,
    secret_values,
    split_secrets,
)

CONFIG = {
    "vms": [
        {"name": "a", "qmp_socket": "/a.qmp", "password": "pa"},
        {"name": "b", "qmp_socket": "/b.qmp"},
    ],
    "api_key": "k1",
    "auth": {"method": "token", "opts": [{"Admin-Token": "t1", "port": 443}], "user": "u"},
    "site": "lab",
    "disk_key": 2000,
}


def test_secret_key_names() -> None:
    for key in ("password", "PASSWORD", "admin_password", "vcenter-token", "api_key", "ApiKey"):
        assert is_secret_key(key), key
    for key in ("disk_key", "qmp_socket", "name", "tokens_used", "keyboard", 3):
        assert not is_secret_key(key), key


def test_split_at_any_depth_and_merge_back_whole(tmp_path: Path) -> None:
    public, secret = split_secrets(CONFIG)
    assert public == redact(CONFIG)
    assert public == {
        "vms": [{"name": "a", "qmp_socket": "/a.qmp"}, {"name": "b", "qmp_socket": "/b.qmp"}],
        "auth": {"method": "token", "opts": [{"port": 443}], "user": "u"},
        "site": "lab",
        "disk_key": 2000,
    }
    assert set(secret) == {"vms", "api_key", "auth"}
    box = SecretBox(tmp_path / "secret.key")
    assert merge_secrets(public, box.decrypt(box.encrypt(secret))) == CONFIG
    assert sorted(secret_values(CONFIG)) == ["k1", "pa", "t1"]
    assert split_secrets({"site": "x"}) == ({"site": "x"}, {})


def test_scrub_every_spelling() -> None:
    token = "abc\ndef-tok"
    for text in (
        f"got {token}",
        f"Illegal header value {('Bearer ' + token).encode()!r}",
        f"value {token!r}",
        '{"t": "abc\\ndef-tok"}',
    ):
        out = scrub(text, [token])
        assert "def-tok" not in out and "***" in out, (text, out)
    assert scrub("nothing here", ["", "zz"]) == "nothing here"
