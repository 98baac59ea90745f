"""The browser tracker's own tests (tracker/test, `node --test`), run with the suite."""

from __future__ import annotations

import shutil
import subprocess

from tests.integration.helpers import ROOT


def test_the_trackers_node_tests_pass() -> None:
    node = shutil.which("node")
    assert node is not None, "node is needed for the tracker's tests (scripts/setup.sh installs nodejs)"
    proc = subprocess.run([node, "--test", "test/"], cwd=ROOT / "tracker", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "# fail 0" in proc.stdout
