"""What every stream worker process does before its loop: check that Redis keeps acknowledged writes,
and serve its Prometheus metrics."""

from __future__ import annotations

import logging

from core.metrics import WorkerMetrics
from core.settings import Settings
from stream.redis_io import check_durability, redis_client


def worker_metrics(settings: Settings, name: str, metrics_port: int | None, log: logging.Logger) -> WorkerMetrics:
    check_durability(redis_client(settings.redis), settings.redis, log)
    metrics = WorkerMetrics(name)
    metrics.serve(metrics_port if metrics_port is not None else settings.worker.metrics_port)
    return metrics
