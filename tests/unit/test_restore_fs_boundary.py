"""The AGPL parsers stay in the worker: the hub-side modules import no dissect."""

from __future__ import annotations

import subprocess
import sys


def test_client_side_imports_no_parser() -> None:
    code = (
        "import sys\n"
        "import sendense.restore.fs\n"
        "import sendense.restore.fs.client, sendense.restore.fs.models, sendense.restore.fs.paths\n"
        "import sendense.restore.fs.source\n"
        "bad = sorted(m for m in sys.modules if m == 'dissect' or m.startswith('dissect.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_only_restore_fs_imports_dissect() -> None:
    from pathlib import Path

    import sendense

    root = Path(sendense.__file__).parent
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if ("import dissect" in path.read_text() or "from dissect" in path.read_text())
        and path.parent != root / "restore" / "fs"
    ]
    assert offenders == []
