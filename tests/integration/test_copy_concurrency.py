"""200 concurrent uncached GET /v1/copy: each gets a copy or a fast 503 with Retry-After, never a Redis
error; the API's Redis pool is bounded and waits for a free connection instead of failing at once."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from core.catalog import Catalog
from core.settings import Settings
from services.api.app import create_app
from services.api.copy import copy_extension
from tests.copygen import ServerThread, copy_settings, save_tiny_student

pytestmark = pytest.mark.integration

P = Catalog.generate().products[:50]


async def burst(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=n)) as http:
        return await asyncio.gather(*(http.get("/v1/copy", params={"user_id": f"burst-{i}",
                                                                    "product_id": P[i % len(P)].product_id})
                                      for i in range(n)))


@pytest.mark.parametrize("pool,timeout_s", [(64, 5.0), (2, 0.05)])
def test_a_burst_of_uncached_requests_gets_copies_or_fast_503s(settings: Settings, tmp_path: Path, pool: int,
                                                               timeout_s: float) -> None:
    model = save_tiny_student(tmp_path / "v1", "v1", seed=1)
    s = settings.model_copy(update={
        "generation": copy_settings(model_dir=model, candidates=2, max_new_tokens=6, mc_draws=10, hot_reload=False,
                                    max_queue=64),
        "api": settings.api.model_copy(update={"redis_connections": pool, "redis_pool_wait_s": timeout_s})})
    with ServerThread(create_app(s, extensions=[copy_extension(s)]), s.api) as url:
        responses = asyncio.run(burst(url, 200))
        metrics = httpx.get(url + "/metrics").text
    codes = Counter(r.status_code for r in responses)
    assert set(codes) <= {200, 503}, codes
    errors = Counter(r.json()["error"] for r in responses if r.status_code == 503)
    assert set(errors) <= {"overloaded", "busy", "deadline"}, errors  # never "unavailable: redis ..."
    assert all(r.headers.get("Retry-After") == "1" for r in responses if r.status_code == 503)
    assert codes[200] > 0
    assert 'livecopy_copy_refused_total{reason="redis"}' not in metrics
    print(f"\npool {pool}, wait {timeout_s} s: {dict(codes)} {dict(errors)}")
