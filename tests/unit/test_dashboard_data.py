"""The dashboard's figures without a server: windowed header, robust axes, Wilson bands, version marks."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI

from services.api.dashboard import Sampler, robust_range, wilson

BOUNDS = [0.01, 0.02, 0.05, float("inf")]


class Fake:
    """A clock, a cumulative latency histogram, CTR aggregates and a serving version to drive a Sampler."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.cum = [0.0, 0.0, 0.0, 0.0]
        self.ctr: dict[str, tuple[int, int]] = {}
        self.version: str | None = "1.0.0"

    def serve(self, n: int, bucket: int = 0) -> None:
        for i in range(bucket, len(self.cum)):
            self.cum[i] += n

    def sampler(self, **kw: Any) -> Sampler:
        return Sampler(FastAPI(), lambda: dict(self.ctr), ctr_every_s=0.0, clock=lambda: self.now,
                       histogram=lambda: (BOUNDS, list(self.cum), self.cum[-1]) if self.cum[-1] else None,
                       version=lambda: self.version, **kw)


def test_wilson_interval() -> None:
    assert wilson(0, 0) is None
    lo, hi = wilson(13, 100)  # type: ignore[misc]
    assert lo < 0.13 < hi and lo == pytest.approx(0.0776, abs=1e-3) and hi == pytest.approx(0.2098, abs=1e-3)
    lo, hi = wilson(0, 10)  # type: ignore[misc]
    assert lo == 0.0 and 0 < hi < 0.35


def test_robust_range_ignores_a_single_spike() -> None:
    values = [1.1] + [0.12 + 0.02 * (i % 10) / 10 for i in range(200)]  # one early spike, then 0.12-0.14
    lo, hi = robust_range(values, floor=0.0, ceil=1.0)  # type: ignore[misc]
    assert 0.10 < lo < 0.12 and 0.14 < hi < 0.16
    assert robust_range([]) is None and robust_range([None]) is None
    assert robust_range([5.0, 5.0], min_span=1.0, pad=0.0) == [4.5, 5.5]
    assert robust_range([3.0, 4.0], from_zero=True, pad=0.0) == [0.0, pytest.approx(3.98)]


def test_header_is_averaged_over_the_window_not_the_last_sample() -> None:
    f = Fake()
    s = f.sampler(window_s=30.0)
    for sec in range(40):
        f.now += 1.0
        if sec < 39:
            f.serve(10)  # 10 copies/s, each under 10 ms; none in the last second
        s.sample()
    assert s.points[-1]["copies_per_s"] == 0.0  # the last one-second sample
    h = s.header()
    assert h["window_s"] == 30.0 and h["span_s"] == pytest.approx(30.0)
    assert h["copies_per_s"] == pytest.approx(290 / 30, abs=1e-3) and h["requests"] == 290
    assert h["p99_ms"] is not None and h["p99_ms"] <= 10.0
    assert s.points[-1]["copies_per_s_avg"] == pytest.approx(290 / 30, abs=1e-3)


def test_ctr_bands_axis_and_version_marks() -> None:
    f = Fake()
    s = f.sampler(warmup_impressions=100)
    f.ctr = {"1.0.0": (3, 3)}  # an early spike: CTR 1.0 on 3 impressions
    f.now += 1
    s.sample()
    for i in range(1, 30):
        f.ctr = {"1.0.0": (100 * i, 13 * i)}
        if i == 20:
            f.version = "1.0.1"
        if i >= 20:
            f.ctr["1.0.1"] = (50 * (i - 19), 7 * (i - 19))
        f.now += 1
        s.sample()
    d = s.data()
    last = d["ctr"][-1]["versions"]["1.0.0"]
    assert last["ctr"] == pytest.approx(0.13) and last["lo"] < 0.13 < last["hi"]
    lo, hi = d["axes"]["ctr"]
    assert 0.05 < lo < 0.12 and 0.14 < hi < 0.25  # not 0..1.1: the warm-up spike is left out (bands are in)
    assert d["marks"] == [{"t": pytest.approx(21.0), "ts": pytest.approx(f.now - 9), "version": "1.0.1",
                           "from": "1.0.0"}]
    assert d["model_version"] == "1.0.1" and d["header"]["ctr"]["version"] == "1.0.1"
