"""The HTTP collector's pure parts: shopper tokens, the in-memory token buckets, a body split into
events, each event's answer (the workers' own reasons), the request's status, and the Kafka sink
that answers only after the broker's delivery reports (on the in-memory producer of tests/fakes.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError

from core.settings import CollectorSettings, Settings
from core.wire import Rejection, decode_event
from stream.access.buckets import Limit, TokenBuckets
from stream.access.shopper_token import BadToken, sign_shopper_token, verify_shopper_token
from stream.collector.logic import (
    ACCEPTED,
    FAILED,
    REJECTED,
    BodyError,
    answer,
    needs_copy,
    settle_repeats,
    split_body,
    status_of,
    validate,
)
from stream.collector.sink import EventSink, OutRecord
from tests.fakes import FakeCluster, FakeProducer

SECRET = "s3cret-of-the-site-0123456789abcdef"
T = 1_800_000_000.0


def ev(i: int = 0, **over: Any) -> dict[str, Any]:
    return {"event_id": f"e{i}", "type": "product_view", "user_id": "u-1", "ts": 1_795_000_000_000 + i,
            "product_id": f"sku-{i}", **over}


def imp(i: int, copy: str = "c-1", user: str = "u-1", kind: str = "impression") -> dict[str, Any]:
    return {"event_id": f"i{i}", "type": kind, "user_id": user, "ts": 1_795_000_000_000, "product_id": "sku-1",
            "impression_id": f"imp-{i}", "copy_id": copy}


# -- shopper tokens ------------------------------------------------------------------------------
def test_a_token_names_its_shopper_until_it_expires() -> None:
    tok = sign_shopper_token(SECRET, "u-42@shop.example", ttl_s=3600, now_s=T)
    got = verify_shopper_token(SECRET, tok, now_s=T + 3599)
    assert (got.user_id, got.expires_s) == ("u-42@shop.example", int(T) + 3600)
    with pytest.raises(BadToken) as err:
        verify_shopper_token(SECRET, tok, now_s=T + 3600)
    assert err.value.reason == "expired"


def test_the_format_is_what_the_docs_tell_a_backend_in_another_language() -> None:
    tok = sign_shopper_token(SECRET, "u-7", ttl_s=60, now_s=T)
    payload = "lcs1." + base64.urlsafe_b64encode(b"u-7").rstrip(b"=").decode() + f".{int(T) + 60}"
    mac = base64.urlsafe_b64encode(hmac.new(SECRET.encode(), payload.encode(), hashlib.sha256).digest())
    assert tok == payload + "." + mac.rstrip(b"=").decode()


@pytest.mark.parametrize("forge", ["other_secret", "other_user", "later_expiry", "truncated", "garbage", "empty"])
def test_a_forged_or_broken_token_names_nobody(forge: str) -> None:
    tok = sign_shopper_token(SECRET, "u-1", ttl_s=600, now_s=T)
    head, user, exp, sig = tok.split(".")
    other_user = base64.urlsafe_b64encode(b"u-2").rstrip(b"=").decode()
    forged = {
        "other_secret": sign_shopper_token("another-site-secret-0123456789", "u-1", ttl_s=600, now_s=T),
        "other_user": f"{head}.{other_user}.{exp}.{sig}",  # another shopper under the same signature
        "later_expiry": f"{head}.{user}.{int(exp) + 10**6}.{sig}",
        "truncated": f"{head}.{user}.{exp}",
        "garbage": "not-a-token",
        "empty": "",
    }[forge]
    with pytest.raises(BadToken) as err:
        verify_shopper_token(SECRET, forged, now_s=T)
    assert err.value.reason in ("bad_signature", "malformed")
    assert err.value.reason == ("malformed" if forge in ("truncated", "garbage", "empty") else "bad_signature")


def test_a_token_living_longer_than_allowed_is_refused_and_bad_input_is_not_signed() -> None:
    tok = sign_shopper_token(SECRET, "u-1", ttl_s=30 * 86400, now_s=T)
    with pytest.raises(BadToken) as err:
        verify_shopper_token(SECRET, tok, now_s=T, max_ttl_s=7 * 86400)
    assert err.value.reason == "too_long_lived"
    with pytest.raises(ValueError):
        sign_shopper_token(SECRET, "bad user!", now_s=T)
    with pytest.raises(ValueError):
        sign_shopper_token("", "u-1", now_s=T)


# -- token buckets ------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_bucket_allows_its_burst_then_its_rate_and_says_how_long_to_wait() -> None:
    clock = Clock()
    b = TokenBuckets(clock=clock)
    lim = [Limit("k", rate_per_s=2.0, burst=5)]
    assert [b.take(lim) for _ in range(5)] == [0.0] * 5
    assert b.take(lim) == pytest.approx(0.5)  # one token comes every 0.5 s
    clock.t += 0.5
    assert b.take(lim) == 0.0
    assert b.take(lim, cost=3) == pytest.approx(1.5)
    clock.t += 100
    assert b.take(lim, cost=50) == 0.0  # larger than the bucket: costs the whole (full) bucket
    assert b.take(lim) == pytest.approx(0.5)


def test_buckets_are_taken_together_or_not_at_all() -> None:
    clock = Clock()
    b = TokenBuckets(clock=clock)
    key = Limit("key", rate_per_s=100.0, burst=100)
    ip1, ip2 = Limit("ip1", 1.0, 3), Limit("ip2", 1.0, 3)
    assert b.take([key, ip1], cost=3) == 0.0
    assert b.take([key, ip1], cost=1) == pytest.approx(1.0)  # ip1 is empty ...
    assert b.take([key, ip2], cost=3) == 0.0  # ... and its refusal took nothing from the key's bucket
    assert b.take([Limit("key", 100.0, 100)], cost=94) == 0.0
    assert b.take([Limit("key", 100.0, 100)], cost=1) > 0
    assert b.take([Limit("x", 0.0, 0)], cost=10**6) == 0.0  # rate 0: no limit


def test_the_buckets_memory_is_bounded_least_recent_first() -> None:
    clock = Clock()
    b = TokenBuckets(max_entries=100, clock=clock)
    for i in range(10_000):
        b.take([Limit(f"ip{i}", 1.0, 1)])
    assert len(b) == 100
    assert b.take([Limit("ip9999", 1.0, 1)]) > 0  # the most recent is still there (empty)
    assert b.take([Limit("ip0", 1.0, 1)]) == 0.0  # the oldest was dropped: it starts full


# -- bodies --------------------------------------------------------------------------------------
def test_a_json_array_json_lines_and_a_beacons_text_plain_give_the_same_events() -> None:
    events = [ev(0), ev(1), imp(2)]
    as_array = split_body(orjson.dumps(events), "application/json; charset=utf-8", 500)
    lines = b"\n".join(orjson.dumps(e) for e in events)
    as_lines = split_body(lines + b"\r\n\n", "application/x-ndjson", 500)
    assert as_array == as_lines == [orjson.dumps(e) for e in events]
    assert split_body(orjson.dumps(events), "text/plain;charset=UTF-8", 500) == as_array  # sendBeacon(string)
    assert split_body(lines, "text/plain", 500) == as_lines
    assert split_body(orjson.dumps(ev(0)), None, 500) == [orjson.dumps(ev(0))]  # one object: a batch of one


def test_a_json_line_is_produced_as_sent() -> None:
    line = b'{"event_id":"e1","type":"page_view","user_id":"u-1","ts":"2026-11-22T10:00:00+01:00","later":1}'
    assert split_body(line, "application/x-ndjson", 10) == [line]


@pytest.mark.parametrize(("body", "ctype", "status", "code"), [
    (b"", "application/json", 400, "empty_body"),
    (b"{not json", "application/json", 400, "not_json"),
    (b"5", "application/json", 400, "not_a_batch"),
    (b"[]", "application/xml", 415, "unsupported_media_type"),
    (orjson.dumps([ev(i) for i in range(11)]), "application/json", 413, "batch_too_large"),
    (b"\n".join(orjson.dumps(ev(i)) for i in range(11)), "application/x-ndjson", 413, "batch_too_large"),
])
def test_a_body_that_is_no_batch_is_refused_whole(body: bytes, ctype: str, status: int, code: str) -> None:
    with pytest.raises(BodyError) as err:
        split_body(body, ctype, 10)
    assert (err.value.status, err.value.code) == (status, code)
    assert split_body(orjson.dumps([ev(i) for i in range(10)]), "application/json", 10)  # at the limit: fine


# -- per-event answers ---------------------------------------------------------------------------
BAD: list[tuple[bytes, str]] = [
    (b"{this is not json", "not_json"),
    (orjson.dumps({**ev(), "price": "12.00"}), "wrong_type"),
    (orjson.dumps({"event_id": "b2", "type": "add_to_cart", "user_id": "u-1", "ts": 1}), "missing_field"),
    (orjson.dumps({**ev(), "event_id": "b 3 ?"}), "bad_charset"),
    (orjson.dumps({**ev(), "pad": "x" * 70_000}), "oversize"),
    (orjson.dumps({**ev(), "type": "teleport"}), "unknown_type"),
    (b"[1,2,3]", "not_object"),
    (orjson.dumps({k: v for k, v in imp(1).items() if k != "copy_id"}), "missing_field"),
]


def test_each_bad_event_gets_the_reason_a_worker_would_give_and_the_good_ones_pass() -> None:
    raws = [orjson.dumps(ev(0))] + [b for b, _ in BAD] + [orjson.dumps(ev(9))]
    items = validate(raws, shopper=None)
    for item, (raw, reason) in zip(items[1:-1], BAD, strict=True):
        with pytest.raises(Rejection) as worker:
            decode_event(None, raw)
        assert item.status == REJECTED and item.reason == reason == worker.value.reason
        assert item.detail == worker.value.detail and item.code == 422
    assert [it.status for it in (items[0], items[-1])] == [ACCEPTED, ACCEPTED]
    assert items[1].event_id is None and items[2].event_id == "e0"  # echoed when the event names one
    assert status_of(items) == 207
    body = answer(items)
    assert (body["accepted"], body["rejected"], body["failed"]) == (2, len(BAD), 0)
    assert body["results"][3] == {"index": 3, "event_id": "b2", "status": "rejected", "reason": "missing_field",
                                  "detail": items[3].detail}


def test_a_shopper_token_allows_that_shoppers_events_alone() -> None:
    items = validate([orjson.dumps(ev(0)), orjson.dumps(ev(1, user_id="u-2"))], shopper="u-1")
    assert [it.status for it in items] == [ACCEPTED, REJECTED]
    assert (items[1].reason, items[1].code) == ("forbidden_user", 403)
    only_foreign = validate([orjson.dumps(ev(1, user_id="u-2"))], shopper="u-1")
    assert status_of(only_foreign) == 403  # refused alike: that refusal's status
    assert status_of(validate([orjson.dumps(ev(0, user_id="u-2"))], shopper=None)) == 200  # a server: anyone


def test_statuses_all_accepted_all_invalid_and_failures() -> None:
    ok = validate([orjson.dumps(ev(i)) for i in range(3)], None)
    assert status_of(ok) == 200
    assert status_of(validate([b"{", b"[]"], None)) == 422
    mixed = validate([b"{", orjson.dumps(ev(1, user_id="u-2"))], "u-1")
    assert status_of(mixed) == 207  # refused for different reasons
    ok[1].fail("broker down")
    assert status_of(ok) == 503 and answer(ok)["results"][1]["status"] == FAILED


def test_an_event_id_repeated_in_a_batch_ends_as_its_first() -> None:
    items = validate([orjson.dumps(ev(0)), orjson.dumps(ev(0)), orjson.dumps(ev(1)), orjson.dumps(ev(1))], None)
    assert [it.pending for it in items] == [True, False, True, False]
    items[2].fail("not acknowledged")
    settle_repeats(items)
    assert [(it.status, it.duplicate) for it in items] == [(ACCEPTED, False), (ACCEPTED, True), (FAILED, False),
                                                           (FAILED, True)]


def test_impressions_and_clicks_need_a_served_copy() -> None:
    kinds = validate([orjson.dumps(imp(0)), orjson.dumps(imp(1, kind="click")), orjson.dumps(ev(2))], None)
    assert [needs_copy(it.event) for it in kinds if it.event is not None] == [True, True, False]


def test_collector_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVECOPY_COLLECTOR__PUBLISHABLE_KEYS",
                       '{"lcpk_a": {"site": "shop", "origins": ["https://shop.example"], "ip_rate_per_s": 3}}')
    monkeypatch.setenv("LIVECOPY_COLLECTOR__SITE_SECRETS", '{"shop": "0123456789abcdef"}')
    monkeypatch.setenv("LIVECOPY_COLLECTOR__MAX_BATCH", "50")
    c = Settings().collector
    assert c.publishable_keys["lcpk_a"].origins == ["https://shop.example"]
    assert c.publishable_keys["lcpk_a"].ip_rate_per_s == 3 and c.site_secrets == {"shop": "0123456789abcdef"}
    assert c.max_batch == 50 and CollectorSettings().max_body_bytes == 256 * 1024


@pytest.mark.parametrize(("secrets", "says"), [({}, "no secret for site shop"), ({"shop": "short"}, "under 16")])
def test_a_key_whose_site_has_no_usable_secret_stops_start_up(secrets: dict[str, str], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        CollectorSettings.model_validate({"publishable_keys": {"lcpk_a": {"site": "shop"}}, "site_secrets": secrets})


# -- the sink: answered after the delivery reports -------------------------------------------------
class DeliveringProducer(FakeProducer):
    """tests/fakes.py's producer, delivering on poll as librdkafka does from its queue."""

    def poll(self, timeout: float = 0) -> int:
        n = len(self.pending)
        self.flush()
        return n

    def __len__(self) -> int:
        return len(self.pending)


def test_the_sink_answers_per_record_after_the_broker_did() -> None:
    cluster = FakeCluster()
    cluster.create("events", 2)
    cluster.create("dlq", 1)
    producer = DeliveringProducer(cluster)
    sink = EventSink(producer, ack_timeout_s=2.0)  # type: ignore[arg-type]
    try:
        recs = [OutRecord("events", b"u-1", b"{}"), OutRecord("dlq", b"u-1", b"{1}", [("error", b"unknown_copy")])]
        assert asyncio.run(sink.write(recs)) == [None, None]
        assert [m.value() for m in cluster.records("events")] == [b"{}"]
        assert cluster.records("dlq")[0].headers() == [("error", b"unknown_copy")]
        producer.fail_deliveries = True
        out = asyncio.run(sink.write([OutRecord("events", b"u-1", b"{}")]))
        assert out[0] is not None and KafkaError(KafkaError._MSG_TIMED_OUT).str() in out[0]
        producer.fail_deliveries = False
        producer.max_message_bytes = 10
        out = asyncio.run(sink.write([OutRecord("events", b"u-1", b"x" * 100)]))  # refused by produce() itself
        assert out[0] is not None and "KafkaException" in out[0]
        assert (sink.written, sink.failed) == (2, 2)
    finally:
        assert sink.close() == 0


def test_the_sink_does_not_wait_past_its_timeout_for_a_silent_broker() -> None:
    class Silent(DeliveringProducer):
        def poll(self, timeout: float = 0) -> int:
            return 0

    cluster = FakeCluster()
    cluster.create("events", 1)
    sink = EventSink(Silent(cluster), ack_timeout_s=0.2)  # type: ignore[arg-type]
    try:
        out = asyncio.run(sink.write([OutRecord("events", b"u", b"{}")]))
        assert out == ["not acknowledged within 0.2 s"]
    finally:
        sink._stop.set()


def test_the_cli_signs_a_shopper_token_the_collector_accepts() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOPY_")}
    env["LIVECOPY_COLLECTOR__SITE_SECRETS"] = orjson.dumps({"shop": SECRET}).decode()
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "livecopy", "keys", "shopper-token", "--user", "u-9", "--ttl", "600"],
                         env=env, cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert verify_shopper_token(SECRET, out.stdout.strip()).user_id == "u-9"
    bad = subprocess.run([sys.executable, "-m", "livecopy", "keys", "shopper-token", "--user", "u-9", "--site", "x"],
                         env=env, cwd=root, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no secret for site 'x'" in bad.stderr
