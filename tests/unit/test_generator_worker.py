"""The generator worker's poll loop on the in-memory Kafka: what it does with records it cannot or
must not pre-generate for (no Redis and no model are reached: none of these records is a fresh
product view of a partition it owns)."""

from __future__ import annotations

import time

import orjson
import redis

from core.metrics import WorkerMetrics
from core.settings import Settings
from services.workers.generator import GeneratorWorker
from tests.fakes import FakeCluster, FakeConsumer, FakeMessage, FakeProducer, RebalancingConsumer

TOPIC = "livecopy.events"


class QuietProducer(FakeProducer):
    """The in-memory producer, polled by the copy publisher's thread without spinning."""

    def poll(self, timeout: float = 0) -> int:
        time.sleep(min(timeout, 0.05))
        return 0


class StubEngine:
    model = "livecopy-student"
    version = "v1"


def page_view(i: int, user: str = "u1") -> bytes:
    return orjson.dumps({"event_id": f"e{i}", "type": "page_view", "user_id": user, "ts": int(time.time() * 1000)})


def a_worker(cluster: FakeCluster, consumer: FakeConsumer,
             commit_interval_s: float = 0.5) -> tuple[GeneratorWorker, WorkerMetrics]:
    metrics = WorkerMetrics("generator")
    s = Settings()
    s = s.model_copy(update={"generator": s.generator.model_copy(update={"commit_interval_s": commit_interval_s})})
    # nothing here reaches Redis: a client that cannot connect proves it
    worker = GeneratorWorker(s, StubEngine(), consumer=consumer, producer=QuietProducer(cluster),  # type: ignore[arg-type]
                             client=redis.Redis(port=1, socket_connect_timeout=0.1), metrics=metrics, threads=1)
    consumer.subscribe([TOPIC], on_assign=worker._on_assign, on_revoke=worker._on_revoke)
    return worker, metrics


def counted(metrics: WorkerMetrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("livecopy_records_total",
                                             {"worker": "generator", "outcome": outcome}) or 0.0


def test_a_record_the_decoder_fails_on_is_skipped_as_invalid_not_fatal() -> None:
    """Whatever the decoder raises (here a TypeError, not a Rejection: the value is not bytes), the
    record is counted invalid and committed past, and the loop goes on with the next one; before,
    the exception killed the worker and, its offset never committed, it crash-looped on the record."""
    cluster = FakeCluster()
    cluster.create(TOPIC, 1)
    cluster.append(TOPIC, b"u1", page_view(0), partition=0)
    cluster.logs[(TOPIC, 0)].append(FakeMessage(TOPIC, 0, 1, b"u1", 12345))  # type: ignore[arg-type]
    cluster.append(TOPIC, b"u1", b'{"not": "an event"}', partition=0)  # a Rejection, as before
    cluster.append(TOPIC, b"u1", page_view(3), partition=0)
    worker, metrics = a_worker(cluster, FakeConsumer(cluster, "g"))
    try:
        worker.step()
    finally:
        worker.close()
    assert counted(metrics, "invalid") == 2 and counted(metrics, "not_a_view") == 2
    assert cluster.committed[("g", TOPIC, 0)] == 4 and worker.records == 4



def test_records_of_a_partition_revoked_inside_consume_are_neither_handled_nor_committed() -> None:
    """The records of partition 0 that consume() returned after the rebalance took it away belong to its
    new owner: the worker does not track them (before, it added them after the revoke had dropped the
    partition, and every later commit rewrote partition 0's offset under the new owner, re-delivering
    what the new owner had already handled after its next rebalance)."""
    cluster = FakeCluster()
    cluster.create(TOPIC, 2)
    for i in range(5):
        cluster.append(TOPIC, b"u0", page_view(i, "u0"), partition=0)
        cluster.append(TOPIC, b"u1", page_view(10 + i, "u1"), partition=1)
    consumer = RebalancingConsumer(cluster, "g", TOPIC)
    worker, metrics = a_worker(cluster, consumer, commit_interval_s=0.0)
    try:
        worker.step()
        assert cluster.committed.get(("g", TOPIC, 0), 0) == 0  # not this member's any more
        assert cluster.committed[("g", TOPIC, 1)] == 5
        cluster.committed[("g", TOPIC, 0)] = 105  # its new owner moves on
        cluster.append(TOPIC, b"u1", page_view(99, "u1"), partition=1)
        worker.step()  # this member keeps working on partition 1 (and commits)
        assert cluster.committed[("g", TOPIC, 1)] == 6
        assert cluster.committed[("g", TOPIC, 0)] == 105  # not rewound
        assert counted(metrics, "not_owned") == 5  # partition 0's records of the first batch, left alone
        assert (TOPIC, 0) not in worker.tracker.committable()
    finally:
        worker.close()
    assert cluster.committed[("g", TOPIC, 0)] == 105  # nor by the final commit
