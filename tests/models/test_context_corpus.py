from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import orjson
import pytest

from core.catalog import Catalog, Product
from core.contracts import Profile
from core.styles import STYLES, classify_style, style_of_token, style_token
from models.corpus import (
    Corpus,
    CorpusConfig,
    build_corpus,
    is_heldout,
    prior_click_logit,
    style_prior,
    template_copy,
)
from models.text.context import (
    CopyContext,
    build_prompt,
    context_from_features,
    context_from_profile,
    product_context,
)
from models.text.filter import check_copy, check_grounding
from models.text.slots import fill

HEADPHONES = Product(
    product_id="sku-h1", title="Aurora Wireless Headphones", category="electronics/audio", brand="Aurora",
    price=129.99, attributes=("wireless",), rating=4.6, reviews=1234, eco=False, discount_pct=20,
    noun="headphones",
)
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def profile(**kw: object) -> Profile:
    base: dict[str, object] = {
        "user_id": "u-1", "event_counts": {"product_view": 15, "add_to_cart": 2, "purchase": 1},
        "category_affinity": {"electronics": 6.0, "electronics/audio": 5.0, "home": 1.0, "home/kitchen": 1.0},
        "recent_products": [], "first_seen": "2026-11-01T10:00:00Z", "last_seen": "2026-11-23T11:00:00Z",
        "cart_value": 40.0, "purchase_value": 20.0, "profile_version": 15,
    }
    base.update(kw)
    return Profile(**base)  # type: ignore[arg-type]


def test_cold_start_context() -> None:
    ctx = context_from_profile(HEADPHONES, None, slot="pdp", now=NOW)
    assert (ctx.user, ctx.price_sensitivity, ctx.engagement, ctx.affinity) == ("new", "unknown", "cold", "none")
    assert ctx.slot == "pdp" and ctx.sale_price == 103.99


def test_profile_buckets() -> None:
    ctx = context_from_profile(HEADPHONES, profile(), now=NOW)
    assert ctx.user == "returning"
    assert ctx.price_sensitivity == "high"  # spends ~$20 per item, this is $129.99
    assert ctx.engagement == "engaged"
    assert ctx.likes == ("audio", "kitchen") and ctx.affinity == "high"
    lapsed = context_from_profile(HEADPHONES, profile(last_seen="2026-10-01T10:00:00Z"), now=NOW)
    assert lapsed.engagement == "lapsed"
    rich = context_from_profile(HEADPHONES, profile(cart_value=900.0, purchase_value=600.0), now=NOW)
    assert rich.price_sensitivity == "low"


def test_eco_minded_needs_recent_products() -> None:
    cat = Catalog.generate(300, 7)
    eco_ids = [p.product_id for p in cat if p.eco][:5]
    ctx = context_from_profile(HEADPHONES, profile(recent_products=eco_ids), now=NOW, lookup=cat.get)
    assert ctx.eco_minded
    assert not context_from_profile(HEADPHONES, profile(recent_products=eco_ids), now=NOW).eco_minded


def test_features_round_trip_rebuilds_the_prompt() -> None:
    ctx = context_from_profile(HEADPHONES, profile(), slot="feed", now=NOW)
    feats = orjson.loads(orjson.dumps(ctx.features()))  # as it travels on the feedback topic
    back = context_from_features(feats)
    assert back == ctx
    assert build_prompt(back) == build_prompt(ctx)
    with pytest.raises(ValueError):
        context_from_features({**feats, "v": 99})


def test_prompt_is_compact_and_mentions_persona() -> None:
    ctx = context_from_profile(HEADPHONES, profile(), slot="pdp", now=NOW)
    prompt = build_prompt(ctx)
    assert prompt.endswith("\n") and prompt.count("\n") == 2
    assert "Aurora" not in prompt and "deal some" in prompt and "price high" in prompt
    assert len(prompt) < 220


def test_style_tokens() -> None:
    for s in STYLES:
        assert style_of_token(style_token(s)) == s
    with pytest.raises(ValueError):
        style_token("bogus")


@pytest.mark.parametrize(
    ("text", "style"),
    [
        ("Save 20% on the Aurora headphones, a real deal.", "discount"),
        ("Hurry, the Aurora headphones are selling fast today.", "urgency"),
        ("Crafted with care and built to last: the Aurora headphones.", "quality"),
        ("Sustainably made and kinder to the planet: the Pulse yoga mat.", "eco"),
        ("Rated 4.6 stars by 1,234 reviewers: the Aurora headphones.", "social_proof"),
        ("The Aurora headphones fit right into your routine.", "practical"),
        ("The Kiln Space-Saving Floor Lamp fits small rooms.", "practical"),
        ("The Northloom Organic Recycled Hoodie keeps you warm.", "practical"),
        ("Don't miss out on the Aurora headphones, now only $79.", "urgency"),
        ("The Pulse yoga mat is better for the environment, and it's only $30.", "eco"),
        ("The Pulse Environmentally Certified Yoga Mat stretches well.", "practical"),
    ],
)
def test_classify_style(text: str, style: str) -> None:
    assert classify_style(text) == style


def test_corpus_is_deterministic_and_split_by_product(small_corpus: Corpus) -> None:
    again = build_corpus(CorpusConfig(max_products=80, per_product=6))
    assert again.data_hash() == small_corpus.data_hash()
    train_p = {r.product_id for r in small_corpus.train}
    held_p = {r.product_id for r in small_corpus.heldout}
    assert held_p and train_p and not train_p & held_p
    assert all(is_heldout(p) for p in held_p) and not any(is_heldout(p) for p in train_p)
    other = build_corpus(CorpusConfig(max_products=80, per_product=6, seed=99))
    assert other.data_hash() != small_corpus.data_hash()


def test_corpus_rows_are_safe_on_product_and_in_style(small_corpus: Corpus) -> None:
    rows = [r for r in small_corpus.train + small_corpus.heldout if r.lm]
    for r in rows:
        ctx = context_from_features(r.features)
        assert check_grounding(r.copy, ctx).ok, r.copy  # only slots the record fills, no spelled fact
        shown = fill(r.copy, ctx)
        assert check_copy(shown, ctx).ok, shown
        assert classify_style(shown) == r.style, shown
        assert r.prompt == build_prompt(ctx)
    assert {r.source for r in small_corpus.train} >= {"template", "teacher"}


def test_calls_to_action_never_repeat_the_core() -> None:
    import random

    ctx = product_context(HEADPHONES, "pdp")
    texts = [template_copy(ctx, style, random.Random(i)) for style in STYLES for i in range(60)]
    assert not [t for t in texts if t.lower().count("better for the planet") > 1 or t.lower().count("miss out") > 1]
    assert any("better for the planet" in t.lower() for t in texts)  # the phrase is there, once


def test_templates_vary() -> None:
    import random

    ctx = product_context(HEADPHONES)
    texts = {template_copy(ctx, "discount", random.Random(i)) for i in range(40)}
    assert len(texts) >= 8


def test_style_prior_follows_persona_with_noise() -> None:
    base = product_context(HEADPHONES)
    cheap = style_prior(base.with_persona(user="returning", price_sensitivity="high"))
    rich = style_prior(base.with_persona(user="returning", price_sensitivity="low"))
    new = style_prior(base.with_persona(user="new"))
    assert cheap["discount"] > rich["discount"] and rich["quality"] > cheap["quality"]
    assert new["social_proof"] == max(new.values())
    for p in (cheap, rich, new):
        assert abs(sum(p.values()) - 1) < 1e-9 and p["eco"] == 0.0  # not an eco product
        assert max(p.values()) < 0.7  # a tendency, not a rule


def test_prior_click_model_prefers_matching_style_and_on_product_copy() -> None:
    ctx = product_context(HEADPHONES).with_persona(user="returning", price_sensitivity="high")
    text = "Save 20% on the Aurora Wireless Headphones."
    assert prior_click_logit(ctx, "discount", text) > prior_click_logit(ctx, "quality", text)
    assert prior_click_logit(ctx, "discount", text, on_product=False) < prior_click_logit(ctx, "discount", text) - 1


def test_corpus_styles_shift_with_persona(small_corpus: Corpus) -> None:
    by = {"high": Counter(), "low": Counter()}  # type: dict[str, Counter[str]]
    for r in small_corpus.train:
        ps = r.features["price_sensitivity"]
        if ps in by and r.lm:
            by[ps][r.style] += 1
    share = {k: v["discount"] / max(sum(v.values()), 1) for k, v in by.items()}
    assert share["high"] > share["low"]


def test_context_is_hashable() -> None:
    ctx = product_context(HEADPHONES)
    assert isinstance(hash(ctx), int)
    assert isinstance(ctx, CopyContext)
