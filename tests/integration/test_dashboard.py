"""The dashboard page in a real headless Chromium: it loads its local uPlot, polls /dashboard/data
(windowed header, CTR bands, version marks, robust axes) and draws."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis
from fastapi import FastAPI

from core.contracts import Event, GeneratedCopy
from core.settings import Settings
from services.api.app import create_app
from services.api.dashboard import VENDOR, VENDOR_ROUTE, FeedbackCtrSource, dashboard_extension, quantile
from stream.feedback.logic import aggregate_fields, copy_item, event_item, feedback_record
from stream.feedback.store import RedisFeedbackStore
from tests.copygen import ServerThread
from tests.feedback_data import click_event, copy_record, impression_event
from tests.integration.helpers import wait_until

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian `chromium` is needed for the dashboard test (scripts/setup.sh installs it with apt)"
    return path


def _fake_copy_route(app: FastAPI) -> None:
    @app.get("/v1/copy")
    async def copy() -> dict[str, str]:
        return {"text": "ok"}


SERVING = {"version": "v-base"}  # what the fake engine serves; a test switches it to see a version mark


@pytest.fixture
def served(settings: Settings) -> Iterator[str]:
    ctr = {"v-base": (400, 48), "v-online-1": (150, 27)}
    SERVING["version"] = "v-base"
    s = settings.model_copy(update={"api": settings.api.model_copy(update={"dashboard": False})})
    app = create_app(s, extensions=[_fake_copy_route, dashboard_extension(
        s, ctr_source=lambda: ctr, version_source=lambda: SERVING["version"], interval_s=0.2)])
    with ServerThread(app) as base:
        yield base


def test_quantile_of_buckets() -> None:
    bounds = [0.01, 0.02, 0.05, float("inf")]
    assert quantile(bounds, [0, 0, 0, 0], 0.5) is None
    assert quantile(bounds, [50, 100, 100, 100], 0.5) == pytest.approx(0.01)
    assert quantile(bounds, [0, 100, 100, 100], 0.99) == pytest.approx(0.0199)


def test_dashboard_renders_in_headless_chromium(served: str) -> None:
    for _ in range(30):
        urllib.request.urlopen(f"{served}/v1/copy", timeout=5).read()

    def data() -> dict[str, Any]:
        return cast(dict[str, Any], json.loads(urllib.request.urlopen(f"{served}/dashboard/data", timeout=5).read()))

    # sampled every 0.2 s: the interval that saw the requests shows them
    wait_until(lambda: any(p["copies_per_s"] > 0 for p in data()["points"]), 10, "a sample with copies/s > 0")
    SERVING["version"] = "v-online-1"  # the engine swapped versions: a mark
    wait_until(lambda: data()["marks"], 10, "a version mark")
    wait_until(lambda: data()["points"][-1]["copies_per_s"] == 0, 10, "a sample after the requests")
    d = data()
    online = d["ctr"][-1]["versions"]["v-online-1"]
    assert online["ctr"] == pytest.approx(27 / 150) and online["lo"] < 27 / 150 < online["hi"]  # Wilson 95%
    assert d["marks"][0]["version"] == "v-online-1" and d["marks"][0]["from"] == "v-base"
    assert d["model_version"] == "v-online-1"
    # The header: over a window (30 s; here the ~1-2 s since start), not the last 0.2 s sample, which is 0 by now
    h = d["header"]
    assert h["window_s"] == 30 and h["requests"] == 30
    assert h["copies_per_s"] == pytest.approx(30 / h["span_s"], rel=0.02)
    assert d["points"][-1]["copies_per_s"] == 0 and h["copies_per_s"] > 0
    assert h["ctr"]["version"] == "v-online-1" and h["ctr"]["lo"] < h["ctr"]["ctr"] < h["ctr"]["hi"]
    lo, hi = d["axes"]["ctr"]
    assert 0 <= lo < 0.12 and 0.18 < hi < 0.3  # the CTR axis spans the points, not 0..1
    assert d["axes"]["copies_per_s"][0] == 0 and d["axes"]["latency_ms"][0] == 0

    out = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, "--virtual-time-budget=8000", "--dump-dom", f"{served}/dashboard"],
        capture_output=True, text=True, timeout=90,
    )
    dom = out.stdout
    assert 'data-ready="1"' in dom, out.stderr[-2000:]
    assert 'data-version="v-online-1"' in dom and 'data-version="v-base"' in dom
    assert "0.1800" in dom  # CTR of v-online-1 in the versions table
    assert dom.count('class="uplot') == 3 and dom.count("<canvas") == 3  # three uPlot charts
    assert 'data-marks="1"' in dom and "(serving)" in dom


def test_the_page_loads_only_its_own_assets(served: str) -> None:
    html = urllib.request.urlopen(f"{served}/dashboard", timeout=5).read().decode()
    refs = re.findall(r"""<(?:script|link|img|iframe)[^>]*\b(?:src|href)=["']([^"']+)["']""", html)
    assert sorted(refs) == sorted(f"{VENDOR_ROUTE}/{name}" for name in VENDOR)
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert re.search(r"""fetch\(["']/dashboard/data["']""", html)  # the only request the script makes
    for name, media in VENDOR.items():
        with urllib.request.urlopen(f"{served}{VENDOR_ROUTE}/{name}", timeout=5) as r:
            assert r.headers["Content-Type"] == media and len(r.read()) > 1000
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{served}{VENDOR_ROUTE}/..%2Fdashboard.py", timeout=5)
    assert err.value.code == 404


def test_the_default_ctr_source_reads_the_joiners_aggregates_in_redis(settings: Settings) -> None:
    store = RedisFeedbackStore(redis.Redis.from_url(settings.redis.url), settings.feedback, settings.redis.key_prefix)
    t0 = 1_795_000_000_000
    items: list[Any] = [copy_item(GeneratedCopy.model_validate_json(copy_record(f"c{i}", model_version=f"v{i % 2}")))
             for i in range(6)]
    for i in range(6):  # v0 shows c0, c2, c4 (c0 clicked); v1 shows c1, c3, c5 (c1 and c3 clicked)
        items.append(event_item(Event.model_validate(impression_event(f"i{i}", f"c{i}", ts=t0))))
        if i in (0, 1, 3):
            items.append(event_item(Event.model_validate(click_event(f"i{i}", f"c{i}", ts=t0 + 1000))))
    store.apply([it for it in items if it is not None], t0)
    now = t0 + int((settings.feedback.window_s + settings.feedback.lateness_s) * 1000) + 1  # every window closed
    claimed = store.claim(now, "tok")
    assert len(claimed) == 6
    store.ack([(c, aggregate_fields(feedback_record(c))) for c in claimed], now)
    source = FeedbackCtrSource(settings)
    try:
        assert source() == {"v0": (3, 1), "v1": (3, 2)}  # impressions, clicks per model version
    finally:
        source.close()
