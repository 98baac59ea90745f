"""The catalog worker: the compacted `livecopy.catalog` topic -> the product catalog in Redis.

`CatalogProcessor` is transport-free (records in, changes in a `CatalogStore`, rejects out), unit-
tested with the in-memory store; `run_catalog_worker` wires it to Kafka and Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Producer

from core.metrics import WorkerMetrics
from core.process import install_stop_signals
from core.settings import Settings
from core.wire import Record, Topics
from services.workers.common import worker_metrics
from stream.catalog.logic import catalog_changes
from stream.catalog.store import CatalogStore, RedisCatalogStore
from stream.copy_store import CopyKeys
from stream.kafka_io import BatchLoop, Outcome, TransientError, group_consumer, loop_options, producer_config
from stream.redis_io import TransientStoreError, redis_client

log = logging.getLogger(__name__)

GROUP = "catalog"


class CatalogProcessor:
    def __init__(self, store: CatalogStore, *, metrics: WorkerMetrics | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.upserted = 0
        self.deleted = 0

    def process(self, records: Sequence[Record]) -> Outcome:
        ch = catalog_changes(records)
        try:
            self.store.apply(ch.upserts, ch.deletes)
        except TransientStoreError as exc:
            raise TransientError(str(exc)) from exc
        self.upserted += len(ch.upserts)
        self.deleted += len(ch.deletes)
        if self.metrics:
            self.metrics.count("applied", len(ch.upserts) + len(ch.deletes))
        return Outcome(ch.rejected)

    def healthy(self) -> bool:
        return self.store.ping()


def build_catalog_loop(
    settings: Settings, *, metrics: WorkerMetrics | None = None, group_suffix: str = "", **consumer_overrides: Any
) -> BatchLoop:
    topics = Topics.from_settings(settings.topics)
    keys = CopyKeys(settings.redis.key_prefix, settings.generation.catalog_key)
    processor = CatalogProcessor(RedisCatalogStore(redis_client(settings.redis), keys.catalog), metrics=metrics)
    overrides = {"auto.offset.reset": "earliest", **consumer_overrides}  # a new group reads the whole catalog
    return BatchLoop(
        group_consumer(settings, GROUP, group_suffix, **overrides),
        Producer(producer_config(settings.kafka)),
        processor,
        topics=[topics.catalog],
        dlq_topic=topics.dlq,
        max_batch=settings.worker.max_batch,
        metrics=metrics,
        **loop_options(settings.worker),
    )


def run_catalog_worker(settings: Settings, *, metrics_port: int | None = None) -> None:
    metrics = worker_metrics(settings, "catalog", metrics_port, log)
    loop = build_catalog_loop(settings, metrics=metrics)
    install_stop_signals(loop.stop)
    log.info("catalog worker consuming %s", loop.topics)
    loop.run()
    log.info("catalog worker stopped after %d records in %d batches", loop.records, loop.batches)
