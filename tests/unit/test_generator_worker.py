"""The generator worker's poll loop on the in-memory Kafka: what it does with records it cannot or
must not pre-generate for (no Redis and no model are reached: none of these records is a fresh
product view of a partition it owns)."""

from __future__ import annotations

import time

import orjson
import redis

from livecopy.metrics import WorkerMetrics
from livecopy.settings import Settings
from stream.generator_worker import GeneratorWorker
from tests.fakes import FakeCluster, FakeConsumer, FakeMessage, FakeProducer

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


def a_worker(cluster: FakeCluster, consumer: FakeConsumer) -> tuple[GeneratorWorker, WorkerMetrics]:
    metrics = WorkerMetrics("generator")
    s = Settings()
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
