"""Kafka plumbing on confluent-kafka: client configs, topic admin, and the batch loop.

`BatchLoop` is the at-least-once engine every livecopy consumer runs:

    poll a batch -> processor.process(records) -> produce rejects to the DLQ and wait for acks
    -> commit the batch's offsets.

Offsets are committed only after the processor's effects (Redis write, produce) and the DLQ
records were acknowledged. When the processor raises `TransientError` (Redis down, broker
hiccup), the loop pauses its partitions, backs off while keeping its group membership alive,
rewinds to the first offset it did not finish, and tries again: nothing is committed, nothing
is lost. A record that makes the processor fail for any other reason is isolated and sent
to the DLQ with reason `processing_error`: a worker never dies on bad input. A DLQ record is the
original key and bytes; one too large for the producer or the broker (a 1 MB+ event) goes
instead as its first 64 KiB with headers ``error.truncated: true`` and ``source.size`` (the
original stays at its ``source.*`` offset). SIGTERM (via `stop()`) finishes the batch in hand,
commits and closes.

It is the one consume loop of every group consumer, the generator worker's included: a processor
whose effects finish later (an `AsyncProcessor`: the generator hands product views to a thread pool)
returns them as ``Outcome.pending`` and reports them through ``finished()``; offsets are committed up
to the first record not finished (`OffsetTracker`), and while ``in_flight()`` is above
``max_inflight`` the loop pauses its partitions (still polling, so it keeps its group membership).
Records that consume() returned for a partition a rebalance inside it had taken away are left to
the new owner: neither processed nor committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from core.contracts import MAX_EVENT_BYTES
from core.settings import KafkaSettings, Settings, WorkerSettings
from core.wire import Record, Rejection, Topics, dlq_headers

log = logging.getLogger(__name__)


def base_config(k: KafkaSettings) -> dict[str, Any]:
    return {"bootstrap.servers": k.bootstrap_servers, **k.client_config}


def producer_config(k: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    return {
        **base_config(k),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": k.producer_linger_ms,
        "compression.type": k.producer_compression,
        **overrides,
    }


def consumer_config(k: KafkaSettings, group_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        **base_config(k),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": k.auto_offset_reset,
        "session.timeout.ms": k.session_timeout_ms,
        "heartbeat.interval.ms": k.heartbeat_interval_ms,
        "max.poll.interval.ms": k.max_poll_interval_ms,
        "fetch.wait.max.ms": k.fetch_wait_max_ms,
        "enable.partition.eof": False,
        **overrides,
    }


def group_consumer(settings: Settings, group: str, group_suffix: str = "", **overrides: Any) -> Consumer:
    """A worker's consumer in group ``worker.group_prefix + group + group_suffix``."""
    w = settings.worker
    return Consumer(consumer_config(settings.kafka, w.group_prefix + group + group_suffix, **overrides))


def loop_options(w: WorkerSettings) -> dict[str, Any]:
    """The ``BatchLoop`` timings every worker takes from ``worker.*``."""
    return {"poll_timeout_s": w.poll_timeout_s, "backoff_initial_s": w.retry_backoff_initial_s,
            "backoff_max_s": w.retry_backoff_max_s, "commit_interval_s": w.commit_interval_s}


def ensure_topics(k: KafkaSettings, topics: Topics, timeout_s: float = 30.0) -> list[str]:
    """Create the CONTRACTS.md topics that do not exist yet; returns the ones created."""
    admin = AdminClient(base_config(k))
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = [
        NewTopic(name, num_partitions=n, replication_factor=topics.replication_factor,
                 config=topics.configs().get(name, {}))
        for name, n in topics.partition_counts().items()
        if name not in existing
    ]
    if not wanted:
        return []
    created = []
    for name, fut in admin.create_topics(wanted, request_timeout=timeout_s).items():
        try:
            fut.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created


def to_record(m: Message) -> Record:
    ts_type, ts = m.timestamp()
    return Record(
        topic=m.topic() or "",
        partition=m.partition() or 0,
        offset=m.offset() or 0,
        key=m.key(),
        value=m.value(),
        timestamp_ms=ts if ts_type != 0 else 0,
        headers=cast("list[tuple[str, bytes]]", list(m.headers() or [])),
    )


TP = tuple[str, int]


class OffsetTracker:
    """Which offset of each partition may be committed while records finish out of order (pure).

    ``add`` a record still under way, ``advance`` past records that took effect, ``done`` when one under
    way finishes; ``committable`` gives, per partition, the offset after the longest finished prefix."""

    def __init__(self) -> None:
        self._inflight: dict[TP, set[int]] = {}
        self._next: dict[TP, int] = {}

    def add(self, tp: TP, offset: int) -> None:
        self._inflight.setdefault(tp, set()).add(offset)
        self.advance(tp, offset + 1)

    def advance(self, tp: TP, next_offset: int) -> None:
        if next_offset > self._next.get(tp, -1):
            self._next[tp] = next_offset

    def done(self, tp: TP, offset: int) -> None:
        s = self._inflight.get(tp)
        if s is not None:
            s.discard(offset)

    def drop(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._inflight.pop(tp, None)
            self._next.pop(tp, None)

    def committable(self) -> dict[TP, int]:
        return {tp: (min(self._inflight[tp]) if self._inflight.get(tp) else nxt) for tp, nxt in self._next.items()}

    def pending(self) -> int:
        return sum(len(s) for s in self._inflight.values())


class TransientError(Exception):
    """A dependency is unavailable; the batch will be retried from Kafka later."""


@dataclass
class Outcome:
    """What a processor did with a batch: records to send to the DLQ (the rest took effect)."""

    rejected: list[tuple[Record, Rejection]]
    # records whose effects are still under way (an AsyncProcessor): committed once finished() names them
    pending: Sequence[Record] = field(default_factory=tuple)


class Processor(Protocol):
    def process(self, records: Sequence[Record]) -> Outcome:
        """Take effect for each record (idempotently) or reject it. Raise TransientError to retry."""
        ...

    def healthy(self) -> bool:
        """Cheap probe used while backing off after a TransientError."""
        ...


class AsyncProcessor(Processor, Protocol):
    """A processor whose effects finish after ``process`` returned (its ``Outcome.pending``)."""

    def finished(self) -> list[tuple[TP, int]]:
        """(partition, offset) of the pending records whose effects are done since the last call."""
        ...

    def in_flight(self) -> int:
        """How much work is under way (the loop pauses its partitions above ``max_inflight``)."""
        ...

    def drain(self) -> None:
        """At close: stop taking work and wait for (or abandon) what is under way; abandoned records are
        not reported finished, so they are not committed and are read again by the next owner."""
        ...


class LoopMetrics(Protocol):
    def batch_done(self, records: Sequence[Record], rejected: int, seconds: float) -> None: ...

    def retrying(self, reason: str) -> None: ...

    def count(self, outcome: str, n: int = 1) -> None: ...

    def dlq(self, reason: str, n: int = 1) -> None: ...

    def lag(self, lags: Mapping[tuple[str, int], int]) -> None: ...


class NullMetrics:
    def batch_done(self, records: Sequence[Record], rejected: int, seconds: float) -> None:
        pass

    def retrying(self, reason: str) -> None:
        pass

    def count(self, outcome: str, n: int = 1) -> None:
        pass

    def dlq(self, reason: str, n: int = 1) -> None:
        pass

    def lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        pass


# produce errors that say "this record, as it is, will never fit" (raised by produce() for the
# producer's message.max.bytes, or reported by the broker for its own limit)
TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG_SIZE})
DLQ_TRUNCATE_BYTES = MAX_EVENT_BYTES


def dlq_record(rec: Record, rej: Rejection, shrink: int = 0) -> tuple[bytes | None, bytes | None,
                                                                      list[tuple[str, bytes]]]:
    """(key, value, headers) of the DLQ record for ``rec``: as it is (``shrink`` 0), else its value's
    first 64 KiB (1; a key over 64 KiB cut too), else no key and an empty value (2), the cut said in headers."""
    headers = dlq_headers(rej, rec.topic, rec.partition, rec.offset)
    if shrink == 0:
        return rec.key, rec.value, headers
    key, value = (rec.key, rec.value) if shrink == 1 else (None, b"")
    if key is not None and len(key) > DLQ_TRUNCATE_BYTES:
        key = key[:DLQ_TRUNCATE_BYTES]
    headers += [("error.truncated", b"true"), ("source.size", str(len(rec.value or b"")).encode())]
    if key != rec.key:
        headers.append(("source.key_size", str(len(rec.key or b"")).encode()))
    return key, (value[:DLQ_TRUNCATE_BYTES] if value is not None else None), headers


def produce_queued(producer: Any, topic: str, value: bytes | None, key: bytes | None,
                   headers: list[tuple[str, bytes]] | None, on_delivery: Callable[[KafkaError | None, Message], None]
                   ) -> None:
    """``producer.produce``; a full local queue is drained (delivery reports served), then retried."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=cast(Any, headers), on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.1)


class DeliveryTracker:
    """Counts outstanding produce() calls and remembers failures, for flush-then-check."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(f"{msg.topic()}[{msg.partition()}]: {err.str()}")

    def take(self) -> list[str]:
        errs, self.errors = self.errors, []
        return errs

    def produce(self, producer: Any, topic: str, value: bytes | None, key: bytes | None,
                headers: list[tuple[str, bytes]] | None = None,
                on_delivery: Callable[[KafkaError | None, Message], None] | None = None) -> None:
        """``producer.produce`` reporting to this tracker (or to ``on_delivery``); a full local queue is
        drained, then retried."""
        produce_queued(producer, topic, value, key, headers, on_delivery or self)

    def wait(self, producer: Any, what: str, timeout_s: float = 30.0) -> None:
        """Flush; raise TransientError unless every record produced so far was acknowledged."""
        left = producer.flush(timeout_s)
        errors = self.take()
        if left or errors:
            raise TransientError(f"{what} not acknowledged: {left} pending, errors {errors[:3]}")


class BatchLoop:
    def __init__(
        self,
        consumer: Consumer,
        dlq_producer: Producer,
        processor: Processor,
        *,
        topics: Sequence[str],
        dlq_topic: str,
        max_batch: int = 2000,
        poll_timeout_s: float = 0.2,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
        commit_interval_s: float = 0.5,
        max_inflight: int = 0,
        resume_below: int = 0,
        metrics: LoopMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.producer = dlq_producer
        self.processor = processor
        self.topics = list(topics)
        self.dlq_topic = dlq_topic
        self.max_batch = max_batch
        self.poll_timeout_s = poll_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.commit_interval_s = commit_interval_s
        self._last_commit = float("-inf")
        self._dirty = False
        self.metrics = metrics or NullMetrics()
        self.clock = clock
        self._stop = threading.Event()
        self._delivery = DeliveryTracker()
        self.tracker = OffsetTracker()  # what may be committed, per partition
        self._assigned: set[tuple[str, int]] = set()
        self._paused = False  # backing off after a TransientError
        self.max_inflight = max_inflight  # 0: no flow control (a synchronous processor)
        self.resume_below = resume_below
        self._throttled = False  # paused while an AsyncProcessor has too much in flight
        self._async = all(callable(getattr(processor, m, None)) for m in ("finished", "in_flight", "drain"))
        self._delay = 0.0  # the backoff after consecutive failed tries of a batch (0: the last one went through)
        self.batches = 0
        self.records = 0
        self.lag_interval_s = 5.0  # how often the consumer lag of the assigned partitions is reported
        self._last_lag = float("-inf")

    # -- lifecycle -------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish its batch in hand, commit and return (signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Consume until `stop()`; then commit what took effect and close."""
        self.start()
        try:
            while not self._stop.is_set():
                self.step()
        finally:
            self.close()

    def start(self) -> None:
        self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)

    def step(self) -> int:
        """Poll one batch and see it through (effects, DLQ, commit). Returns its size."""
        batch = self._poll_batch()
        if batch:
            self._handle(batch)
        self._report_lag()
        if self._async:
            self._collect()
            self._flow_control()
        if self._dirty and self.clock() - self._last_commit >= self.commit_interval_s:
            # Asynchronous and at most every commit_interval_s (also when idle): offsets only ever
            # name records whose effects were acknowledged; a lost commit only means re-reading
            # (idempotent) records.
            self._commit(sync=False)
        return len(batch)

    def close(self) -> None:
        if self._async:
            cast("AsyncProcessor", self.processor).drain()
            self._collect()
        self._commit(sync=True)
        self.producer.flush(10)
        self.consumer.close()

    # -- rebalance ----------------------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        tps = {(p.topic, p.partition) for p in parts}
        self.tracker.drop(tps)  # start clean: nothing from an earlier assignment of the same partition
        self._assigned |= tps
        if self._paused or self._throttled:
            consumer.pause(parts)
        log.info("assigned %s", sorted(self._assigned))

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        if self._async:
            self._collect()
        self._commit(sync=True)
        gone = {(p.topic, p.partition) for p in parts}
        self._assigned -= gone
        self.tracker.drop(gone)  # a pending record of theirs that finishes later marks nothing
        log.info("revoked %s", sorted(gone))

    # -- the loop -----------------------------------------------------------------------------
    def _poll_batch(self) -> list[Record]:
        first = self.consumer.poll(self.poll_timeout_s)
        if first is None:
            return []
        msgs = [first]
        if self.max_batch > 1:
            msgs += self.consumer.consume(self.max_batch - 1, timeout=0)
        out = []
        for m in msgs:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err.str())
                continue
            out.append(to_record(m))
        return out

    def _handle(self, batch: list[Record]) -> None:
        owned = self._owned()
        mine = [r for r in batch if (r.topic, r.partition) in owned]
        if len(mine) < len(batch):  # a rebalance served by consume() took their partition: the new owner's
            self.metrics.count("not_owned", len(batch) - len(mine))
            if not mine:
                return
            batch = mine
        started = self.clock()
        try:
            outcome = self._process_isolating(batch)
            self._send_to_dlq(outcome.rejected)
        except TransientError as exc:
            self.metrics.retrying(str(exc))
            log.warning("batch of %d will be retried: %s", len(batch), exc)
            self._backoff_and_rewind(batch)
            return
        if outcome.pending:
            pending = {(r.topic, r.partition, r.offset) for r in outcome.pending}
            for r in batch:
                if (r.topic, r.partition, r.offset) in pending:
                    self.tracker.add((r.topic, r.partition), r.offset)
                else:
                    self.tracker.advance((r.topic, r.partition), r.offset + 1)
        else:
            nxt: dict[TP, int] = {}
            for r in batch:
                nxt[(r.topic, r.partition)] = r.offset + 1
            for tp, off in nxt.items():
                self.tracker.advance(tp, off)
        self._dirty = True
        self._delay = 0.0
        self.batches += 1
        self.records += len(batch)
        self.metrics.batch_done(batch, len(outcome.rejected), self.clock() - started)

    def _process_isolating(self, batch: list[Record]) -> Outcome:
        try:
            return self.processor.process(batch)
        except TransientError:
            raise
        except Exception as exc:
            if len(batch) == 1:
                return Outcome([(batch[0], self._processing_error(batch[0], exc))])
            log.exception("batch of %d failed; isolating the bad record(s)", len(batch))
        rejected: list[tuple[Record, Rejection]] = []
        for r in batch:  # one at a time (idempotent), so only the poison record(s) go to the DLQ
            try:
                rejected += self.processor.process([r]).rejected
            except TransientError:
                raise
            except Exception as exc:
                rejected.append((r, self._processing_error(r, exc)))
        return Outcome(rejected)

    @staticmethod
    def _processing_error(r: Record, exc: Exception) -> Rejection:
        log.error("record %s[%d]@%d failed processing", r.topic, r.partition, r.offset, exc_info=exc)
        return Rejection("processing_error", f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300])

    def _send_to_dlq(self, rejected: list[tuple[Record, Rejection]]) -> None:
        """Produce the rejects and wait for their acks (else TransientError). A record that can never
        be produced as it is (too large for the producer or the broker) goes again, cut down."""
        todo = [(rec, rej, 0) for rec, rej in rejected]
        while todo:
            again: list[tuple[Record, Rejection, int]] = []
            for rec, rej, shrink in todo:
                key, value, headers = dlq_record(rec, rej, shrink)
                try:
                    self._delivery.produce(self.producer, self.dlq_topic, value, key, headers,
                                           on_delivery=self._dlq_report(again, rec, rej, shrink))
                except KafkaException as exc:
                    err = exc.args[0]
                    if not isinstance(err, KafkaError) or err.fatal():
                        raise
                    if err.code() not in TOO_LARGE or shrink == 2:
                        raise TransientError(f"DLQ produce failed: {err.str()}") from exc
                    again.append((rec, rej, shrink + 1))
            self._delivery.wait(self.producer, "DLQ produce")
            for rec, _rej, shrink in again:
                log.warning("DLQ record for %s[%d]@%d (%d bytes) is too large to produce as it is: sending it cut "
                            "down (level %d)", rec.topic, rec.partition, rec.offset, len(rec.value or b""), shrink)
            todo = again
        reasons: dict[str, int] = {}
        for _rec, rej in rejected:  # every one acknowledged by now
            reasons[rej.reason] = reasons.get(rej.reason, 0) + 1
        for reason, n in reasons.items():
            self.metrics.dlq(reason, n)

    def _report_lag(self) -> None:
        """Every ``lag_interval_s``: records between the position and the high watermark (as last fetched)
        of each assigned partition, to the metrics. A metric only: a failure here is logged, not raised."""
        now = self.clock()
        if now - self._last_lag < self.lag_interval_s:
            return
        self._last_lag = now
        try:
            tps = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
            lags: dict[tuple[str, int], int] = {}
            for tp in self.consumer.position(tps) if tps else []:
                _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0:  # nothing consumed yet, or no fetch yet: unknown
                    lags[(tp.topic, tp.partition)] = max(0, high - tp.offset)
            self.metrics.lag(lags)
        except Exception as exc:
            log.debug("consumer lag not reported: %s", exc)

    def _dlq_report(self, again: list[tuple[Record, Rejection, int]], rec: Record, rej: Rejection,
                    shrink: int) -> Callable[[KafkaError | None, Message], None]:
        """Delivery report of one DLQ record: the broker's "too large" queues it cut down, anything else
        goes to the tracker (a failure there means retrying the batch)."""
        def report(err: KafkaError | None, msg: Message) -> None:
            if err is not None and err.code() in TOO_LARGE and shrink < 2:
                again.append((rec, rej, shrink + 1))
            else:
                self._delivery(err, msg)
        return report

    def _commit(self, sync: bool) -> None:
        """Commit the offsets of the partitions this member owns; never one it lost in a rebalance (the
        classic group protocol does not check, so that would rewind the new owner's committed offset)."""
        self._dirty = False
        committable = self.tracker.committable()
        if not committable:
            return
        owned = self._owned()
        self.tracker.drop([tp for tp in committable if tp not in owned])
        offsets = [TopicPartition(t, p, off) for (t, p), off in committable.items() if (t, p) in owned]
        if not offsets:
            return
        self._last_commit = self.clock()
        try:
            if sync:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            else:
                self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            # Not fatal: the records took effect idempotently and will at worst be re-read.
            log.warning("offset commit failed: %s", exc)

    # -- an AsyncProcessor's completions and flow control ------------------------------------------
    def _collect(self) -> None:
        done = cast("AsyncProcessor", self.processor).finished()
        for tp, off in done:
            self.tracker.done(tp, off)
        if done:
            self._dirty = True

    def _flow_control(self) -> None:
        if not self.max_inflight:
            return
        n = cast("AsyncProcessor", self.processor).in_flight()
        if not self._throttled and n >= self.max_inflight:
            self.consumer.pause(self.consumer.assignment())
            self._throttled = True
        elif self._throttled and n <= self.resume_below:
            self._throttled = False
            if not self._paused:
                self.consumer.resume(self.consumer.assignment())

    def _healthy(self) -> bool:
        try:
            return self.processor.healthy()
        except Exception as exc:  # a probe that fails in a way of its own (Redis BUSY answers PING with an error)
            log.warning("health probe failed: %s: %s", type(exc).__name__, exc)
            return False

    def _owned(self) -> set[tuple[str, int]]:
        """The partitions assigned to this member now (during on_revoke: still the revoked ones too)."""
        return {(tp.topic, tp.partition) for tp in self.consumer.assignment()}

    def _backoff_and_rewind(self, batch: list[Record]) -> None:
        """Pause, wait until the processor is healthy again, then rewind to the unfinished records."""
        rewind: dict[tuple[str, int], int] = {}
        for r in batch:
            key = (r.topic, r.partition)
            rewind[key] = min(rewind.get(key, r.offset), r.offset)
        parts = self.consumer.assignment()
        self.consumer.pause(parts)
        self._paused = True
        # keeps growing over consecutive failures: a store that answers its probe but still refuses the
        # batch (out of memory, read-only) is retried every backoff_max_s, not every backoff_initial_s
        delay = self._delay = min(max(self._delay * 2, self.backoff_initial_s), self.backoff_max_s)
        try:
            while not self._stop.is_set():
                deadline = self.clock() + delay
                while self.clock() < deadline and not self._stop.is_set():
                    # keeps the group membership alive; paused partitions deliver nothing, but a
                    # message that raced the pause must be read again later, so remember it.
                    m = self.consumer.poll(min(0.2, max(0.0, deadline - self.clock())))
                    if m is not None and m.error() is None:
                        key = (m.topic() or "", m.partition() or 0)
                        rewind[key] = min(rewind.get(key, m.offset() or 0), m.offset() or 0)
                if self._healthy():
                    break
                delay = self._delay = min(delay * 2, self.backoff_max_s)
                log.warning("still unhealthy, next try in %.1f s", delay)
        finally:
            self._paused = False
            current = self.consumer.assignment()
            for (topic, part), off in rewind.items():
                if (topic, part) in self._assigned:
                    self.consumer.seek(TopicPartition(topic, part, off))
            if not self._throttled:
                self.consumer.resume(current)


def committed_offsets(k: KafkaSettings, group_id: str, topic: str, partitions: int) -> dict[int, int]:
    """Committed offset per partition of a group (-1 where none)."""
    c = Consumer(consumer_config(k, group_id))
    try:
        res = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: (tp.offset if tp.offset != OFFSET_INVALID else -1) for tp in res}
    finally:
        c.close()
