from __future__ import annotations

import orjson
import pytest

from core.contracts import Event, format_ts, parse_event_time
from core.settings import Settings
from core.wire import Rejection, Topics, decode_event, encode_event

GOOD = {
    "event_id": "e-1f3a",
    "type": "product_view",
    "user_id": "u-42",
    "ts": "2026-11-22T10:00:00Z",
    "product_id": "sku-981",
    "category": "home/kitchen",
    "price": 39.9,
}


def raw(**over: object) -> bytes:
    d = {**GOOD, **over}
    return orjson.dumps({k: v for k, v in d.items() if v is not ...})


def reason(key: bytes | None, value: bytes | None) -> str:
    with pytest.raises(Rejection) as ei:
        decode_event(key, value)
    return ei.value.reason


def test_contract_example_is_valid_and_time_is_normalised() -> None:
    ev = decode_event(b"u-42", raw())
    assert ev.ts == 1795341600000
    assert ev.price == 39.9 and ev.category == "home/kitchen"
    assert decode_event(None, raw()).user_id == "u-42"  # no key: fine


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2026-11-22T10:00:00Z", 1795341600000),
        ("2026-11-22T10:00:00.123Z", 1795341600123),
        ("2026-11-22T10:00:00.123456789Z", 1795341600123),
        ("2026-11-22T11:00:00+01:00", 1795341600000),
        ("2026-11-22t10:00:00z", 1795341600000),
        (1795341600123, 1795341600123),
    ],
)
def test_event_time_forms(text: str | int, ms: int) -> None:
    assert parse_event_time(text) == ms


def test_format_ts_round_trips() -> None:
    assert parse_event_time(format_ts(1795341600123)) == 1795341600123


def test_unknown_fields_are_ignored() -> None:
    ev = decode_event(None, raw(new_field={"x": 1}, another=3))
    assert "new_field" not in ev.model_dump()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"not json at all", "not_json"),
        (b"\xff\xfe\x00garbage", "not_json"),
        (b"[1, 2, 3]", "not_object"),
        (raw(price="39.90"), "wrong_type"),
        (raw(quantity=2.5, type="add_to_cart"), "wrong_type"),
        (raw(ts=True), "wrong_type"),
        (raw(ts=1.5), "wrong_type"),
        (raw(event_id=17), "wrong_type"),
        (raw(product_id=...), "missing_field"),
        (raw(event_id=...), "missing_field"),
        (raw(type="search", query=...), "missing_field"),
        (raw(type="click", impression_id=...), "missing_field"),
        (raw(event_id="has space"), "bad_charset"),
        (raw(user_id="u/42"), "bad_charset"),
        (raw(event_id="x" * 129), "bad_charset"),
        (raw(type="teleport"), "unknown_type"),
        (raw(ts="yesterday"), "bad_format"),
        (raw(ts="2026-11-22T10:00:00"), "bad_format"),  # RFC 3339 needs an offset
        (raw(category="a//b"), "bad_format"),
        (raw(price=-1), "out_of_range"),
        (raw(price=1e9), "out_of_range"),
        (raw(type="add_to_cart", quantity=0), "out_of_range"),
        (raw(query="q" * 513, type="search"), "bad_length"),
        (raw(props={"blob": "x" * 5000}), "bad_length"),
        (raw(props={"blob": "x" * 70_000}), "oversize"),
        # valid JSON, but no 64-bit integer: a reason, not a crash
        (raw(props={"n": 0}).replace(b'"n":0', b'"n":1180591620717411303424'), "out_of_range"),
        (raw(props={"a": {"b": [0]}}).replace(b"[0]", b"[18446744073709551616]"), "out_of_range"),
        (raw(ts="2026-11-22T10:00:00Z\n"), "bad_format"),
    ],
)
def test_malformed_inputs_are_rejected_with_their_reason(value: bytes, expected: str) -> None:
    assert reason(None, value) == expected


def test_key_must_equal_user_id() -> None:
    assert reason(b"u-43", raw()) == "key_mismatch"


def test_missing_value_is_rejected() -> None:
    assert reason(b"u-42", None) == "empty"


def test_encode_decode_round_trip() -> None:
    ev = decode_event(None, raw(props={"page": "home"}, slot="pdp_hero"))
    again = decode_event(ev.user_id.encode(), encode_event(ev))
    assert again == ev


def test_event_model_accepts_python_dicts() -> None:
    ev = Event.model_validate({**GOOD, "ts": 5})
    assert ev.ts == 5 and ev.type.value == "product_view"


def test_topic_names_follow_the_prefix_and_overrides() -> None:
    t = Topics.from_settings(Settings().topics)
    assert (t.events, t.dlq, t.copy, t.feedback, t.model_updates) == (
        "livecopy.events", "livecopy.events.dlq", "livecopy.copy", "livecopy.feedback", "livecopy.model-updates"
    )
    assert t.partition_counts()["livecopy.events"] == 8 and t.partition_counts()["livecopy.copy"] == 4
    t2 = Topics.from_settings(Settings(topics={"prefix": "shop.", "copy": "site-copy"}).topics)  # type: ignore[arg-type]
    assert t2.events == "shop.events" and t2.copy == "site-copy" and t2.dlq == "shop.events.dlq"


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVECOPY_KAFKA__BOOTSTRAP_SERVERS", "broker:29092")
    monkeypatch.setenv("LIVECOPY_PROFILE__HALF_LIFE_S", "60")
    s = Settings()
    assert s.kafka.bootstrap_servers == "broker:29092"
    assert s.profile.half_life_s == 60.0
