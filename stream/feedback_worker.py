"""The feedback joiner worker: `livecopy.events` (impressions, clicks) + `livecopy.copy` ->
`livecopy.feedback`, one labelled record per impression.

`FeedbackProcessor` is transport-free apart from a producer (the in-memory fake in unit tests):
a batch is applied to the store, then due impressions are claimed, produced, and -- once the
broker acknowledged them -- marked done. `FeedbackLoop` is the BatchLoop plus a sweep every
`sweep_interval_s`, so windows close while no records arrive. Several joiners may run (a
consumer group); claims are atomic per shard, so each impression is emitted by one of them.

Event records that fail validation are skipped here (counted, not sent to the DLQ): the profile
worker reads the same topic and already sends them there. Invalid copy records go to the DLQ.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Producer
from pydantic import ValidationError

from livecopy.metrics import WorkerMetrics
from livecopy.settings import FeedbackSettings, Settings
from stream.contracts import GeneratedCopy
from stream.feedback import Claimed, Item, aggregate_fields, copy_item, event_item, feedback_record, orphan_event
from stream.feedback_store import FeedbackStore, RedisFeedbackStore
from stream.kafka_io import (
    BatchLoop,
    DeliveryTracker,
    Outcome,
    TransientError,
    group_consumer,
    loop_options,
    producer_config,
)
from stream.profile_worker import install_stop_signals, wall_ms
from stream.redis_lua import TransientStoreError, redis_client
from stream.wire import Record, Rejection, Topics, decode_event, dlq_headers, encode, rejection_from

log = logging.getLogger(__name__)

GROUP = "feedback"


def _source_headers(reason: str, detail: str, source: str) -> list[tuple[str, bytes]]:
    """DLQ headers of an orphan, from the ``topic|partition|offset`` its event was read at."""
    topic, _, rest = source.partition("|")
    part, _, off = rest.partition("|")
    return dlq_headers(Rejection(reason, detail), topic, part, off)


class FeedbackProcessor:
    def __init__(
        self,
        store: FeedbackStore,
        producer: Any,  # confluent_kafka.Producer or tests.fakes.FakeProducer
        topics: Topics,
        cfg: FeedbackSettings,
        *,
        now_ms: Callable[[], int] = wall_ms,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.store = store
        self.producer = producer
        self.topics = topics
        self.cfg = cfg
        self.now_ms = now_ms
        self.metrics = metrics
        self._delivery = DeliveryTracker()
        self.applied = 0
        self.duplicates = 0
        self.skipped = 0
        self.emitted = 0
        self.clicked = 0
        self.orphans = 0

    def _count(self, outcome: str, n: int) -> None:
        if self.metrics:
            self.metrics.count(outcome, n)

    def items(self, records: Sequence[Record]) -> tuple[list[Item], list[tuple[Record, Rejection]]]:
        items: list[Item] = []
        rejected: list[tuple[Record, Rejection]] = []
        for rec in records:
            if rec.topic == self.topics.copy:
                if rec.value is None:
                    rejected.append((rec, Rejection("empty", "record has no value")))
                    continue
                try:
                    items.append(copy_item(GeneratedCopy.model_validate_json(rec.value)))
                except ValidationError as exc:
                    rejected.append((rec, rejection_from(exc)))
                continue
            try:
                ev = decode_event(rec.key, rec.value)
            except Rejection:
                self.skipped += 1  # the profile worker sends it to the DLQ
                continue
            it = event_item(ev, f"{rec.topic}|{rec.partition}|{rec.offset}")
            if it is not None:
                items.append(it)
        return items, rejected

    def process(self, records: Sequence[Record]) -> Outcome:
        items, rejected = self.items(records)
        try:
            flags = self.store.apply(items, self.now_ms())
        except TransientStoreError as exc:
            raise TransientError(str(exc)) from exc
        applied = sum(flags)
        self.applied += applied
        self.duplicates += len(flags) - applied
        self._count("applied", applied)
        self._count("duplicate", len(flags) - applied)
        self.sweep()
        return Outcome(rejected)

    def sweep(self) -> int:
        """Claim what is due, produce it, wait for the acks, mark it done. Returns how many."""
        total = 0
        while True:
            now = self.now_ms()
            try:
                claimed = self.store.claim(now, uuid.uuid4().hex)
            except TransientStoreError as exc:
                raise TransientError(str(exc)) from exc
            if not claimed:
                return total
            self._emit(claimed)
            total += len(claimed)
            if len(claimed) < self.cfg.sweep_limit:
                return total

    def _emit(self, claimed: list[Claimed]) -> None:
        done: list[tuple[Claimed, list[str]]] = []
        clicks = orphans = 0
        for c in claimed:
            if c.decision.kind == "emit":
                rec = feedback_record(c)
                self._delivery.produce(self.producer, self.topics.feedback, encode(rec), rec.copy_id.encode())
                done.append((c, aggregate_fields(rec)))
                clicks += rec.clicked
            else:
                reason = c.decision.reason
                detail = (f"no copy record for copy_id {c.state.copy_id!r} within copy_wait_s"
                          if reason == "copy_not_found" else
                          f"no impression {c.state.impression_id!r} for a click within orphan_wait_s")
                self._delivery.produce(self.producer, self.topics.dlq, orphan_event(c),
                                       c.state.user_id.encode() or None,
                                       _source_headers(reason, detail, c.state.source))
                done.append((c, [f"orphan|{reason}"]))
                orphans += 1
        # Not acknowledged -> TransientError, not marked done: claimed again after reclaim_s (at-least-once).
        self._delivery.wait(self.producer, "feedback produce")
        try:
            self.store.ack(done, self.now_ms())
        except TransientStoreError as exc:
            raise TransientError(str(exc)) from exc
        emitted = len(done) - orphans
        self.emitted += emitted
        self.clicked += clicks
        self.orphans += orphans
        self._count("emitted", emitted)
        self._count("clicked", clicks)
        self._count("orphan", orphans)

    def healthy(self) -> bool:
        return self.store.ping()


class FeedbackLoop(BatchLoop):
    """The batch loop plus a sweep of due impressions at least every `sweep_interval_s`."""

    def __init__(self, consumer: Any, dlq_producer: Any, processor: FeedbackProcessor, *,
                 sweep_interval_s: float, **kwargs: Any) -> None:
        super().__init__(consumer, dlq_producer, processor, **kwargs)
        self.feedback = processor
        self.sweep_interval_s = sweep_interval_s
        self._last_sweep = float("-inf")

    def step(self) -> int:
        n = super().step()
        if self.clock() - self._last_sweep >= self.sweep_interval_s:
            self._last_sweep = self.clock()
            try:
                self.feedback.sweep()
            except TransientError as exc:
                log.warning("sweep failed, will retry: %s", exc)
                self.metrics.retrying(str(exc))
        return n


def build_feedback_loop(settings: Settings, *, group_suffix: str = "", metrics: WorkerMetrics | None = None,
                        now_ms: Callable[[], int] = wall_ms, **consumer_overrides: Any) -> FeedbackLoop:
    topics = Topics.from_settings(settings.topics)
    store = RedisFeedbackStore(redis_client(settings.redis), settings.feedback, settings.redis.key_prefix)
    producer = Producer(producer_config(settings.kafka))
    processor = FeedbackProcessor(store, producer, topics, settings.feedback, now_ms=now_ms, metrics=metrics)
    return FeedbackLoop(
        group_consumer(settings, GROUP, group_suffix, **consumer_overrides), producer,
        processor=processor, sweep_interval_s=settings.feedback.sweep_interval_s,
        topics=[topics.events, topics.copy], dlq_topic=topics.dlq,
        max_batch=settings.worker.max_batch, metrics=metrics, **loop_options(settings.worker),
    )


def run_feedback_worker(settings: Settings, *, metrics_port: int | None = None) -> None:
    metrics = WorkerMetrics("feedback")
    metrics.serve(metrics_port if metrics_port is not None else settings.worker.metrics_port)
    loop = build_feedback_loop(settings, metrics=metrics)
    install_stop_signals(loop.stop)
    log.info("feedback joiner consuming %s (window %.0f s)", loop.topics, settings.feedback.window_s)
    loop.run()
    log.info("feedback joiner stopped: %d emitted, %d clicked, %d orphans", loop.feedback.emitted,
             loop.feedback.clicked, loop.feedback.orphans)
