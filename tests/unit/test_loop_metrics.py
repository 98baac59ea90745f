"""The consume loop's DLQ-by-reason and consumer-lag metrics (livecopy_dlq_records, livecopy_consumer_lag)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from confluent_kafka import TopicPartition
from prometheus_client import generate_latest

from core.metrics import WorkerMetrics
from services.workers.profile import ProfileProcessor
from stream.kafka_io import BatchLoop
from stream.profile.store import InMemoryProfileStore
from tests.fakes import FakeCluster, FakeConsumer, FakeProducer
from tests.unit.test_batch_loop import CFG, T0, drain, event, publish


class Recording(WorkerMetrics):
    """WorkerMetrics that also keep every lag report."""

    def __init__(self, worker: str) -> None:
        super().__init__(worker)
        self.reports: list[dict[tuple[str, int], int]] = []

    def lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        self.reports.append(dict(lags))
        super().lag(lags)


class LagConsumer:
    """A FakeConsumer with confluent-kafka's position() and get_watermark_offsets()."""

    def __init__(self, inner: FakeConsumer) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.inner.position[(tp.topic, tp.partition)]) for tp in tps]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> tuple[int, int]:
        return 0, len(self.inner.cluster.logs.get((tp.topic, tp.partition), []))


def test_worker_metrics_expose_dlq_reasons_and_lag() -> None:
    m = WorkerMetrics("profile")
    m.dlq("not_json", 2)
    m.lag({("ev", 0): 5, ("ev", 1): 0})
    text = generate_latest(m.registry).decode()
    assert 'livecopy_dlq_records_total{reason="not_json",worker="profile"} 2.0' in text
    assert 'livecopy_consumer_lag{partition="0",topic="ev",worker="profile"} 5.0' in text
    m.lag({("ev", 1): 3})  # partition 0 was revoked: its gauge goes
    text = generate_latest(m.registry).decode()
    assert 'partition="0"' not in text
    assert 'livecopy_consumer_lag{partition="1",topic="ev",worker="profile"} 3.0' in text


def test_the_loop_counts_dlq_reasons_and_reports_lag() -> None:
    cluster = FakeCluster()
    cluster.create("ev", 2)
    cluster.create("dlq", 1)
    metrics = Recording("profile")
    consumer = LagConsumer(FakeConsumer(cluster, "g"))
    loop = BatchLoop(consumer, FakeProducer(cluster), ProfileProcessor(InMemoryProfileStore(CFG), CFG,  # type: ignore[arg-type]
                     now_ms=lambda: T0), topics=["ev"], dlq_topic="dlq", max_batch=5, metrics=metrics)
    loop.lag_interval_s = 0.0
    publish(cluster, [event(i) for i in range(12)])
    publish(cluster, [b"{broken", b"[1]", orjson.dumps(event(99, price="1"))], key=b"u1")
    reported = metrics.reports
    drain(loop)
    text = generate_latest(metrics.registry).decode()
    assert 'livecopy_dlq_records_total{reason="not_json",worker="profile"} 1.0' in text
    assert 'livecopy_dlq_records_total{reason="not_object",worker="profile"} 1.0' in text
    assert 'livecopy_dlq_records_total{reason="wrong_type",worker="profile"} 1.0' in text
    assert any(sum(r.values()) > 0 for r in reported)  # behind while the batches were read
    assert reported[-1] and all(n == 0 for n in reported[-1].values())  # caught up


def test_the_feedback_joiner_counts_its_orphans_by_reason() -> None:
    from tests.feedback_data import click_event, impression_event
    from tests.unit.test_feedback import CFG as FCFG
    from tests.unit.test_feedback import T0 as FT0
    from tests.unit.test_feedback import Rig

    rig = Rig()
    metrics = WorkerMetrics("feedback")
    rig.proc.metrics = metrics
    rig.feed(rig.event(click_event("i9", "c9", ts=FT0)))  # its impression never comes
    rig.feed(rig.event(impression_event("i8", "c8", ts=FT0)))  # its copy record never comes
    rig.advance(FCFG.window_s + FCFG.lateness_s + FCFG.copy_wait_s + 1)
    rig.advance(FCFG.orphan_wait_s)
    text = generate_latest(metrics.registry).decode()
    assert 'livecopy_dlq_records_total{reason="copy_not_found",worker="feedback"} 1.0' in text
    assert 'livecopy_dlq_records_total{reason="impression_not_found",worker="feedback"} 1.0' in text
