"""The live dashboard of the copy service: ``GET /dashboard`` (a page) and ``GET /dashboard/data`` (JSON).

A ``services.api.app.create_app`` extension. A background task samples, once a second, what this
process already measures -- ``GET /v1/copy`` requests (throughput) and their latency histogram
(p50/p99 per interval, from bucket deltas) -- and, every few seconds, the CTR aggregates the
feedback joiner keeps in Redis (impressions and clicks per model version). It keeps the last
``history`` samples in memory; the page (plain JavaScript + canvas, no external assets: it works
offline) polls the JSON and draws CTR over time per model version, copies/s and latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from core.settings import Settings
from services.api.auth import DENIALS, need
from services.api.state import state_of
from stream.feedback.store import RedisFeedbackStore
from stream.redis_io import redis_client

log = logging.getLogger(__name__)

CtrSource = Callable[[], dict[str, tuple[int, int]]]  # model version -> (impressions, clicks), cumulative
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


class Sampler:
    def __init__(self, app: FastAPI, ctr: CtrSource | None, history: int = 900, ctr_every_s: float = 3.0) -> None:
        self.app = app
        self.ctr = ctr
        self.points: deque[dict[str, Any]] = deque(maxlen=history)
        self.ctr_points: deque[dict[str, Any]] = deque(maxlen=history)
        self.ctr_every_s = ctr_every_s
        self.started = time.time()
        # (time, cumulative buckets, count) of the previous sample; [] = no histogram yet (nothing served)
        self._prev: tuple[float, list[float], float] | None = (self.started, [], 0.0)
        self._last_ctr = 0.0

    def sample(self) -> None:
        now = time.time()
        h = _histogram(self.app, COPY_ROUTE)
        point: dict[str, Any] = {"t": round(now - self.started, 2), "copies_per_s": 0.0, "p50_ms": None,
                                 "p99_ms": None}
        if h is not None:
            bounds, cum, count = h
            if self._prev is not None:
                pt, pcum, pcount = self._prev
                dt = max(1e-6, now - pt)
                pcum = pcum or [0.0] * len(cum)  # no histogram at the previous sample: nothing served yet
                delta = [c - p for c, p in zip(cum, pcum, strict=True)]
                point["copies_per_s"] = round((count - pcount) / dt, 3)
                q50, q99 = quantile(bounds, delta, 0.5), quantile(bounds, delta, 0.99)
                point["p50_ms"] = None if q50 is None else round(q50 * 1000, 2)
                point["p99_ms"] = None if q99 is None else round(q99 * 1000, 2)
            self._prev = (now, cum, count)
        else:
            # The route's histogram appears with its first request: remember that until now none was served,
            # so that the requests before the next sample are counted.
            self._prev = (now, [], 0.0)
        self.points.append(point)
        if self.ctr is not None and now - self._last_ctr >= self.ctr_every_s:
            self._last_ctr = now
            try:
                by = self.ctr()
            except Exception as exc:  # Redis away: the page shows the gap
                log.debug("dashboard CTR read failed: %s", exc)
                return
            self.ctr_points.append({"t": point["t"], "versions": {
                v: {"impressions": n, "clicks": k, "ctr": (k / n if n else None)} for v, (n, k) in by.items()}})

    def data(self) -> dict[str, Any]:
        copy = state_of(self.app).copy
        engine = getattr(copy, "engine", None)
        return {
            "model": getattr(engine, "model", None), "model_version": getattr(engine, "version", None),
            "uptime_s": round(time.time() - self.started, 1), "points": list(self.points),
            "ctr": list(self.ctr_points),
        }


def dashboard_extension(settings: Settings, *, ctr_source: CtrSource | None = None,
                        interval_s: float = 1.0) -> Callable[[FastAPI], None]:
    """The ``create_app`` extension adding ``GET /dashboard`` and ``GET /dashboard/data``.
    ``ctr_source`` (default: the feedback joiner's aggregates in Redis) gives CTR per model version."""

    def install(app: FastAPI) -> None:
        holder: dict[str, Any] = {}

        async def startup(app: FastAPI) -> None:
            src = ctr_source
            if src is None:
                src = holder["own_source"] = FeedbackCtrSource(settings)
            sampler = Sampler(app, src)
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

        @app.get("/dashboard/data", dependencies=[Depends(need("admin"))], responses=DENIALS)
        async def data(request: Request) -> Any:
            sampler = state_of(request).dashboard
            if sampler is None:
                return JSONResponse({"error": "starting"}, status_code=503)
            return sampler.data()

    return install
