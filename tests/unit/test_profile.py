from __future__ import annotations

import random

import pytest

from core.contracts import Event
from core.settings import ProfileSettings
from stream.profile.logic import ProfileState, apply_event, category_credits, render, replay

HOUR = 3_600_000
T0 = 1_795_341_600_000
CFG = ProfileSettings(half_life_s=3600, recent_products=3, dedupe_window_s=600)


def ev(i: int, type: str = "product_view", ts: int = T0, user: str = "u", **kw: object) -> Event:
    d: dict[str, object] = {"event_id": f"e{i}", "type": type, "user_id": user, "ts": ts}
    if type in ("product_view", "add_to_cart", "purchase", "impression", "click"):
        d.setdefault("product_id", f"p{i}")
    if type in ("impression", "click"):
        d.update(impression_id="i1", copy_id="c1")
    if type == "search":
        d["query"] = "shoes"
    d.update(kw)
    return Event.model_validate(d)


def fold(events: list[Event], now: int = T0) -> ProfileState:
    s = ProfileState()
    for e in events:
        s, _ = apply_event(s, e, now, CFG)
    return s


def test_counts_seen_times_and_money() -> None:
    s = fold([
        ev(1, ts=T0 + 5),
        ev(2, "add_to_cart", ts=T0 + 1, price=10.0, quantity=3),
        ev(3, "add_to_cart", ts=T0 + 2, price=2.5),
        ev(4, "purchase", ts=T0 + 9, price=7.0, quantity=2),
        ev(5, "page_view", ts=T0 + 3),
    ])
    p = render("u", s, CFG)
    assert p.event_counts == {"add_to_cart": 2, "page_view": 1, "product_view": 1, "purchase": 1}
    assert p.cart_value == 32.5 and p.purchase_value == 14.0
    assert p.first_seen == "2026-11-22T10:00:00.001Z" and p.last_seen == "2026-11-22T10:00:00.009Z"
    assert p.profile_version == 5


def test_duplicate_event_id_takes_effect_once_within_the_window() -> None:
    s0 = fold([ev(1, "add_to_cart", price=5.0)])
    s1, applied = apply_event(s0, ev(1, "add_to_cart", price=5.0), T0 + 1000, CFG)
    assert not applied and s1.version == 1 and s1.cart_value == 5.0
    # after the dedupe window the id is forgotten (the window is the documented guarantee)
    s2, applied = apply_event(s0, ev(1, "add_to_cart", price=5.0), T0 + CFG.dedupe_window_s * 1000 + 1, CFG)
    assert applied and s2.version == 2


def test_apply_does_not_mutate_its_input() -> None:
    s0 = fold([ev(1)])
    before = render("u", s0, CFG)
    apply_event(s0, ev(2, category="a/b"), T0, CFG)
    assert render("u", s0, CFG) == before


def test_affinity_decays_with_event_time_half_life() -> None:
    s = fold([ev(1, category="shoes", ts=T0), ev(2, category="shoes", ts=T0 + HOUR)])
    # 1.0 credit an hour (one half-life) old + 1.0 fresh
    assert render("u", s, CFG).category_affinity["shoes"] == pytest.approx(1.5)
    s = fold([ev(1, category="shoes", ts=T0), ev(2, category="hats", ts=T0 + 2 * HOUR)])
    aff = render("u", s, CFG).category_affinity
    assert aff["shoes"] == pytest.approx(0.25) and aff["hats"] == pytest.approx(1.0)


def test_affinity_weights_by_type_and_credits_category_prefixes() -> None:
    s = fold([ev(1, "purchase", category="electronics/audio/headphones", price=1.0)])
    aff = render("u", s, CFG).category_affinity
    assert aff == {"electronics": 5.0, "electronics/audio": 5.0, "electronics/audio/headphones": 5.0}
    assert category_credits("a/b/c/d/e/f", 1.0, 2) == (("a", 1.0), ("a/b", 1.0), ("a/b/c/d/e/f", 1.0))
    s = fold([ev(1, "impression", category="x")])
    assert render("u", s, CFG).category_affinity == {}


def test_recent_products_newest_event_time_first_unique_and_bounded() -> None:
    s = fold([
        ev(1, product_id="a", ts=T0 + 1),
        ev(2, product_id="b", ts=T0 + 5),
        ev(3, product_id="a", ts=T0 + 9),
        ev(4, product_id="c", ts=T0 + 3),
        ev(5, product_id="d", ts=T0 + 4),
        ev(6, "impression", product_id="z", ts=T0 + 99),  # impressions are not products the user viewed
    ])
    assert render("u", s, CFG).recent_products == ["a", "b", "d"]


def test_out_of_order_delivery_gives_the_same_profile() -> None:
    rng = random.Random(7)
    cats = ["a", "a/b", "c/d/e", "f"]
    events = []
    for i in range(60):
        t = rng.choice(["product_view", "add_to_cart", "purchase", "search", "click", "page_view"])
        kw: dict[str, object] = {"category": rng.choice(cats), "ts": T0 + rng.randrange(48 * HOUR)}
        if t in ("add_to_cart", "purchase"):
            kw.update(price=round(rng.random() * 50, 2), quantity=rng.randint(1, 3))
        if t in ("product_view", "add_to_cart", "purchase", "click"):
            kw["product_id"] = f"p{rng.randrange(8)}"
        events.append(ev(i, t, **kw))
    reference = render("u", fold(events), CFG)
    for _ in range(5):
        shuffled = events[:]
        rng.shuffle(shuffled)
        # and some redeliveries
        shuffled += rng.sample(events, 10)
        got = render("u", fold(shuffled), CFG)
        assert got.event_counts == reference.event_counts
        assert got.recent_products == reference.recent_products
        assert (got.first_seen, got.last_seen, got.profile_version) == (
            reference.first_seen, reference.last_seen, reference.profile_version)
        assert got.cart_value == pytest.approx(reference.cart_value)
        assert got.category_affinity.keys() == reference.category_affinity.keys()
        for c, a in reference.category_affinity.items():
            assert got.category_affinity[c] == pytest.approx(a, rel=1e-9)


def test_replay_groups_by_user() -> None:
    states = replay([ev(1, user="a"), ev(2, user="b"), ev(3, user="a")], CFG, T0)
    assert {u: s.version for u, s in states.items()} == {"a": 2, "b": 1}
