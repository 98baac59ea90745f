"""Prometheus metrics for workers (each worker owns its registry; nothing global)."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import HistogramMetricFamily

from core.wire import Record

# Fine buckets (seconds) so p50/p99 of end-to-end latency can be read off with ~1-5 ms resolution.
LATENCY_BUCKETS = (
    0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.010, 0.012, 0.014, 0.016, 0.018,
    0.020, 0.025, 0.030, 0.035, 0.040, 0.045, 0.050, 0.060, 0.070, 0.080, 0.090, 0.100, 0.125, 0.150,
    0.200, 0.250, 0.300, 0.400, 0.500, 0.750, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
)


class BulkHistogram:
    """A Prometheus histogram fed a batch at a time (one lock per batch, bisect per value):
    cheap enough to record every record's latency at tens of thousands of records per second."""

    def __init__(self, name: str, doc: str, labels: dict[str, str], buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        bounds, local, total = self.bounds, [0] * len(self.counts), 0.0
        for v in values:
            local[bisect.bisect_left(bounds, v)] += 1
            total += v
        with self._lock:
            for i, c in enumerate(local):
                if c:
                    self.counts[i] += c
            self.sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        fam = HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))
        cum, buckets = 0, []
        for bound, c in zip([*self.bounds, float("inf")], counts, strict=True):
            cum += c
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
        fam.add_metric(list(self.labels.values()), buckets, total)
        yield fam


class WorkerMetrics:
    """What a BatchLoop worker exports: records by outcome, batch sizes, event-to-effect latency."""

    def __init__(self, worker: str, registry: CollectorRegistry | None = None) -> None:
        self.worker = worker
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.records = Counter(
            "livecopy_records", "Records handled, by outcome", ["worker", "outcome"], registry=r
        )
        self.latency = BulkHistogram(
            "livecopy_event_to_effect_seconds",
            "Record timestamp (producer CreateTime) to effect acknowledged",
            {"worker": worker}, LATENCY_BUCKETS, r,
        )
        self.batch_seconds = Histogram(
            "livecopy_batch_seconds", "Time to process one batch", ["worker"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "livecopy_batch_size", "Records per batch", ["worker"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000), registry=r,
        )
        self.retries = Counter("livecopy_batch_retries", "Batches retried after a transient failure",
                               ["worker"], registry=r)
        self.up = Gauge("livecopy_worker_up", "1 while the worker runs", ["worker"], registry=r)
        self.up.labels(worker).set(1)
        self.dlq_records = Counter("livecopy_dlq_records", "Records the consume loop sent to the DLQ, by reason",
                                   ["worker", "reason"], registry=r)
        self.consumer_lag = Gauge(
            "livecopy_consumer_lag", "Records between this worker's position and the partition's high watermark "
            "(its assigned partitions; refreshed every few seconds)", ["worker", "topic", "partition"], registry=r)
        self._lag_keys: set[tuple[str, str]] = set()

    def count(self, outcome: str, n: int = 1) -> None:
        if n:
            self.records.labels(self.worker, outcome).inc(n)

    def batch_done(self, records: Sequence[Record], rejected: int, seconds: float) -> None:
        now_ms = time.time() * 1000.0
        self.latency.observe_many(
            max(0.0, (now_ms - rec.timestamp_ms) / 1000.0) for rec in records if rec.timestamp_ms
        )
        self.batch_seconds.labels(self.worker).observe(seconds)
        self.batch_size.labels(self.worker).observe(len(records))
        self.count("rejected", rejected)

    def retrying(self, reason: str) -> None:
        self.retries.labels(self.worker).inc()

    def dlq(self, reason: str, n: int = 1) -> None:
        if n:
            self.dlq_records.labels(self.worker, reason).inc(n)

    def lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        """The consumer lag of each assigned partition; partitions no longer assigned are dropped."""
        keys = {(topic, str(partition)) for topic, partition in lags}
        for topic, label in self._lag_keys - keys:
            self.consumer_lag.remove(self.worker, topic, label)
        for (topic, partition), n in lags.items():
            self.consumer_lag.labels(self.worker, topic, str(partition)).set(n)
        self._lag_keys = keys

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        if port:
            start_http_server(port, addr=host, registry=self.registry)


class TrainerMetrics(WorkerMetrics):
    """The trainer worker's: a worker's, plus every gate decision on a candidate version."""

    def __init__(self, worker: str = "trainer", registry: CollectorRegistry | None = None) -> None:
        super().__init__(worker, registry)
        self.gate = Counter(
            "livecopy_trainer_gate_decisions", "The trainer's gate on each candidate version: published, or "
            "refused and why (heldout_small, logloss, kl, snips; one count per reason)", ["decision", "reason"],
            registry=self.registry)
