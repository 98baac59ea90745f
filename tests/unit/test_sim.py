"""The simulator's pure parts: population file, hidden click model, sessions, statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from core.catalog import Catalog
from core.contracts import Event
from core.styles import STYLES
from livecopy.sim.live import LiveStats, in_holdout
from livecopy.sim.population import Population, Shopper, click_probability, load_population
from livecopy.sim.report import summary, table, version_changes, windowed
from livecopy.sim.shoppers import CopyAsk, Outcome, ShopperSim, ShownCopy, run_sessions

CATALOG = Catalog.generate(120, 7)


def small_population(**kw: Any) -> Population:
    return Population.build(load_population(users=kw.pop("users", 60), **kw), CATALOG)


def test_default_population_file_loads() -> None:
    cfg = load_population()
    assert cfg.name == "default" and cfg.users == 3000 and len(cfg.segments) == 4
    assert math.isclose(sum(s.weight for s in cfg.segments), 1.0)
    assert cfg.style_global["urgency"] < 0 < cfg.style_global["social_proof"]


def test_population_file_overrides_defaults(tmp_path: Path) -> None:
    f = tmp_path / "pop.json"
    f.write_text(json.dumps({"name": "tiny", "users": 10, "style_global": {"eco": 2.0},
                             "segments": [{"name": "all", "weight": 1, "styles": {"eco": 1.0}}]}))
    cfg = load_population(f)
    assert (cfg.name, cfg.users, cfg.style_global) == ("tiny", 10, {"eco": 2.0})
    assert cfg.base_logit == load_population().base_logit  # untouched fields keep the defaults
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"style_global": {"shouting": 1.0}}))
    with pytest.raises(ValueError, match="unknown style"):
        load_population(bad)


def test_click_model_follows_the_hidden_tastes() -> None:
    cfg = load_population()
    product = next(p for p in CATALOG if p.top_category == "electronics" and not p.discount_pct)
    taste = dict.fromkeys(STYLES, 0.0) | {"social_proof": 1.0, "urgency": -1.0}
    s = Shopper("u-1", "follower", (product.category,), (1.0,), 0.5, product.price, 0.1, 0.0, taste)
    proof = f"Rated 4.8 by 2,000 reviewers: the {product.title}."
    hurry = f"Hurry, selling fast: the {product.title}."
    p_proof, p_hurry = (click_probability(cfg, s, product, t, "pdp") for t in (proof, hurry))
    assert 0 < p_hurry < p_proof < 1
    # the exact logit difference: global + category + personal taste of the two styles
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    expected = (cfg.style_global["social_proof"] + cfg.category_style["electronics"].get("social_proof", 0) + 1.0) - (
        cfg.style_global["urgency"] + cfg.category_style["electronics"].get("urgency", 0) - 1.0)
    assert logit(p_proof) - logit(p_hurry) == pytest.approx(expected)
    assert click_probability(cfg, s, product, proof + "!!!", "pdp") < p_proof  # exclamation marks cost


def _run(seed: int, n: int) -> tuple[list[dict[str, Any]], list[Outcome]]:
    pop = small_population()
    sim = ShopperSim(pop, seed=seed)
    events: list[dict[str, Any]] = []
    outcomes: list[Outcome] = []

    def source(asks: list[CopyAsk]) -> list[ShownCopy | None]:
        return [ShownCopy(f"c-{a.seq}", f"Loved by shoppers: the {a.product.title}.", "v1") for a in asks]

    shown = run_sessions(sim, source, events.append, impressions=n, concurrency=8, on_outcome=outcomes.append)
    assert shown == n == len(outcomes)
    return events, outcomes


def test_sessions_are_valid_reproducible_and_clicks_answer_impressions() -> None:
    events, outcomes = _run(3, 300)
    again, _ = _run(3, 300)
    assert events == again  # same seed, same answers -> same events, ids included
    assert _run(4, 300)[0] != events
    for e in events:
        Event.model_validate(e)  # every event is a valid v1 contract event
    imps = {e["impression_id"]: e for e in events if e["type"] == "impression"}
    clicks = [e for e in events if e["type"] == "click"]
    assert len(imps) == 300 and clicks
    for c in clicks:
        imp = imps[c["impression_id"]]
        assert (c["copy_id"], c["user_id"], c["product_id"]) == (imp["copy_id"], imp["user_id"], imp["product_id"])
    assert sum(o.shown.clicked for o in outcomes) == len(clicks)
    assert all(0 < o.shown.p_click < 1 for o in outcomes)
    assert {e["type"] for e in events} >= {"page_view", "product_view", "impression", "click"}


def test_a_failed_copy_shows_nothing() -> None:
    pop = small_population()
    events: list[dict[str, Any]] = []
    n = run_sessions(ShopperSim(pop, seed=1), lambda asks: [None] * len(asks), events.append,
                     until=lambda: len(events) > 200, concurrency=4)
    assert n == 0 and not [e for e in events if e["type"] in ("impression", "click")]


def test_summary_and_table() -> None:
    series = {"random": [0.1] * 100, "static": [0.1] * 80 + [0.12] * 20, "online": [0.1] * 80 + [0.15] * 20,
              "oracle": [0.2] * 100}
    s = summary(series)
    assert s["tail_from"] == 80 and s["ctr"]["online"] == pytest.approx(0.15)
    assert s["online_over_static"] == pytest.approx(0.15 / 0.12)
    assert s["gap_recovered"] == pytest.approx((0.15 - 0.12) / (0.2 - 0.12))
    assert "online / static = 1.250" in table(s)
    assert windowed([1, 2, 3, 4, 5], 2) == ([2, 4], [1.5, 3.5])
    assert version_changes(["a", "a", "b", "b", "c"]) == [(2, "b"), (4, "c")]


def test_live_stats_per_version_and_holdout_split() -> None:
    st = LiveStats()
    pop = small_population(users=5)
    ask = CopyAsk(pop.shoppers[0], CATALOG.products[0], "pdp", 0, 0)
    for i, v in enumerate(["v1", "v1", "v2", "v2", "v2"]):
        st.outcome(Outcome(ask, ShownCopy(f"c{i}", "t", v, p_click=0.1 * (i + 1), clicked=i % 2 == 0)))
    st.outcome(Outcome(ask, ShownCopy("h", "t", "v0", arm_p={"static": 0.2, "random": 0.1, "oracle": 0.3})))
    rows = {v: (n, c, e) for v, n, c, e in st.version_ctr()}
    assert rows["v1"] == (2, 0.5, pytest.approx(0.15)) and rows["v2"][0] == 3
    st.fail()
    st.latency(0.25)
    snap = st.snapshot()
    assert snap["impressions"] == {"random": 1, "static": 1, "online": 5, "oracle": 1}
    assert (snap["failed"], snap["copies"], snap["p99_ms"]) == (1, 6, 250.0)
    share = sum(in_holdout(f"sim-{i:05d}", 0.25) for i in range(4000)) / 4000
    assert 0.2 < share < 0.3


def test_version_bands_robust_range_and_the_lift_interval() -> None:
    from livecopy.sim.demo import lift_ci
    from livecopy.sim.live import wilson
    from livecopy.sim.report import robust_range, version_bands

    xs = [0.1] * 50 + [0.2, 0.22] * 25
    bands = version_bands(xs, [(50, "v2")])
    assert [(a, b) for a, b, _, _ in bands] == [(0, 50), (50, 100)]
    assert abs(bands[0][2] - 0.1) < 1e-9 and bands[0][3] < 1e-9 and abs(bands[1][2] - 0.21) < 1e-9 and bands[1][3] > 0
    lo, hi = robust_range([1.1] + [0.12, 0.13, 0.14] * 40)  # one early spike does not set the axis
    assert 0.0 <= lo < 0.12 and 0.14 < hi < 0.3
    w_lo, w_hi = wilson(15, 100)
    assert w_lo < 0.15 < w_hi and all(math.isnan(x) for x in wilson(0, 0))  # nan without impressions
    lift = lift_ci([0.2, 0.22, 0.18, 0.2] * 50, [0.1, 0.12, 0.08, 0.1] * 50)
    assert lift is not None and abs(lift["ratio"] - 2.0) < 1e-9 and lift["lo"] < 2.0 < lift["hi"]
    assert lift_ci([0.2], [0.1]) is None


def test_the_holdout_is_drawn_per_impression_and_its_copies_are_recognised() -> None:
    from livecopy.sim.live import SplitSource

    src = SplitSource(lambda asks: [None] * len(asks), lambda asks: [None] * len(asks), 0.25)

    class Ask:
        def __init__(self, user: str, seq: int) -> None:
            self.shopper = type("S", (), {"user_id": user})()
            self.seq = seq

    one_shopper = [src.is_holdout(Ask("heavy-user", i)) for i in range(4000)]  # type: ignore[arg-type]
    assert 0.2 < sum(one_shopper) / 4000 < 0.3  # a heavy shopper is not all holdout or all live
    assert src.is_holdout_copy("c-holdout-17") and not src.is_holdout_copy("c-0123") and not src.is_holdout_copy(None)
