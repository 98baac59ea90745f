"""``livecopy worker responses``: `livecopy.feedback` -> each shopper's style-response counters in Redis
(the BatchLoop processor and the worker process; the merge and the store are in ``stream.responses``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Producer

from core.metrics import WorkerMetrics
from core.process import install_stop_signals, wall_ms
from core.settings import Settings
from core.wire import Record, Rejection, Topics, decode_feedback
from services.workers.common import worker_metrics
from stream.kafka_io import BatchLoop, Outcome, TransientError, group_consumer, loop_options, producer_config
from stream.redis_io import TransientStoreError, redis_client
from stream.responses.logic import ResponseStore, ResponseUpdate, response_update
from stream.responses.store import RedisResponseStore

log = logging.getLogger(__name__)

GROUP = "responses"


class ResponseProcessor:
    """Feedback records in, style-response counters out (``BatchLoop`` processor)."""

    def __init__(self, store: ResponseStore, *, now_ms: Callable[[], int] = wall_ms,
                 metrics: WorkerMetrics | None = None) -> None:
        self.store = store
        self.now_ms = now_ms
        self.metrics = metrics
        self.applied = self.duplicates = self.skipped = 0

    def process(self, records: Sequence[Record]) -> Outcome:
        updates: list[ResponseUpdate] = []
        rejected: list[tuple[Record, Rejection]] = []
        skipped = 0
        for r in records:
            try:
                u = response_update(decode_feedback(r.value))
            except Rejection as rej:
                rejected.append((r, rej))
                continue
            if u is None:
                skipped += 1
            else:
                updates.append(u)
        try:
            flags = self.store.apply(updates, self.now_ms())
        except TransientStoreError as exc:
            raise TransientError(str(exc)) from exc
        applied = sum(flags)
        self.applied += applied
        self.duplicates += len(flags) - applied
        self.skipped += skipped
        if self.metrics:
            self.metrics.count("applied", applied)
            self.metrics.count("duplicate", len(flags) - applied)
            self.metrics.count("skipped", skipped)
        return Outcome(rejected)

    def healthy(self) -> bool:
        return self.store.ping()


def build_responses_loop(settings: Settings, *, group_suffix: str = "", metrics: WorkerMetrics | None = None,
                         **consumer_overrides: Any) -> BatchLoop:
    topics = Topics.from_settings(settings.topics)
    store = RedisResponseStore(redis_client(settings.redis), settings.responses, settings.redis.key_prefix)
    return BatchLoop(
        group_consumer(settings, GROUP, group_suffix, **consumer_overrides), Producer(producer_config(settings.kafka)),
        ResponseProcessor(store, metrics=metrics), topics=[topics.feedback], dlq_topic=topics.dlq,
        max_batch=settings.worker.max_batch, metrics=metrics, **loop_options(settings.worker),
    )


def run_responses_worker(settings: Settings, *, metrics_port: int | None = None) -> None:
    metrics = worker_metrics(settings, "responses", metrics_port, log)
    loop = build_responses_loop(settings, metrics=metrics)
    install_stop_signals(loop.stop)
    log.info("responses worker consuming %s", loop.topics)
    loop.run()
    log.info("responses worker stopped after %d records in %d batches", loop.records, loop.batches)
