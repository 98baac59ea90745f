"""Properties, checked on generated inputs (hypothesis): the event decoder answers every input with an
event or a Rejection and its reason; the profile merge is idempotent and independent of the order events
arrive in, and the caps bound a profile whatever the events."""

from __future__ import annotations

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.contracts import Event
from core.settings import ProfileSettings
from core.wire import Rejection, decode_event
from stream.profile.logic import ProfileState, apply_update, event_update, render

REASONS = {"not_json", "not_object", "wrong_type", "missing_field", "bad_charset", "bad_length", "bad_format",
           "out_of_range", "unknown_type", "oversize", "key_mismatch", "empty", "invalid"}
TYPES = ["page_view", "product_view", "search", "add_to_cart", "purchase", "impression", "click"]
T0 = 1_795_000_000_000

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12)
fields = st.fixed_dictionaries({}, optional={
    "event_id": st.one_of(st.text(max_size=140), st.integers(),
                          st.from_regex(r"[A-Za-z0-9_.:-]{1,20}", fullmatch=True)),
    "type": st.one_of(st.sampled_from([*TYPES, "refund"]), st.integers()),
    "user_id": st.one_of(st.text(max_size=10), st.from_regex(r"[a-z0-9@]{1,12}", fullmatch=True)),
    "ts": st.one_of(st.integers(min_value=-10, max_value=2**70), st.text(max_size=30), st.floats()),
    "product_id": st.text(max_size=12), "category": st.text(max_size=40), "price": st.one_of(st.floats(), st.text()),
    "quantity": st.integers(), "query": st.text(max_size=20), "slot": st.text(max_size=70),
    "props": json_values, "impression_id": st.text(max_size=10), "copy_id": st.text(max_size=10)})


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_bytes_decode_to_an_event_or_a_rejection(raw: bytes) -> None:
    try:
        decode_event(None, raw)
    except Rejection as rej:
        assert rej.reason in REASONS


@given(fields, st.one_of(st.none(), st.binary(max_size=12)))
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_json_object_decodes_to_an_event_or_a_rejection_with_its_reason(doc: dict[str, object],
                                                                             key: bytes | None) -> None:
    try:
        raw = orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        return  # not representable as JSON (e.g. an integer over 64 bits): not an input a broker carries
    try:
        ev = decode_event(key, raw)
    except Rejection as rej:
        assert rej.reason in REASONS and rej.detail and "\n" not in rej.detail
    else:
        assert isinstance(ev, Event) and (key is None or key == ev.user_id.encode())


events = st.lists(st.builds(
    lambda i, t, dt, cat, p: Event.model_validate({
        "event_id": f"e{i}", "type": t, "user_id": "u", "ts": T0 + dt, "category": cat, "product_id": f"p{p}",
        "price": 2.5, "query": "q", "impression_id": "i", "copy_id": "c"}),
    st.integers(0, 40), st.sampled_from(TYPES), st.integers(0, 10**9), st.sampled_from(["a", "a/b", "c/d/e", "ü"]),
    st.integers(0, 30)), min_size=1, max_size=30, unique_by=lambda e: e.event_id)


def fold(evs: list[Event], cfg: ProfileSettings) -> ProfileState:
    s = ProfileState()
    for e in evs:
        s, _ = apply_update(s, event_update(e, cfg), T0, cfg)
    return s


@given(events, st.randoms(use_true_random=False))
@settings(max_examples=150, deadline=None)
def test_the_merge_is_independent_of_arrival_order_and_idempotent(evs: list[Event], rnd: object) -> None:
    cfg = ProfileSettings(max_categories=0, max_seen=0, dedupe_window_s=10**6, recent_products=5)
    once = fold(evs, cfg)
    shuffled = list(evs)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    other = fold(shuffled, cfg)
    a, b = render("u", once, cfg), render("u", other, cfg)
    assert a.event_counts == b.event_counts and a.profile_version == b.profile_version == len(evs)
    assert (a.first_seen, a.last_seen, a.recent_products) == (b.first_seen, b.last_seen, b.recent_products)
    assert abs(a.cart_value - b.cart_value) < 1e-6 and abs(a.purchase_value - b.purchase_value) < 1e-6
    assert a.category_affinity.keys() == b.category_affinity.keys()
    for c, v in a.category_affinity.items():
        assert abs(v - b.category_affinity[c]) <= 1e-9 * max(1.0, abs(v))
    assert fold(evs + evs, cfg) == once  # every event a second time: nothing changes


@given(events)
@settings(max_examples=100, deadline=None)
def test_caps_bound_the_profile_whatever_the_events(evs: list[Event]) -> None:
    cfg = ProfileSettings(max_categories=2, dedupe_window_s=10**6, recent_products=3)
    s = fold(evs, cfg)
    assert len(s.affinity) <= 2 and len(s.recent) <= 3
