"""The consume loop's lag metric with a real consumer on the real broker (position and cached watermarks)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from prometheus_client import generate_latest

from core.metrics import WorkerMetrics
from core.settings import Settings
from core.wire import Topics
from services.workers.profile import build_profile_loop
from tests.integration.helpers import produce

pytestmark = pytest.mark.integration


class Recording(WorkerMetrics):
    """WorkerMetrics that also keep every lag report."""

    def __init__(self, worker: str) -> None:
        super().__init__(worker)
        self.reports: list[dict[tuple[str, int], int]] = []

    def lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        self.reports.append(dict(lags))
        super().lag(lags)


def test_lag_is_reported_and_drops_to_zero(settings: Settings) -> None:
    events = [{"event_id": f"e{i}", "type": "page_view", "user_id": f"u{i % 7}", "ts": 1_795_000_000_000 + i}
              for i in range(300)]
    produce(settings, events)
    metrics = Recording("profile")
    loop = build_profile_loop(settings, max_batch=50, metrics=metrics)
    loop.lag_interval_s = 0.0
    seen = metrics.reports
    loop.start()
    try:
        for _ in range(400):
            loop.step()
            if loop.records >= 300 and seen and seen[-1] and not any(seen[-1].values()):
                break
    finally:
        loop.close()
    topic = Topics.from_settings(settings.topics).events
    assert any(sum(s.values()) > 0 for s in seen), seen[:5]  # behind while reading
    assert seen[-1] and set(seen[-1].values()) == {0} and {t for t, _ in seen[-1]} == {topic}
    assert 'livecopy_consumer_lag{partition="0"' in generate_latest(metrics.registry).decode()
