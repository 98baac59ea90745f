"""`livecopy demo --short` end to end, as `make demo` runs it: its own embedded stack, every
worker and the copy service as child processes, simulated shoppers over HTTP and Kafka, then
the plot and the summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_short_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "livecopy", "demo", "--short", "--no-live", "--duration", "70", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=420,
    )
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((out / "logs").glob("*.log"))) \
        if (out / "logs").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs

    png = out / "ctr_over_time.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["crashed"] == {}, logs
    assert summary["impressions"]["online"] > 0  # copies served by GET /v1/copy, shown, clicked or not
    assert summary["impressions"]["static"] > 0  # the holdout's static student
    assert summary["events"] > summary["impressions"]["online"]
    assert summary["versions"] and all(v["impressions"] > 0 for v in summary["versions"])
    # the trainer's fast path: at least two versions trained, gated and hot-swapped while traffic flowed
    assert len(summary["versions"]) >= 3, summary["versions"]
    assert summary["lift"] is not None and summary["lift"]["lo"] <= summary["lift"]["ratio"] <= summary["lift"]["hi"]
    text = (out / "summary.txt").read_text()
    assert "online / static = " in text and "95% CI" in text
    for arm in ("random", "static", "online", "oracle"):
        assert arm in text
    assert "summary.txt" in proc.stdout
