"""Each shopper's style response: the pure merge, the processor on the in-memory store and the
in-memory Kafka (DLQ, duplicates, outages), and the hash round-trip the copy service reads."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from core.settings import ResponseSettings
from core.wire import Record
from services.workers.responses import ResponseProcessor
from stream.kafka_io import BatchLoop, TransientError
from stream.responses.logic import InMemoryResponseStore, ResponseUpdate, apply_updates, response_from_hash
from tests.fakes import FakeCluster, FakeConsumer, FakeProducer

CFG = ResponseSettings(dedupe_window_s=3600)
T0 = 1_795_000_000_000


def fb(i: int, user: str = "u1", style: str | None = "eco", score: float | None = 0.1, clicked: bool = False,
       **kw: Any) -> dict[str, Any]:
    return {"impression_id": f"i{i}", "copy_id": f"c{i}", "user_id": user, "product_id": "p1",
            "model_version": "1.0.0", "text": "Made to last.", "clicked": clicked,
            "impression_ts": "2026-11-23T10:00:00Z", "click_ts": None, "features": {}, "score": score,
            "style": style, **kw}


def rec(value: dict[str, Any] | bytes | None, offset: int = 0) -> Record:
    v = value if value is None or isinstance(value, bytes) else orjson.dumps(value)
    return Record("fb", 0, offset, b"c", v)


def test_observed_and_expected_clicks_add_up_per_user_and_style_once_per_impression() -> None:
    store = InMemoryResponseStore(CFG, now_ms=lambda: T0)
    proc = ResponseProcessor(store, now_ms=lambda: T0)
    records = [rec(fb(i, clicked=i % 4 == 0), i) for i in range(20)]  # 5 clicks, 20 x 0.1 expected
    records += [rec(fb(100 + i, style="urgency", score=0.2), 20 + i) for i in range(5)]
    records += [rec(fb(200 + i, user="u2", clicked=True), 30 + i) for i in range(3)]
    out = proc.process(records + records[:7])  # a re-delivery of the first 7
    assert out.rejected == []
    r1, r2 = store.load("u1"), store.load("u2")
    assert r1 is not None and r2 is not None
    assert r1.clicks["eco"] == 5 and r1.expected["eco"] == pytest.approx(2.0)
    assert r1.clicks.get("urgency", 0.0) == 0 and r1.expected["urgency"] == pytest.approx(1.0)
    assert r2.clicks == {"eco": 3.0} and r2.expected["eco"] == pytest.approx(0.3)
    assert (proc.applied, proc.duplicates) == (28, 7)
    assert store.load("nobody") is None


def test_records_without_style_or_score_are_skipped_and_malformed_ones_rejected_with_a_reason() -> None:
    store = InMemoryResponseStore(CFG, now_ms=lambda: T0)
    proc = ResponseProcessor(store, now_ms=lambda: T0)
    out = proc.process([
        rec(fb(1)), rec(fb(2, style=None)), rec(fb(3, score=None)), rec(fb(4, style="shouting")),
        rec(b"{not json", 5), rec(None, 6), rec({"impression_id": "i7"}, 7), rec(fb(8, clicked="maybe"), 8),
        rec(fb(9, user="}x{"), 9), rec(fb(10, user=""), 10),  # would name no hash tag / another one
    ])
    assert [(r.offset, j.reason) for r, j in out.rejected] == [
        (5, "not_json"), (6, "empty"), (7, "missing_field"), (8, "wrong_type"), (9, "bad_charset"),
        (10, "bad_charset")]
    assert proc.applied == 1 and proc.skipped == 3


def test_the_dedupe_window_forgets_old_impression_ids() -> None:
    from core.styles import StyleResponse

    resp, seen = StyleResponse.empty(), {}
    u = ResponseUpdate("i1", "u1", "eco", 0.1, True)
    assert apply_updates(resp, seen, [u, u], T0, 1000) == [True, False]
    assert apply_updates(resp, seen, [u], T0 + 500, 1000) == [False]
    assert apply_updates(resp, seen, [u], T0 + 1001, 1000) == [True]  # outside the window: counted again
    assert resp.clicks["eco"] == 2


def test_evidence_halves_every_half_life_and_the_posterior_relaxes_towards_the_prior() -> None:
    from core.styles import StyleResponse

    day = 86_400_000
    resp: StyleResponse = StyleResponse.empty()
    seen: dict[str, int] = {}
    clicks = [ResponseUpdate(f"i{i}", "u1", "social_proof", 0.1, True) for i in range(6)]
    apply_updates(resp, seen, clicks, T0, day, 30 * day)  # 6 clicks where 0.6 were expected
    assert (resp.clicks["social_proof"], resp.as_of_ms) == (6.0, T0)
    mean_before = resp.posterior("social_proof", 3.0)
    apply_updates(resp, seen, [ResponseUpdate("j1", "u1", "eco", 0.2, False)], T0 + 30 * day, day, 30 * day)
    assert resp.clicks["social_proof"] == pytest.approx(3.0) and resp.expected["social_proof"] == pytest.approx(0.3)
    assert resp.expected["eco"] == pytest.approx(0.2) and resp.as_of_ms == T0 + 30 * day  # the new one in full
    shape, rate = resp.posterior("social_proof", 3.0)
    assert 1.0 < shape / rate < mean_before[0] / mean_before[1]  # still above 1, less sure of it
    apply_updates(resp, seen, [], T0, day, 30 * day)  # time going backwards ages nothing
    assert resp.clicks["social_proof"] == pytest.approx(3.0) and resp.as_of_ms == T0 + 30 * day
    frozen = StyleResponse({"eco": 2.0}, {"eco": 1.0}, as_of_ms=T0)
    apply_updates(frozen, {}, [], T0 + 365 * day, day, 0)  # half-life 0: evidence never ages
    assert frozen.clicks == {"eco": 2.0} and frozen.as_of_ms == T0 + 365 * day
    # a reader ages what it reads to its own clock, without touching the stored counts
    clock = [T0]
    store = InMemoryResponseStore(ResponseSettings(half_life_days=30), now_ms=lambda: clock[0])
    store.apply(clicks, T0)
    clock[0] = T0 + 60 * day  # the shopper comes back after two half-lives without feedback
    read = store.load("u1")
    assert read is not None and read.clicks["social_proof"] == pytest.approx(1.5) and read.as_of_ms == clock[0]
    assert store.responses["u1"].clicks["social_proof"] == 6.0


class RecoveringStore(InMemoryResponseStore):
    """Down until it has been probed ``outage_pings`` times."""

    def __init__(self, outage_pings: int) -> None:
        super().__init__(CFG, now_ms=lambda: T0)
        self.down = True
        self.outage_pings = outage_pings
        self.pings = 0

    def ping(self) -> bool:
        self.pings += 1
        if self.pings >= self.outage_pings:
            self.down = False
        return not self.down


def test_a_store_outage_is_waited_out_and_nothing_is_lost_or_counted_twice() -> None:
    cluster = FakeCluster()
    cluster.create("fb", 2)
    cluster.create("dlq", 1)
    for i in range(10):
        cluster.append("fb", f"c{i}".encode(), orjson.dumps(fb(i, clicked=i < 3)), partition=i % 2)
    cluster.append("fb", b"bad", b"[]", partition=0)
    store = RecoveringStore(outage_pings=3)
    proc = ResponseProcessor(store, now_ms=lambda: T0)
    with pytest.raises(TransientError):
        proc.process([rec(fb(1))])
    loop = BatchLoop(FakeConsumer(cluster, "g"), FakeProducer(cluster), proc,  # type: ignore[arg-type]
                     topics=["fb"], dlq_topic="dlq", max_batch=50, backoff_initial_s=0.001, backoff_max_s=0.002)
    loop.start()
    for _ in range(5):
        loop.step()
    loop.close()
    assert store.pings >= 3
    r = store.load("u1")
    assert r is not None and r.clicks["eco"] == 3 and r.expected["eco"] == pytest.approx(1.0)
    assert [m.headers()[0] for m in cluster.records("dlq")] == [("error", b"not_object")]  # type: ignore[index]
    assert sum(v for k, v in cluster.committed.items() if k[0] == "g") == 11  # every record, the DLQ'd one too


def test_the_redis_hash_reads_back_as_a_style_response() -> None:
    r = response_from_hash({b"c:eco": b"3", b"e:eco": b"1.25", b"e:urgency": b"0.5", b"x:junk": b"1", b"c:shout": b"1"})
    assert r is not None and r.clicks == {"eco": 3.0} and r.expected == {"eco": 1.25, "urgency": 0.5}
    assert r.as_of_ms is None  # written before the counts aged
    aged = response_from_hash({b"e:eco": b"0.5", b"t": b"1795000000000"})
    assert aged is not None and aged.as_of_ms == T0
    assert response_from_hash({}) is None and response_from_hash({b"t": b"1"}) is None
