"""The feedback joiner worker: `livecopy.events` (impressions, clicks) + `livecopy.copy` ->
`livecopy.feedback`, one labelled record per impression.

`FeedbackProcessor` is transport-free apart from a producer (the in-memory fake in unit tests):
a batch is applied to the store, then due impressions are claimed, produced, and -- once the
broker acknowledged them -- marked done. `FeedbackLoop` is the BatchLoop plus a sweep every
`sweep_interval_s`, so windows close while no records arrive. Several joiners may run (a
consumer group); claims are atomic per shard, so each impression is emitted by one of them.

Event records that fail validation are skipped here (counted, not sent to the DLQ): the profile
worker reads the same topic and already sends them there. Invalid copy records go to the DLQ.

Each claimed impression is seen through on its own: a feedback record that can never be produced
(too large for the broker -- a ~1 MB copy record --, or not encodable) sends the impression to the
DLQ (`feedback_unproducible`) and marks it done; one whose produce fails for a passing reason
(broker down, timeout) stays claimed and is claimed again after `reclaim_s`, while the others of the
sweep are marked done.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from pydantic import ValidationError

from core.contracts import GeneratedCopy
from core.metrics import WorkerMetrics
from core.process import install_stop_signals, wall_ms
from core.settings import FeedbackSettings, Settings
from core.wire import Record, Rejection, Topics, decode_event, dlq_headers, encode, one_line, rejection_from
from services.workers.common import worker_metrics
from stream.feedback.logic import Claimed, Item, aggregate_fields, copy_item, dlq_record, event_item, feedback_record
from stream.feedback.store import FeedbackStore, RedisFeedbackStore
from stream.kafka_io import (
    TOO_LARGE,
    BatchLoop,
    Outcome,
    TransientError,
    group_consumer,
    loop_options,
    produce_queued,
    producer_config,
)
from stream.redis_io import TransientStoreError, redis_client

log = logging.getLogger(__name__)

GROUP = "feedback"

UNPRODUCIBLE = "feedback_unproducible"
# Produce errors about the record itself: producing it again fails the same way. Any other error (broker
# down, timeout, authorization, unknown topic) is retried: the impression is claimed again later.
RECORD_ERRORS = TOO_LARGE | frozenset({
    KafkaError.INVALID_MSG, KafkaError.INVALID_RECORD, KafkaError.INVALID_TIMESTAMP, KafkaError._INVALID_ARG,
    KafkaError._BAD_MSG, KafkaError._KEY_SERIALIZATION, KafkaError._VALUE_SERIALIZATION,
})


def _describe(err: KafkaError) -> str:
    return f"{err.str()} ({err.name()})"


class _Send:
    """One claimed impression's produce() and its delivery report."""

    __slots__ = ("claimed", "delivered", "dims", "error", "size", "to")

    def __init__(self, claimed: Claimed, to: str, dims: list[str], size: int) -> None:
        self.claimed = claimed
        self.to = to  # "feedback", "orphan" (its DLQ record) or "unproducible" (the DLQ record instead)
        self.dims = dims  # CTR aggregate dimensions counted when it is marked done
        self.size = size
        self.error: KafkaError | None = None
        self.delivered = False

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered = True
        else:
            self.error = err

    @property
    def record_error(self) -> bool:
        return self.error is not None and self.error.code() in RECORD_ERRORS


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
        self.applied = 0
        self.duplicates = 0
        self.skipped = 0
        self.emitted = 0
        self.clicked = 0
        self.orphans = 0
        self.unproducible = 0

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
            it = event_item(ev, f"{rec.topic}|{rec.partition}|{rec.offset}", rec.key, rec.value)
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

    def _produce(self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]] | None,
                 send: _Send) -> None:
        """``producer.produce`` reporting to ``send``; a full local queue is drained, then retried; a
        refusal (e.g. over ``message.max.bytes``) is recorded in ``send`` like a failed delivery."""
        try:
            produce_queued(self.producer, topic, value, key, headers, send)
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            send.error = err if err is not None else KafkaError(KafkaError._FAIL, str(exc))

    def _flush(self) -> None:
        """Wait (bounded) for the delivery reports; a record without one is not marked done."""
        self.producer.flush(30.0)

    def _emit(self, claimed: list[Claimed]) -> None:
        """Produce each claimed impression's record (feedback, or the DLQ for an orphan) and mark the
        acknowledged ones done. An impression whose feedback record cannot be produced goes to the DLQ
        and is marked done; one whose produce failed for a passing reason stays claimed (claimed again
        after reclaim_s) and, after the others are marked done, raises TransientError."""
        sends: list[_Send] = []
        unproducible: list[tuple[Claimed, str]] = []
        for c in claimed:
            if c.decision.kind == "emit":
                try:
                    rec = feedback_record(c)
                    value = encode(rec)
                except (ValueError, orjson.JSONEncodeError) as exc:  # ValidationError included
                    unproducible.append((c, f"feedback record of impression {c.state.impression_id!r} "
                                            f"cannot be built: {type(exc).__name__}: {exc}"))
                    continue
                send = _Send(c, "feedback", aggregate_fields(rec), len(value))
                self._produce(self.topics.feedback, value, rec.copy_id.encode(), None, send)
            else:
                reason = c.decision.reason
                detail = (f"no copy record for copy_id {c.state.copy_id!r} within copy_wait_s"
                          if reason == "copy_not_found" else
                          f"no impression {c.state.impression_id!r} for a click within orphan_wait_s")
                key, value = dlq_record(c)
                send = _Send(c, "orphan", [f"orphan|{reason}"], len(value))
                self._produce(self.topics.dlq, value, key, send=send,
                              headers=_source_headers(reason, detail, c.state.source))
            sends.append(send)
        if sends:
            self._flush()

        retry: list[str] = []
        done: list[_Send] = []
        dead: list[_Send] = []

        def settle(send: _Send) -> None:
            c = send.claimed
            if send.delivered:
                done.append(send)
            elif send.record_error and send.to == "feedback":
                assert send.error is not None
                unproducible.append((c, f"feedback record of impression {c.state.impression_id!r} "
                                        f"({send.size} bytes) not producible: {_describe(send.error)}"))
            elif send.record_error:  # a DLQ record that cannot be produced either: claimed again later
                assert send.error is not None
                log.error("impression %r cannot be sent to the DLQ: %s", c.state.impression_id,
                          _describe(send.error))
            else:
                retry.append(f"{c.state.impression_id}: {_describe(send.error) if send.error else 'no report'}")

        for send in sends:
            settle(send)
        for c, detail in unproducible:
            log.error("impression %r to the DLQ: %s", c.state.impression_id, detail)
            key, value = dlq_record(c)
            send = _Send(c, "unproducible", [f"dlq|{UNPRODUCIBLE}"], len(value))
            self._produce(self.topics.dlq, value, key, send=send,
                          headers=_source_headers(UNPRODUCIBLE, one_line(detail), c.state.source))
            dead.append(send)
        if dead:
            self._flush()
            for send in dead:
                settle(send)

        try:
            self.store.ack([(s.claimed, s.dims) for s in done], self.now_ms())
        except TransientStoreError as exc:
            raise TransientError(str(exc)) from exc
        fed = [s.claimed for s in done if s.to == "feedback"]
        emitted, clicks = len(fed), sum(c.decision.clicked for c in fed)
        orphans = sum(1 for s in done if s.to == "orphan")
        dlqd = len(done) - emitted - orphans
        self.emitted += emitted
        self.clicked += clicks
        self.orphans += orphans
        self.unproducible += dlqd
        self._count("emitted", emitted)
        self._count("clicked", clicks)
        self._count("orphan", orphans)
        self._count("unproducible", dlqd)
        if self.metrics is not None:  # what went to the DLQ here, by reason (the loop's own rejects count there)
            reasons: dict[str, int] = {}
            for s in done:
                if s.to != "feedback":
                    reason = (s.claimed.decision.reason or "orphan") if s.to == "orphan" else UNPRODUCIBLE
                    reasons[reason] = reasons.get(reason, 0) + 1
            for reason, n in reasons.items():
                self.metrics.dlq(reason, n)
        if retry:
            # Not acknowledged -> not marked done: claimed again after reclaim_s (at-least-once).
            raise TransientError(f"feedback produce not acknowledged for {len(retry)}: {retry[:3]}")

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
    metrics = worker_metrics(settings, "feedback", metrics_port, log)
    loop = build_feedback_loop(settings, metrics=metrics)
    install_stop_signals(loop.stop)
    log.info("feedback joiner consuming %s (window %.0f s)", loop.topics, settings.feedback.window_s)
    loop.run()
    log.info("feedback joiner stopped: %d emitted, %d clicked, %d orphans", loop.feedback.emitted,
             loop.feedback.clicked, loop.feedback.orphans)
