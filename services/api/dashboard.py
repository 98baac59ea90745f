"""The live dashboard of the copy service: ``GET /dashboard`` (a page) and ``GET /dashboard/data`` (JSON, admin).

A ``services.api.app.create_app`` extension. A background task samples, once a second, what this
process already measures -- ``GET /v1/copy`` requests (throughput) and their latency histogram
(p50/p99 per interval, from bucket deltas) -- the serving model version (a change is a version mark),
and, every few seconds, the CTR aggregates the feedback joiner keeps in Redis (impressions and clicks
per model version, with 95 % Wilson intervals). The header's figures are averaged over the last
``WINDOW_S`` seconds; the y axes span the 2nd-98th percentile of the points, padded (CTR after each
version's warm-up), so one early spike does not squash the rest. The page draws with uPlot, vendored
in ``services/api/static/vendor/`` and served at ``/dashboard/vendor/uplot/``: it works offline.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from core.settings import Settings
from services.api.auth import DENIALS, need
from services.api.state import state_of
from stream.feedback.store import RedisFeedbackStore
from stream.redis_io import redis_client

log = logging.getLogger(__name__)

CtrSource = Callable[[], dict[str, tuple[int, int]]]  # model version -> (impressions, clicks), cumulative
HistogramSource = Callable[[], "tuple[list[float], list[float], float] | None"]  # bounds, cumulative, count
VersionSource = Callable[[], "str | None"]  # the model version serving now
COPY_ROUTE = "/v1/copy"


class FeedbackCtrSource:
    """CTR per model version from the feedback joiner's Redis aggregates (a ``CtrSource``; close it)."""

    def __init__(self, settings: Settings) -> None:
        self.client = redis_client(settings.redis)
        self.store = RedisFeedbackStore(self.client, settings.feedback, settings.redis.key_prefix)

    def __call__(self) -> dict[str, tuple[int, int]]:
        by = self.store.stats().by.get("mv", {})
        return {str(v).split("@", 1)[-1]: (int(n), int(k)) for v, (n, k) in by.items()}

    def close(self) -> None:
        self.client.close()


def _histogram(app: FastAPI, route: str) -> tuple[list[float], list[float], float] | None:
    """(upper bounds, cumulative counts, count) of the API latency histogram for ``route``."""
    metrics = state_of(app).http
    if metrics is None:
        return None
    for fam in metrics.latency.collect():
        bounds: list[float] = []
        counts: list[float] = []
        for s in fam.samples:
            if s.name.endswith("_bucket") and s.labels.get("route") == route:
                le = s.labels["le"]
                bounds.append(float("inf") if le == "+Inf" else float(le))
                counts.append(float(s.value))
        if bounds:
            return bounds, counts, counts[-1]
    return None


def quantile(bounds: list[float], cum: list[float], q: float) -> float | None:
    """The ``q`` quantile (seconds) of a cumulative bucket histogram, interpolated inside the bucket."""
    total = cum[-1] if cum else 0.0
    if total <= 0:
        return None
    target = q * total
    prev_b, prev_c = 0.0, 0.0
    for b, c in zip(bounds, cum, strict=True):
        if c >= target:
            if b == float("inf"):
                return prev_b
            frac = (target - prev_c) / (c - prev_c) if c > prev_c else 1.0
            return prev_b + (b - prev_b) * frac
        prev_b, prev_c = b, c
    return prev_b


WINDOW_S = 30.0  # the header's figures: averaged over this window, not the last one-second sample
WARMUP_IMPRESSIONS = 100  # CTR points of a version with fewer impressions do not set the CTR axis
Z95 = 1.959964


def wilson(clicks: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval (95 % by default) of ``clicks`` / ``n``; None without impressions."""
    if n <= 0:
        return None
    p = clicks / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _percentile(xs: list[float], q: float) -> float:
    """The ``q`` quantile of sorted ``xs`` (linear interpolation)."""
    pos = q * (len(xs) - 1)
    i = int(pos)
    j = min(i + 1, len(xs) - 1)
    return xs[i] + (xs[j] - xs[i]) * (pos - i)


def robust_range(values: Iterable[float | None], *, lo_q: float = 0.02, hi_q: float = 0.98, pad: float = 0.15,
                 min_span: float = 0.0, floor: float | None = None, ceil: float | None = None,
                 from_zero: bool = False) -> list[float] | None:
    """An axis range from the ``lo_q``..``hi_q`` percentiles of ``values`` (a lone spike does not set it),
    widened to ``min_span`` around its centre, padded by ``pad`` of its span on each side, clamped to
    ``floor``/``ceil``; ``from_zero``: the axis starts at 0. None without values."""
    xs = sorted(v for v in values if v is not None and math.isfinite(v))
    if not xs:
        return None
    lo, hi = _percentile(xs, lo_q), _percentile(xs, hi_q)
    if from_zero:
        lo = 0.0
    if hi - lo < min_span:
        mid = (hi + lo) / 2
        lo, hi = (0.0, min_span) if from_zero else (mid - min_span / 2, mid + min_span / 2)
    span = hi - lo
    lo, hi = (lo if from_zero else lo - pad * span), hi + pad * span
    if floor is not None:
        lo = max(floor, lo)
    if ceil is not None:
        hi = min(ceil, hi)
    return [round(lo, 6), round(hi, 6)]


class Sampler:
    """Samples the copy route's throughput and latency once a call (``sample``), CTR per version every
    ``ctr_every_s``, and the serving version (a change is a version mark); ``data`` is the JSON."""

    def __init__(self, app: FastAPI, ctr: CtrSource | None, history: int = 900, ctr_every_s: float = 3.0, *,
                 histogram: HistogramSource | None = None, version: VersionSource | None = None,
                 clock: Callable[[], float] = time.time, window_s: float = WINDOW_S,
                 warmup_impressions: int = WARMUP_IMPRESSIONS) -> None:
        self.app = app
        self.ctr = ctr
        self.histogram: HistogramSource = histogram or (lambda: _histogram(app, COPY_ROUTE))
        self.version: VersionSource = version or (lambda: _serving_version(app))
        self.clock = clock
        self.window_s = window_s
        self.warmup_impressions = warmup_impressions
        self.points: deque[dict[str, Any]] = deque(maxlen=history)
        self.ctr_points: deque[dict[str, Any]] = deque(maxlen=history)
        self.marks: deque[dict[str, Any]] = deque(maxlen=100)
        self.ctr_every_s = ctr_every_s
        self.started = clock()
        # (time, cumulative buckets, count) per sample, for the windowed figures; [] = no histogram yet
        self._snaps: deque[tuple[float, list[float], float]] = deque([(self.started, [], 0.0)])
        self._bounds: list[float] = []
        self._last_ctr = float("-inf")
        self._serving: str | None = None
        self._lock = threading.Lock()

    def _since(self, now: float, window_s: float) -> tuple[float, list[float], float] | None:
        """(seconds, bucket deltas, requests) over the last ``window_s`` (at most what was sampled)."""
        base = self._snaps[0]
        for snap in self._snaps:  # the newest snapshot at or before the window's start
            if snap[0] <= now - window_s:
                base = snap
            else:
                break
        return self._delta(base, self._snaps[-1])

    def _delta(self, base: tuple[float, list[float], float],
               last: tuple[float, list[float], float]) -> tuple[float, list[float], float] | None:
        dt = last[0] - base[0]
        if dt <= 0:
            return None
        cum = last[1] or [0.0] * len(self._bounds)
        prev = base[1] or [0.0] * len(cum)  # no histogram then: nothing had been served
        return dt, [c - p for c, p in zip(cum, prev, strict=True)], last[2] - base[2]

    def _latency(self, delta: list[float]) -> tuple[float | None, float | None]:
        if not self._bounds or not delta:
            return None, None
        q50, q99 = quantile(self._bounds, delta, 0.5), quantile(self._bounds, delta, 0.99)
        return (None if q50 is None else round(q50 * 1000, 2)), (None if q99 is None else round(q99 * 1000, 2))

    def sample(self) -> None:
        """One sample (the sampler's thread): the sources are read first, then the series updated under the
        lock that ``data`` (the event loop) takes too."""
        now = self.clock()
        h = self.histogram()
        serving = self.version()
        by: dict[str, tuple[int, int]] | None = None
        if self.ctr is not None and now - self._last_ctr >= self.ctr_every_s:
            self._last_ctr = now
            try:
                by = self.ctr()
            except Exception as exc:  # Redis away: the page shows the gap
                log.debug("dashboard CTR read failed: %s", exc)
        with self._lock:
            self._record(now, h, serving, by)

    def _record(self, now: float, h: tuple[list[float], list[float], float] | None, serving: str | None,
                by: dict[str, tuple[int, int]] | None) -> None:
        if h is not None:
            bounds, cum, count = h
            self._bounds = bounds
        else:
            cum, count = [], 0.0
        self._snaps.append((now, cum, count))
        while len(self._snaps) > 2 and self._snaps[1][0] <= now - 2 * self.window_s:
            self._snaps.popleft()
        point: dict[str, Any] = {"t": round(now - self.started, 2), "ts": round(now, 3), "copies_per_s": 0.0,
                                 "copies_per_s_avg": 0.0, "p50_ms": None, "p99_ms": None}
        one = self._delta(self._snaps[-2], self._snaps[-1])  # the interval since the previous sample
        if one is not None:
            dt, delta, n = one
            point["copies_per_s"] = round(n / dt, 3)
            point["p50_ms"], point["p99_ms"] = self._latency(delta)
        win = self._since(now, self.window_s)
        if win is not None:
            point["copies_per_s_avg"] = round(win[2] / win[0], 3)
        self.points.append(point)
        if serving is not None and serving != self._serving:
            if self._serving is not None:  # the first version seen is where the chart starts, not a change
                self.marks.append({"t": point["t"], "ts": point["ts"], "version": serving, "from": self._serving})
            self._serving = serving
        if by is not None:
            versions = {}
            for v, (n, k) in by.items():
                band = wilson(k, n)
                versions[v] = {"impressions": n, "clicks": k, "ctr": (k / n if n else None),
                               "lo": None if band is None else round(band[0], 6),
                               "hi": None if band is None else round(band[1], 6)}
            self.ctr_points.append({"t": point["t"], "ts": point["ts"], "versions": versions})

    def header(self) -> dict[str, Any]:
        """The header's figures over the last ``window_s`` (copies/s, p50/p99) and the serving version's CTR."""
        now = self._snaps[-1][0]
        out: dict[str, Any] = {"window_s": self.window_s, "span_s": 0.0, "requests": 0, "copies_per_s": None,
                               "p50_ms": None, "p99_ms": None, "ctr": None}
        win = self._since(now, self.window_s)
        if win is not None:
            dt, delta, n = win
            out.update(span_s=round(dt, 2), requests=int(n), copies_per_s=round(n / dt, 3))
            out["p50_ms"], out["p99_ms"] = self._latency(delta)
        if self.ctr_points:
            last = self.ctr_points[-1]["versions"]
            v = self._serving if self._serving in last else None
            if v is None and last:  # not serving here (a dashboard beside the workers): the most shown
                v = max(last, key=lambda name: last[name]["impressions"])
            if v is not None:
                out["ctr"] = {"version": v, **last[v]}
        return out

    def axes(self) -> dict[str, list[float] | None]:
        """Robust y ranges: the 2nd-98th percentile of the points, padded, so that an early spike does not
        squash the rest. CTR: the points and their 95 % intervals (the reader sees the uncertainty) of versions
        past a warm-up of ``warmup_impressions``."""
        warm = [v for c in self.ctr_points for s in c["versions"].values()
                if s["ctr"] is not None and s["impressions"] >= self.warmup_impressions
                for v in (s["ctr"], s["lo"], s["hi"])]
        if not warm:
            warm = [s["ctr"] for c in self.ctr_points for s in c["versions"].values()]
        pts = list(self.points)
        return {
            "ctr": robust_range(warm, min_span=0.01, floor=0.0, ceil=1.0),
            "copies_per_s": robust_range([p["copies_per_s"] for p in pts], from_zero=True, min_span=1.0),
            "latency_ms": robust_range([p["p99_ms"] for p in pts] + [p["p50_ms"] for p in pts], from_zero=True,
                                       min_span=1.0),
        }

    def data(self) -> dict[str, Any]:
        engine = _engine(self.app)
        with self._lock:
            return {
                "model": getattr(engine, "model", None),
                "model_version": self._serving or getattr(engine, "version", None),
                "uptime_s": round(self.clock() - self.started, 1), "header": self.header(), "axes": self.axes(),
                "marks": list(self.marks), "points": list(self.points), "ctr": list(self.ctr_points),
            }


def _engine(app: FastAPI) -> Any:
    """The copy service's engine (None without one: a dashboard beside the workers, or in a test)."""
    return getattr(getattr(getattr(app.state, "livecopy", None), "copy", None), "engine", None)


def _serving_version(app: FastAPI) -> str | None:
    v = getattr(_engine(app), "version", None)
    return None if v is None else str(v)


# The page's only assets, served from the package (services/api/static/vendor/, see its README.md).
VENDOR = {
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}
VENDOR_ROUTE = "/dashboard/vendor/uplot"


def dashboard_extension(settings: Settings, *, ctr_source: CtrSource | None = None,
                        version_source: VersionSource | None = None,
                        interval_s: float = 1.0) -> Callable[[FastAPI], None]:
    """The ``create_app`` extension adding ``GET /dashboard``, its assets and ``GET /dashboard/data``.
    ``ctr_source`` (default: the feedback joiner's aggregates in Redis) gives CTR per model version;
    ``version_source`` (default: the copy engine's) the version serving, whose changes are marked."""

    def install(app: FastAPI) -> None:
        holder: dict[str, Any] = {}

        async def startup(app: FastAPI) -> None:
            src = ctr_source
            if src is None:
                src = holder["own_source"] = FeedbackCtrSource(settings)
            sampler = Sampler(app, src, version=version_source)
            state_of(app).dashboard = sampler

            async def loop() -> None:
                while True:
                    await asyncio.to_thread(sampler.sample)
                    await asyncio.sleep(interval_s)

            holder["task"] = asyncio.create_task(loop())

        async def shutdown(app: FastAPI) -> None:
            task = holder.pop("task", None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            own = holder.pop("own_source", None)
            if own is not None:
                own.close()

        state_of(app).startup.append(startup)
        state_of(app).shutdown.append(shutdown)

        @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
        async def page() -> HTMLResponse:
            html = holder.get("html")
            if html is None:  # read once, off the event loop (the page is static)
                html = holder["html"] = await asyncio.to_thread(
                    resources.files("services.api").joinpath("dashboard.html").read_text)
            return HTMLResponse(html)

        @app.get(VENDOR_ROUTE + "/{name}", include_in_schema=False)
        async def vendor(name: str) -> Response:
            media = VENDOR.get(name)
            if media is None:
                return Response(status_code=404)
            body = holder.get(name)
            if body is None:
                body = holder[name] = await asyncio.to_thread(
                    resources.files("services.api.static").joinpath("vendor", "uplot", name).read_bytes)
            return Response(body, media_type=media, headers={"Cache-Control": "public, max-age=86400"})

        @app.get("/dashboard/data", dependencies=[Depends(need("admin"))], responses=DENIALS)
        async def data(request: Request) -> Any:
            sampler = state_of(request).dashboard
            if sampler is None:
                return JSONResponse({"error": "starting"}, status_code=503)
            return sampler.data()

    return install
