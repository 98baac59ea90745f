from prometheus_client import CollectorRegistry, generate_latest

from core.metrics import BulkHistogram, WorkerMetrics
from core.wire import Record


def test_bulk_histogram_exposes_cumulative_buckets_in_prometheus_format() -> None:
    reg = CollectorRegistry()
    h = BulkHistogram("lat_seconds", "latency", {"worker": "w"}, [0.01, 0.1], reg)
    h.observe_many([0.005, 0.01, 0.05, 3.0])
    text = generate_latest(reg).decode()
    assert 'lat_seconds_bucket{le="0.01",worker="w"} 2.0' in text
    assert 'lat_seconds_bucket{le="0.1",worker="w"} 3.0' in text
    assert 'lat_seconds_bucket{le="+Inf",worker="w"} 4.0' in text
    assert 'lat_seconds_count{worker="w"} 4.0' in text
    assert 'lat_seconds_sum{worker="w"} 3.065' in text


def test_worker_metrics_count_outcomes_and_latency() -> None:
    m = WorkerMetrics("profile")
    recs = [Record("t", 0, i, None, b"", timestamp_ms=1) for i in range(3)]
    m.batch_done(recs, rejected=1, seconds=0.01)
    m.count("applied", 2)
    text = generate_latest(m.registry).decode()
    assert 'livecopy_records_total{outcome="applied",worker="profile"} 2.0' in text
    assert 'livecopy_records_total{outcome="rejected",worker="profile"} 1.0' in text
    assert 'livecopy_event_to_effect_seconds_count{worker="profile"} 3.0' in text
