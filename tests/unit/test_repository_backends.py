"""Repository backends without a file server: config checks, mountinfo, the
mount command the hub would run (a fake ``mount`` records it)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sendense.core.errors import InvalidRequest
from sendense.storage import backends

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 253:0 / / rw,relatime - ext4 /dev/vda rw
90 27 0:50 / /srv/my\\040backups rw,relatime - nfs4 nas:/export/bk rw,vers=4.2
91 27 0:51 / /srv/smb rw,relatime shared:7 - cifs //nas/bk rw,vers=3.1.1
92 91 0:52 / /srv/smb rw,relatime - tmpfs tmpfs rw
"""


def test_mountinfo_is_parsed_with_escapes_and_overmounts(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    entry = backends.mount_at("/srv/my backups", info)
    assert entry is not None and entry.fstype == "nfs4" and entry.source == "nas:/export/bk"
    # The later mount on the same point hides the earlier one.
    top = backends.mount_at("/srv/smb", info)
    assert top is not None and top.fstype == "tmpfs"
    assert backends.mount_at("/srv", info) is None


@pytest.mark.parametrize(
    ("kind", "config", "public"),
    [
        ("local", {}, {}),
        ("nfs", {}, {}),
        (
            "nfs",
            {"server": "nas.example.net.", "export": "/srv/backup", "options": "vers=4.2,hard"},
            {"server": "nas.example.net", "export": "/srv/backup", "options": "vers=4.2,hard"},
        ),
        (
            "nfs",
            {"server": "[2001:db8::1]", "export": "/b"},
            {"server": "2001:db8::1", "export": "/b"},
        ),
        (
            "cifs",
            {
                "server": "10.0.0.5",
                "share": "/backups/hub1",
                "username": "svc",
                "password": "p w,=x",
            },
            {"server": "10.0.0.5", "share": "backups/hub1", "username": "svc"},
        ),
    ],
)
def test_valid_configs(kind: str, config: dict[str, Any], public: dict[str, Any]) -> None:
    stored, password = backends.validate_config(kind, config)
    assert stored == public
    assert password == config.get("password")


@pytest.mark.parametrize(
    ("kind", "config", "field"),
    [
        ("nfs", {"server": "a_b", "export": "/x"}, "config.server"),
        ("nfs", {"server": "a" * 64, "export": "/x"}, "config.server"),
        ("nfs", {"server": "nas", "export": "/x/../etc"}, "config.export"),
        ("nfs", {"server": "nas", "export": "/x y"}, "config.export"),
        ("nfs", {"server": "nas", "export": "/x", "options": "-o,rw"}, "config.options"),
        ("nfs", {"server": "nas", "export": "/x", "options": "rw,,hard"}, "config.options"),
        ("cifs", {"server": "nas", "share": "bk", "options": "user=root"}, "config.options"),
        (
            "cifs",
            {"server": "nas", "share": "bk", "username": "u", "password": ""},
            "config.password",
        ),
        ("cifs", {"server": "nas", "share": "b\\k"}, "config.share"),
        ("cifs", {"server": "nas", "share": "bk", "domain": "x\ny"}, "config.domain"),
        ("nfs", {"server": "nas", "export": "/x", "share": "bk"}, "config.share"),
    ],
)
def test_invalid_configs_name_the_field(kind: str, config: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        backends.validate_config(kind, config)
    assert e.value.details["fields"] == [field]
    assert field in e.value.message
    if config.get("password"):
        assert config["password"] not in e.value.message


def test_check_path() -> None:
    assert backends.check_path("/srv//backup/") == Path("/srv/backup")
    for bad in ("srv", "/srv/../etc", "/srv/\x01"):
        with pytest.raises(InvalidRequest):
            backends.check_path(bad)


def test_cifs_password_goes_through_a_private_file_never_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}
    mounted: list[backends.MountEntry] = []

    def fake_run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        seen["argv"] = argv
        opts = argv[argv.index("-o") + 1].split(",")
        cred = Path(next(o for o in opts if o.startswith("credentials=")).split("=", 1)[1])
        seen["cred_mode"] = stat.S_IMODE(os.stat(cred).st_mode)
        seen["cred"] = cred.read_text()
        seen["cred_path"] = cred
        mounted.append(backends.MountEntry(str(tmp_path / "mnt"), "cifs", "//nas/bk", "rw"))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(backends, "_run", fake_run)
    monkeypatch.setattr(backends, "mount_at", lambda path, *a: mounted[-1] if mounted else None)
    monkeypatch.setattr(backends.os, "geteuid", lambda: 0)
    monkeypatch.setattr(backends.shutil, "which", lambda name: "/usr/bin/" + name)
    config, password = backends.validate_config(
        "cifs",
        {
            "server": "nas",
            "share": "bk",
            "username": "svc",
            "password": "hunter2",
            "domain": "LAB",
            "options": "vers=3.1.1",
        },
    )
    backends.mount("cifs", tmp_path / "mnt", config, password, run_dir=tmp_path / "run")

    assert seen["argv"][:3] == ["mount", "-t", "cifs"]
    assert seen["argv"][-3:] == ["--", "//nas/bk", str(tmp_path / "mnt")]
    assert "hunter2" not in " ".join(seen["argv"])
    assert seen["argv"][seen["argv"].index("-o") + 1].endswith(",vers=3.1.1")
    assert seen["cred_mode"] == 0o600
    assert seen["cred"] == "username=svc\npassword=hunter2\ndomain=LAB\n"
    assert not seen["cred_path"].exists(), "the credentials file is removed after mount"
    assert (tmp_path / "mnt").is_dir()


def test_nfs_mount_command_and_a_failure_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argvs: list[list[str]] = []

    def failing(argv: list[str]) -> subprocess.CompletedProcess[str]:
        argvs.append(argv)
        return subprocess.CompletedProcess(argv, 32, "", "mount.nfs: Connection refused\n")

    monkeypatch.setattr(backends, "_run", failing)
    monkeypatch.setattr(backends, "mount_at", lambda path, *a: None)
    monkeypatch.setattr(backends.os, "geteuid", lambda: 0)
    monkeypatch.setattr(backends.shutil, "which", lambda name: "/usr/bin/" + name)
    config, _ = backends.validate_config("nfs", {"server": "nas", "export": "/srv/bk"})
    with pytest.raises(backends.MountFailed) as e:
        backends.mount("nfs", tmp_path / "m", config, None, run_dir=tmp_path)
    assert argvs == [["mount", "-t", "nfs", "--", "nas:/srv/bk", str(tmp_path / "m")]]
    assert e.value.code == "mount_failed" and "Connection refused" in e.value.message

    monkeypatch.setattr(backends.os, "geteuid", lambda: 1000)
    with pytest.raises(backends.MountFailed) as e:
        backends.mount("nfs", tmp_path / "m", config, None, run_dir=tmp_path)
    assert "root" in e.value.message
