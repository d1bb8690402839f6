"""The checked-in API reference (docs/api.md, docs/openapi.json) is what
``make docs`` generates from the hub's current routes and schemas.

A change to the API must come with ``make docs`` and the regenerated files in
the same commit; this test fails until then."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_api_docs.py"
FILES = ("api.md", "openapi.json")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.parametrize("name", FILES)
def test_api_docs_are_fresh(generated: Path, name: str) -> None:
    checked_in = ROOT / "docs" / name
    assert checked_in.exists(), f"docs/{name} is missing: run `make docs` and commit it"
    want = (generated / name).read_text()
    have = checked_in.read_text()
    if have != want:
        diff = difflib.unified_diff(
            have.splitlines(),
            want.splitlines(),
            f"docs/{name} (checked in)",
            f"docs/{name} (make docs)",
            lineterm="",
            n=1,
        )
        excerpt = "\n".join(list(diff)[:40])
        pytest.fail(
            f"docs/{name} is stale: the hub's API changed. Run `make docs` and commit "
            f"docs/api.md and docs/openapi.json.\n{excerpt}",
            pytrace=False,
        )


def test_gen_api_docs_check_mode(generated: Path, tmp_path: Path) -> None:
    """``gen_api_docs.py --check`` passes on fresh files and names stale ones."""

    def check(folder: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(SCRIPT), "--check", "--out", str(folder)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )

    assert check(generated).returncode == 0
    (tmp_path / "api.md").write_text((generated / "api.md").read_text() + "old\n")
    proc = check(tmp_path)
    assert proc.returncode == 1
    assert "api.md is stale" in proc.stderr and "openapi.json is stale" in proc.stderr
    assert "make docs" in proc.stderr
