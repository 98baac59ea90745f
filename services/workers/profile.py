"""The profile worker: `livecopy.events` -> per-user profiles in Redis.

`ProfileProcessor` is transport-free (records in, effects in a `ProfileStore`, rejects out), so it
is unit-tested with the in-memory store; `run_profile_worker` wires it to Kafka and Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Producer

from core.metrics import WorkerMetrics
from core.process import install_stop_signals, tune_gc_for_latency, wall_ms
from core.settings import ProfileSettings, Settings
from core.wire import Record, Rejection, Topics, decode_event
from services.workers.common import worker_metrics
from stream.kafka_io import BatchLoop, Outcome, TransientError, group_consumer, loop_options, producer_config
from stream.profile.logic import ProfileUpdate, event_update
from stream.profile.store import ProfileStore, RedisProfileStore
from stream.redis_io import TransientStoreError, redis_client

log = logging.getLogger(__name__)

GROUP = "profile"


class ProfileProcessor:
    def __init__(
        self,
        store: ProfileStore,
        cfg: ProfileSettings,
        *,
        now_ms: Callable[[], int] = wall_ms,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.now_ms = now_ms
        self.metrics = metrics
        self.applied = 0
        self.duplicates = 0

    def process(self, records: Sequence[Record]) -> Outcome:
        updates: list[ProfileUpdate] = []
        rejected: list[tuple[Record, Rejection]] = []
        now = self.now_ms()
        horizon = now + int(self.cfg.max_future_s * 1000)
        for rec in records:
            try:
                ev = decode_event(rec.key, rec.value)
                if ev.ts > horizon:
                    ahead = (ev.ts - now) / 1000
                    raise Rejection("future_timestamp", f"ts {ev.ts} is {ahead:.0f} s ahead of the worker's clock "
                                                        f"(profile.max_future_s {self.cfg.max_future_s:g})")
                updates.append(event_update(ev, self.cfg))
            except Rejection as rej:
                rejected.append((rec, rej))
        try:
            flags = self.store.apply(updates, now)
        except TransientStoreError as exc:
            raise TransientError(str(exc)) from exc
        applied = sum(flags)
        self.applied += applied
        self.duplicates += len(flags) - applied
        if self.metrics:
            self.metrics.count("applied", applied)
            self.metrics.count("duplicate", len(flags) - applied)
        return Outcome(rejected)

    def healthy(self) -> bool:
        return self.store.ping()


def build_profile_loop(settings: Settings, *, max_batch: int | None = None, group_suffix: str = "",
                       metrics: WorkerMetrics | None = None, **consumer_overrides: Any) -> BatchLoop:
    topics = Topics.from_settings(settings.topics)
    store = RedisProfileStore(redis_client(settings.redis), settings.profile, settings.redis.key_prefix)
    processor = ProfileProcessor(store, settings.profile, metrics=metrics)
    return BatchLoop(
        group_consumer(settings, GROUP, group_suffix, **consumer_overrides), Producer(producer_config(settings.kafka)),
        processor, topics=[topics.events], dlq_topic=topics.dlq, max_batch=max_batch or settings.worker.max_batch,
        metrics=metrics, **loop_options(settings.worker),
    )


def run_profile_worker(settings: Settings, *, max_batch: int | None = None, metrics_port: int | None = None) -> None:
    metrics = worker_metrics(settings, "profile", metrics_port, log)
    loop = build_profile_loop(settings, max_batch=max_batch, metrics=metrics)
    install_stop_signals(loop.stop)
    tune_gc_for_latency()
    log.info("profile worker consuming %s (batch <= %d)", loop.topics, loop.max_batch)
    loop.run()
    log.info("profile worker stopped after %d records in %d batches", loop.records, loop.batches)
