"""The feedback joiner's pure logic and its processor on the in-memory store and the in-memory Kafka:
any order, duplicates, click before impression, window, orphans, produce failures (at-least-once)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException

from core.contracts import Event, FeedbackRecord
from core.settings import FeedbackSettings, TopicSettings
from core.wire import Record, Topics
from services.workers.feedback import FeedbackLoop, FeedbackProcessor
from stream.feedback.logic import (
    DONE,
    CtrStats,
    ImpressionState,
    InMemoryFeedbackStore,
    apply_item,
    decide,
    event_item,
)
from stream.kafka_io import TransientError
from tests.fakes import FakeCluster, FakeConsumer, FakeMessage, FakeProducer
from tests.feedback_data import click_event, copy_record, impression_event

CFG = FeedbackSettings(window_s=60, lateness_s=5, copy_wait_s=30, orphan_wait_s=120, reclaim_s=10, sweep_limit=1000)
T0 = 1_795_000_000_000


class Clock:
    def __init__(self, t: int = T0) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


class LimitedProducer(FakeProducer):
    """The in-memory producer with a record size limit, as librdkafka's ``message.max.bytes``: a larger
    record is refused by ``produce()`` (MSG_SIZE_TOO_LARGE, raised), or -- ``broker_rejects`` -- accepted
    and then failed in its delivery report, as a broker with a lower limit does. ``timeout`` makes the
    deliveries it matches time out (a retryable failure)."""

    def __init__(self, cluster: FakeCluster, max_bytes: int = 50_000, *, broker_rejects: bool = False,
                 timeout: Callable[[FakeMessage], bool] | None = None) -> None:
        super().__init__(cluster)
        self.max_bytes = max_bytes
        self.broker_rejects = broker_rejects
        self.timeout = timeout
        self.failing: list[tuple[Callable[..., Any] | None, FakeMessage, int]] = []

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None, on_delivery: Callable[..., Any] | None = None,
                **kw: Any) -> None:
        msg = FakeMessage(topic, 0, -1, key, value, 0, headers)
        if len(value or b"") + len(key or b"") > self.max_bytes:
            if not self.broker_rejects:
                raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
            self.failing.append((on_delivery, msg, KafkaError.MSG_SIZE_TOO_LARGE))
        elif self.timeout is not None and self.timeout(msg):
            self.failing.append((on_delivery, msg, KafkaError._MSG_TIMED_OUT))
        else:
            super().produce(topic, value, key, headers, on_delivery, **kw)

    def flush(self, timeout: float | None = None) -> int:
        failing, self.failing = self.failing, []
        for cb, msg, code in failing:
            if cb:
                cb(KafkaError(code), msg)
        return super().flush(timeout)


class Rig:
    def __init__(self, cfg: FeedbackSettings = CFG,
                 producer: Callable[[FakeCluster], FakeProducer] = FakeProducer) -> None:
        self.topics = Topics.from_settings(TopicSettings())
        self.cluster = FakeCluster()
        for t, n in self.topics.partition_counts().items():
            self.cluster.create(t, n)
        self.producer = producer(self.cluster)
        self.store = InMemoryFeedbackStore(cfg)
        self.clock = Clock()
        self.proc = FeedbackProcessor(self.store, self.producer, self.topics, cfg, now_ms=self.clock)
        self.offset = 0

    def feed(self, *values: tuple[str, bytes]) -> None:
        self.feed_keyed(*((topic, None, v) for topic, v in values))

    def feed_keyed(self, *records: tuple[str, bytes | None, bytes]) -> list[int]:
        """Feed (topic, key, value) records; returns their offsets."""
        recs = []
        for topic, k, v in records:
            self.offset += 1
            recs.append(Record(topic, 0, self.offset, k, v))
        out = self.proc.process(recs)
        assert out.rejected == []
        return [r.offset for r in recs]

    def event(self, ev: dict[str, object]) -> tuple[str, bytes]:
        return self.topics.events, orjson.dumps(ev)

    def copy(self, copy_id: str, **kw: Any) -> tuple[str, bytes]:
        return self.topics.copy, copy_record(copy_id, **kw)

    def feedback(self) -> list[FeedbackRecord]:
        msgs = self.cluster.records(self.topics.feedback)
        recs = [FeedbackRecord.model_validate_json(m.value() or b"") for m in msgs]
        return sorted(recs, key=lambda r: r.impression_id)

    def dlq(self) -> list[dict[str, bytes]]:
        return [dict(m.headers() or []) for m in self.cluster.records(self.topics.dlq)]

    def dlq_records(self) -> list[FakeMessage]:
        return self.cluster.records(self.topics.dlq)

    def advance(self, seconds: float) -> None:
        self.clock.t += int(seconds * 1000)
        self.proc.sweep()


def test_every_order_with_duplicates_gives_one_record_with_the_right_label() -> None:
    for clicked in (True, False):
        parts = ["imp", "copy"] + (["click"] if clicked else [])
        for order in itertools.permutations(parts + parts):  # each input twice, in every order
            rig = Rig()
            inputs = {
                "imp": rig.event(impression_event("i1", "c1", ts=T0)),
                "click": rig.event(click_event("i1", "c1", ts=T0 + 20_000)),
                "copy": rig.copy("c1"),
            }
            for name in order:
                rig.feed(inputs[name])
                rig.advance(1)
            rig.advance(CFG.window_s + CFG.lateness_s + 1)
            rig.advance(CFG.reclaim_s + 1)
            got = rig.feedback()
            assert len(got) == 1, order
            assert got[0].clicked is clicked and got[0].impression_id == "i1" and got[0].copy_id == "c1"
            assert (got[0].click_ts is not None) is clicked
            assert rig.dlq() == []


def test_a_clicked_impression_is_emitted_at_once_an_unclicked_one_when_the_window_closes() -> None:
    rig = Rig()
    rig.feed(rig.copy("c1"), rig.copy("c2"), rig.event(impression_event("i1", "c1", ts=T0)),
             rig.event(impression_event("i2", "c2", ts=T0)))
    rig.feed(rig.event(click_event("i1", "c1", ts=T0 + 3000)))
    assert [(r.impression_id, r.clicked) for r in rig.feedback()] == [("i1", True)]
    rig.advance(CFG.window_s - 1)
    assert len(rig.feedback()) == 1
    rig.advance(1 + CFG.lateness_s)
    assert [(r.impression_id, r.clicked) for r in rig.feedback()] == [("i1", True), ("i2", False)]
    # a late click after emission changes nothing
    rig.feed(rig.event(click_event("i2", "c2", ts=T0 + 10_000)))
    rig.advance(CFG.reclaim_s + 1)
    assert len(rig.feedback()) == 2


def test_click_before_its_impression_and_click_outside_the_window() -> None:
    rig = Rig()
    rig.feed(rig.copy("c1"), rig.copy("c2"))
    rig.feed(rig.event(click_event("i1", "c1", ts=T0 + 1000)))  # impression not there yet
    rig.feed(rig.event(click_event("i2", "c2", ts=T0 + int(CFG.window_s + 10) * 1000)))  # too late
    rig.advance(5)
    assert rig.feedback() == []
    rig.feed(rig.event(impression_event("i1", "c1", ts=T0)), rig.event(impression_event("i2", "c2", ts=T0)))
    assert [(r.impression_id, r.clicked) for r in rig.feedback()] == [("i1", True)]
    rig.advance(CFG.window_s + CFG.lateness_s + 1)
    assert [(r.impression_id, r.clicked) for r in rig.feedback()] == [("i1", True), ("i2", False)]


def test_feedback_record_carries_the_copy_fields_and_features() -> None:
    rig = Rig()
    rig.feed(rig.copy("c1", style="urgency", propensity=0.25, model_version="v7"),
             rig.event(impression_event("i1", "c1", ts=T0, slot="pdp")),
             rig.event(click_event("i1", "c1", ts=T0 + 1000)))
    (r,) = rig.feedback()
    assert (r.model_version, r.style, r.propensity, r.policy, r.slot) == ("v7", "urgency", 0.25, "thompson", "pdp")
    assert r.features["product"]["category"] == "home/kitchen"
    assert r.text and r.user_id == "u1" and r.product_id == "p1"
    stats = rig.store.stats()
    assert stats.by["mv"]["livecopy-student@v7"] == (1, 1)
    assert stats.by["cat"]["home"] == (1, 1) and stats.by["pol"]["thompson"] == (1, 1)


def test_orphans_go_to_the_dlq_with_the_reason() -> None:
    rig = Rig()
    rig.feed(rig.event(click_event("i9", "c9", ts=T0)))  # its impression never comes
    rig.feed(rig.event(impression_event("i8", "c8", ts=T0)))  # its copy record never comes
    rig.advance(CFG.window_s + CFG.lateness_s + CFG.copy_wait_s + 1)
    assert [h["error"] for h in rig.dlq()] == [b"copy_not_found"]
    rig.advance(CFG.orphan_wait_s)
    reasons = sorted(h["error"] for h in rig.dlq())
    assert reasons == [b"copy_not_found", b"impression_not_found"]
    assert rig.feedback() == []
    assert rig.proc.orphans == 2


LONG_ID = "imp-" + "x" * 124  # 128 chars: valid, but "<id>:impression" was not


def raw_event(kind: str, impression_id: str, copy_id: str, ts_ms: int) -> bytes:
    """An event as a site may send it: its own spacing and field order, an RFC 3339 ts with an offset,
    category, price, props and an unknown field -- what a rebuilt event loses."""
    ts = datetime.fromtimestamp(ts_ms / 1000, tz=timezone(timedelta(hours=1))).isoformat(timespec="milliseconds")
    return (f'{{ "type": "{kind}", "event_id": "ev-{kind}-{impression_id[:8]}", "user_id": "u1",\n'
            f'  "ts": "{ts}", "product_id": "p1", "category": "home/kitchen", "price": 39.9,\n'
            f'  "impression_id": "{impression_id}", "copy_id": "{copy_id}", "slot": "pdp",\n'
            f'  "props": {{"ab": "b", "n": 3}}, "site_field": [1, 2] }}').encode()


def test_orphans_go_to_the_dlq_as_the_original_record() -> None:
    rig = Rig()
    ev = rig.topics.events
    imp = raw_event("impression", LONG_ID, "c8", T0 + 250)
    click = raw_event("click", "i9", "c9", T0 + 3000)
    click2 = raw_event("click", "i9", "c9", T0 + 1000)  # an earlier click, arriving later
    (off_imp,) = rig.feed_keyed((ev, None, imp))  # no key, its copy record never comes
    off_click, _ = rig.feed_keyed((ev, b"u1", click), (ev, b"u1", click2))  # keyed, its impression never comes
    rig.advance(CFG.orphan_wait_s + 1)
    got = {dict(m.headers() or [])["error"]: m for m in rig.dlq_records()}
    assert set(got) == {b"copy_not_found", b"impression_not_found"}
    m = got[b"copy_not_found"]
    assert (m.key(), m.value()) == (None, imp)
    assert dict(m.headers() or [])["source.offset"] == str(off_imp).encode()
    m = got[b"impression_not_found"]
    assert (m.key(), m.value()) == (b"u1", click)  # the first click's record: the one `src` names
    h = dict(m.headers() or [])
    assert (h["source.topic"], h["source.partition"], h["source.offset"]) == (ev.encode(), b"0",
                                                                              str(off_click).encode())
    assert all(rig.store.states[i].raw_value is None for i in (LONG_ID, "i9"))  # done: the bytes let go


def test_an_impression_after_its_click_makes_the_impression_the_record_kept() -> None:
    rig = Rig()
    ev = rig.topics.events
    click = raw_event("click", "i1", "c1", T0 + 3000)
    imp = raw_event("impression", "i1", "c1", T0)
    rig.feed_keyed((ev, b"u1", click))
    (off,) = rig.feed_keyed((ev, None, imp))
    st = rig.store.states["i1"]
    assert (st.raw_key, st.raw_value, st.source) == (None, imp, f"{ev}|0|{off}")
    rig.advance(CFG.copy_wait_s + 1)  # clicked, decided: waits copy_wait_s for its copy record
    (m,) = rig.dlq_records()
    assert (m.key(), m.value(), dict(m.headers() or [])["source.offset"]) == (None, imp, str(off).encode())


def test_an_unproducible_impression_goes_to_the_dlq_as_the_original_record() -> None:
    rig = Rig(producer=LimitedProducer)
    imp = raw_event("impression", "i1", "c1", T0)
    rig.feed(big_copy(rig, "c1"))
    rig.feed_keyed((rig.topics.events, b"u1", imp))
    rig.feed(rig.event(click_event("i1", "c1", ts=T0 + 1)))
    (m,) = rig.dlq_records()
    assert dict(m.headers() or [])["error"] == b"feedback_unproducible"
    assert (m.key(), m.value()) == (b"u1", imp)


def test_unacknowledged_produce_is_emitted_again_and_counted_once() -> None:
    rig = Rig()
    rig.producer.fail_deliveries = True
    try:
        rig.feed(rig.copy("c1"), rig.event(impression_event("i1", "c1", ts=T0)),
                 rig.event(click_event("i1", "c1", ts=T0 + 1)))
    except Exception as exc:  # the batch is retried by the loop
        assert "not acknowledged" in str(exc)
    rig.producer.fail_deliveries = False
    rig.advance(1)
    assert rig.feedback() == []  # claimed, waits for reclaim_s
    rig.advance(CFG.reclaim_s)
    assert [(r.impression_id, r.clicked) for r in rig.feedback()] == [("i1", True)]
    assert rig.store.stats().by["all"]["all"] == (1, 1)


def big_copy(rig: Rig, copy_id: str, size: int = 60_000) -> tuple[str, bytes]:
    """A copy record whose feedback record is over the LimitedProducer's 50,000 bytes."""
    rec = orjson.loads(copy_record(copy_id))
    rec["features"]["pad"] = "x" * size
    return rig.topics.copy, orjson.dumps(rec)


@pytest.mark.parametrize("broker_rejects", [False, True], ids=["refused-by-produce", "failed-in-delivery-report"])
def test_an_unproducible_feedback_record_goes_to_the_dlq_and_the_others_are_emitted(broker_rejects: bool) -> None:
    rig = Rig(producer=lambda cl: LimitedProducer(cl, broker_rejects=broker_rejects))
    # one batch, one sweep: i1 (too large a feedback record) is claimed before i2 and i3
    rig.feed(big_copy(rig, "c1"), rig.copy("c2"),
             *(rig.event(impression_event(i, c, ts=T0)) for i, c in (("i1", "c1"), ("i2", "c2"), ("i3", "c2"))),
             *(rig.event(click_event(i, c, ts=T0 + 1000)) for i, c in (("i1", "c1"), ("i2", "c2"))))
    assert [(r.impression_id, r.clicked) for r in rig.feedback()] == [("i2", True)]
    (dlq,) = rig.dlq_records()
    h = dict(dlq.headers() or [])
    assert h["error"] == b"feedback_unproducible"
    detail = h["error.detail"].decode()
    assert "MSG_SIZE_TOO_LARGE" in detail and "i1" in detail and "\n" not in detail and len(detail) <= 300
    assert (h["source.topic"], h["source.partition"], h["source.offset"]) == (rig.topics.events.encode(), b"0", b"3")
    assert rig.proc.unproducible == 1
    for _ in range(3):  # done: never claimed again, the window of i3 closes as usual
        rig.advance(CFG.reclaim_s + CFG.window_s)
    assert [(r.impression_id, r.clicked) for r in rig.feedback()] == [("i2", True), ("i3", False)]
    assert len(rig.dlq_records()) == 1
    stats = rig.store.stats().by
    assert stats["all"]["all"] == (2, 1) and stats["dlq"]["feedback_unproducible"] == (1, 1)
    assert rig.store.states["i1"].status == DONE


def test_a_feedback_record_that_cannot_be_built_goes_to_the_dlq() -> None:
    rig = Rig()
    rig.feed(rig.copy("c1"), rig.copy("c2"))
    rig.store.copies["c1"] = b'{"copy_id": "c1"}'  # a stored copy record the feedback record cannot be made from
    rig.feed(rig.event(impression_event("i1", "c1", ts=T0)), rig.event(impression_event("i2", "c2", ts=T0)),
             rig.event(click_event("i1", "c1", ts=T0 + 1)), rig.event(click_event("i2", "c2", ts=T0 + 1)))
    assert [r.impression_id for r in rig.feedback()] == ["i2"]
    assert [h["error"] for h in rig.dlq()] == [b"feedback_unproducible"]
    rig.advance(CFG.reclaim_s + 1)
    assert len(rig.feedback()) == 1 and len(rig.dlq()) == 1


def test_the_loop_survives_an_unproducible_record_across_reclaims() -> None:
    """The audit's repro: the loop's own sweep used to raise KafkaException every reclaim_s."""
    rig = Rig(producer=LimitedProducer)
    ev = rig.topics.events
    rig.cluster.append(rig.topics.copy, b"u1", big_copy(rig, "c1")[1], partition=0)
    rig.cluster.append(ev, b"u1", orjson.dumps(impression_event("i1", "c1", ts=T0)), partition=0)
    rig.cluster.append(ev, b"u1", orjson.dumps(click_event("i1", "c1", ts=T0 + 5)), partition=0)
    loop = FeedbackLoop(FakeConsumer(rig.cluster, "g"), rig.producer, rig.proc, sweep_interval_s=0.0,
                        topics=[ev, rig.topics.copy], dlq_topic=rig.topics.dlq, max_batch=100)
    loop.start()
    loop.step()
    for _ in range(3):
        rig.clock.t += int(CFG.reclaim_s * 1000) + 1
        loop.step()
    assert [h["error"] for h in rig.dlq()] == [b"feedback_unproducible"]
    assert rig.feedback() == []


def test_a_retryable_failure_leaves_only_that_impression_for_later() -> None:
    rig = Rig(producer=lambda cl: LimitedProducer(cl, timeout=lambda m: b'"impression_id":"i1"' in (m.value() or b"")))
    with pytest.raises(TransientError, match="i1"):
        rig.feed(rig.copy("c1"), rig.event(impression_event("i1", "c1", ts=T0)),
                 rig.event(impression_event("i2", "c1", ts=T0)), rig.event(click_event("i1", "c1", ts=T0 + 1)),
                 rig.event(click_event("i2", "c1", ts=T0 + 1)))
    assert [r.impression_id for r in rig.feedback()] == ["i2"]  # acknowledged: done
    assert isinstance(rig.producer, LimitedProducer)
    rig.producer.timeout = None  # the broker is back
    rig.advance(CFG.reclaim_s + 1)
    assert [r.impression_id for r in rig.feedback()] == ["i1", "i2"]  # each exactly once
    assert rig.dlq() == [] and rig.store.stats().by["all"]["all"] == (2, 2)


def test_random_interleavings_against_a_reference() -> None:
    rng = random.Random(5)
    rig = Rig()
    truth: dict[str, bool] = {}
    inputs: list[tuple[str, bytes]] = []
    for n in range(200):
        imp, cp = f"i{n}", f"c{n // 2}"  # two impressions per copy
        clicked = rng.random() < 0.3
        truth[imp] = clicked
        inputs.append(rig.event(impression_event(imp, cp, ts=T0 + n)))
        if clicked:
            inputs.append(rig.event(click_event(imp, cp, ts=T0 + n + rng.randint(-500, 50_000))))
        if n % 2 == 0:
            inputs.append(rig.copy(cp))
    inputs += rng.sample(inputs, 80)  # re-deliveries
    rng.shuffle(inputs)
    for i in range(0, len(inputs), 17):
        rig.feed(*inputs[i:i + 17])
        rig.advance(rng.random())
    rig.advance(CFG.window_s + CFG.lateness_s + CFG.reclaim_s + 1)
    got = {r.impression_id: r.clicked for r in rig.feedback()}
    assert len(rig.feedback()) == 200 and got == truth
    assert rig.store.stats().by["all"]["all"] == (200, sum(truth.values()))


def test_apply_item_is_idempotent_and_keeps_the_earliest_click() -> None:
    imp = event_item(_ev(impression_event("i1", "c1", ts=T0)))
    c1 = event_item(_ev(click_event("i1", "c1", ts=T0 + 900)))
    c2 = event_item(_ev(click_event("i1", "c1", ts=T0 + 500)))
    assert imp and c1 and c2
    s, ch = apply_item(None, c1, T0)
    assert ch and s.imp_ts is None
    s, ch = apply_item(s, imp, T0 + 1)
    assert ch and s.imp_ts == T0
    s, ch = apply_item(s, imp, T0 + 2)
    assert not ch
    s, ch = apply_item(s, c2, T0 + 3)
    assert ch and s.click_ts == T0 + 500
    assert decide(s, True, T0 + 3, CFG).kind == "emit"
    assert decide(ImpressionState("x", status=DONE), True, T0, CFG).kind == "drop"


def test_ctr_stats_sum_fields() -> None:
    st = CtrStats.from_fields({"n|mv|a@1": 4, "k|mv|a@1": 1, "n|all|all": 4, "k|all|all": 1})
    assert st.ctr("mv", "a@1") == 0.25 and st.by["all"]["all"] == (4, 1)
    assert st.to_json_dict()["mv"]["a@1"]["ctr"] == 0.25


def _ev(d: dict[str, object]) -> Event:
    return Event.model_validate(d)
