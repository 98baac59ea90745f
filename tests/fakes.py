"""In-memory stand-ins for confluent-kafka's Consumer and Producer (behaving fakes, not mocks).

They implement the subset of the client API that livecopy uses, with Kafka's semantics: an
append-only log per partition, a consumer position that advances as messages are returned,
committed offsets per group, pause/resume/seek, and delivery reports on flush.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition


@dataclass
class FakeMessage:
    _topic: str
    _partition: int
    _offset: int
    _key: bytes | None
    _value: bytes | None
    _ts: int = 0
    _headers: list[tuple[str, bytes]] | None = None
    _error: KafkaError | None = None

    def error(self) -> KafkaError | None:
        return self._error

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ts)

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers


@dataclass
class FakeCluster:
    partitions: dict[str, int] = field(default_factory=dict)
    logs: dict[tuple[str, int], list[FakeMessage]] = field(default_factory=dict)
    committed: dict[tuple[str, str, int], int] = field(default_factory=dict)  # (group, topic, p) -> offset

    def create(self, topic: str, partitions: int) -> None:
        self.partitions[topic] = partitions
        for p in range(partitions):
            self.logs.setdefault((topic, p), [])

    def append(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
               headers: list[tuple[str, bytes]] | None = None, ts: int = 0) -> FakeMessage:
        if partition is None:
            partition = (hash(key) if key is not None else len(self.logs)) % self.partitions[topic]
        log = self.logs[(topic, partition)]
        msg = FakeMessage(topic, partition, len(log), key, value, ts, headers)
        log.append(msg)
        return msg

    def records(self, topic: str) -> list[FakeMessage]:
        return [m for (t, _p), log in sorted(self.logs.items()) if t == topic for m in log]


class FakeConsumer:
    def __init__(self, cluster: FakeCluster, group: str) -> None:
        self.cluster = cluster
        self.group = group
        self.position: dict[tuple[str, int], int] = {}
        self.paused: set[tuple[str, int]] = set()
        self.closed = False
        self.commits = 0
        self.on_assign: Callable[..., Any] | None = None
        self.on_revoke: Callable[..., Any] | None = None
        # prefetched messages that a poll hands out even though their partition was just paused
        self.racing_pause: list[FakeMessage] = []

    def subscribe(self, topics: list[str], on_assign: Callable[..., Any] | None = None,
                  on_revoke: Callable[..., Any] | None = None) -> None:
        self.on_assign, self.on_revoke = on_assign, on_revoke
        parts = []
        for t in topics:
            for p in range(self.cluster.partitions[t]):
                self.position[(t, p)] = self.cluster.committed.get((self.group, t, p), 0)
                parts.append(TopicPartition(t, p))
        if on_assign:
            on_assign(self, parts)

    def revoke_all(self) -> None:
        parts = [TopicPartition(t, p) for (t, p) in self.position]
        if self.on_revoke:
            self.on_revoke(self, parts)
        self.position.clear()

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for (t, p) in self.position]

    def _next(self) -> FakeMessage | None:
        if self.paused and self.racing_pause:
            m = self.racing_pause.pop(0)
            self.position[(m.topic(), m.partition())] = m.offset() + 1
            return m
        for tp, pos in sorted(self.position.items()):
            if tp in self.paused:
                continue
            log = self.cluster.logs[tp]
            if pos < len(log):
                self.position[tp] = pos + 1
                return log[pos]
        return None

    def poll(self, timeout: float | None = None) -> FakeMessage | None:
        return self._next()

    def consume(self, num_messages: int = 1, timeout: float | None = None) -> list[FakeMessage]:
        out = []
        while len(out) < num_messages:
            m = self._next()
            if m is None:
                break
            out.append(m)
        return out

    def commit(self, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> None:
        self.commits += 1
        for tp in offsets or []:
            self.cluster.committed[(self.group, tp.topic, tp.partition)] = tp.offset

    def pause(self, parts: list[TopicPartition]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in parts}

    def resume(self, parts: list[TopicPartition]) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in parts}

    def seek(self, tp: TopicPartition) -> None:
        key = (tp.topic, tp.partition)
        assert key in self.position, "seek on an unassigned partition"
        self.position[key] = tp.offset

    def close(self) -> None:
        self.closed = True


class FakeProducer:
    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.pending: list[tuple[Callable[..., Any] | None, FakeMessage]] = []
        self.fail_deliveries = False
        # size limits (key + value + headers, in bytes), None = none: the client's message.max.bytes
        # (produce() raises MSG_SIZE_TOO_LARGE, like librdkafka's local check) and the broker's (the
        # delivery report says MSG_SIZE_TOO_LARGE)
        self.max_message_bytes: int | None = None
        self.broker_max_bytes: int | None = None

    @staticmethod
    def size(msg: FakeMessage) -> int:
        return len(msg._key or b"") + len(msg._value or b"") + sum(len(k) + len(v) for k, v in msg._headers or [])

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None, on_delivery: Callable[..., Any] | None = None,
                **_: Any) -> None:
        msg = FakeMessage(topic, 0, -1, key, value, 0, headers)
        if self.max_message_bytes is not None and self.size(msg) > self.max_message_bytes:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self.pending.append((on_delivery, msg))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float | None = None) -> int:
        pending, self.pending = self.pending, []
        for cb, msg in pending:
            if self.fail_deliveries or (self.broker_max_bytes is not None and self.size(msg) > self.broker_max_bytes):
                err = KafkaError(KafkaError._MSG_TIMED_OUT if self.fail_deliveries else KafkaError.MSG_SIZE_TOO_LARGE)
                if cb:
                    cb(err, msg)
                continue
            stored = self.cluster.append(msg._topic, msg._key, msg._value, headers=msg._headers)
            if cb:
                cb(None, stored)
        return 0


class RebalancingConsumer(FakeConsumer):
    """Serves a rebalance inside its first consume(), after fetching the batch (as librdkafka may,
    once poll() handed out the batch's first record): every partition is revoked, then only
    partition 1 of ``topic`` assigned back; the batch still holds partition 0's records."""

    def __init__(self, cluster: FakeCluster, group: str, topic: str) -> None:
        super().__init__(cluster, group)
        self.topic = topic
        self.armed = True

    def consume(self, num_messages: int = 1, timeout: float | None = None) -> list[FakeMessage]:
        out = super().consume(num_messages, timeout)
        if self.armed:
            self.armed = False
            self.revoke_all()
            self.position = {(self.topic, 1): self.cluster.committed.get((self.group, self.topic, 1), 0)}
            assert self.on_assign is not None
            self.on_assign(self, [TopicPartition(self.topic, 1)])
        return out
