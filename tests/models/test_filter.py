from __future__ import annotations

import pytest

from core.catalog import Catalog, Product
from models.text.context import product_context
from models.text.filter import (
    FilterStats,
    allowed_numbers,
    check_copy,
    fallback_copy,
    first_safe,
    load_banned,
)

SKILLET = Product(
    product_id="sku-t1", title="Hearthwood Non-Stick Cast-Iron Skillet", category="home/kitchen",
    brand="Hearthwood", price=39.99, attributes=("non-stick",), rating=4.4, reviews=312, eco=False,
    discount_pct=20, noun="cast-iron skillet",
)
MAT = Product(
    product_id="sku-t2", title="Pulse Eco-Friendly Yoga Mat", category="sports/fitness", brand="Pulse",
    price=29.99, attributes=("eco-friendly",), rating=4.7, reviews=40, eco=True, discount_pct=0, noun="yoga mat",
)


def test_good_copy_passes() -> None:
    assert check_copy("Save 20% on the Hearthwood Non-Stick Cast-Iron Skillet, now just $31.99.", SKILLET).ok
    assert check_copy("Rated 4.7 stars by 40 shoppers: the Pulse Eco-Friendly Yoga Mat.", MAT).ok
    assert check_copy("A more sustainable choice: this yoga mat is kinder to the planet.", MAT).ok


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Skillet!", "too_short"),
        ("The Hearthwood skillet " + "is great and shiny " * 20, "too_long"),
        ("The Hearthwood skillet.\nBuy it now.", "multiline"),
        ("Get the {product_name} skillet from Hearthwood today.", "placeholder"),
        ("The Hearthwood skillet for [PRICE], a steal.", "placeholder"),
        ("The Hearthwood skillet <s:discount> is here for you.", "placeholder"),
        ("I love the Hearthwood skillet, you will too.", "first_person"),
        ("The Hearthwood skillet is guaranteed to change your cooking.", "banned:guaranteed"),
        ("A miracle skillet from Hearthwood, 20% off.", "banned:miracle"),
        ("The Hearthwood skillet is the best best skillet around.", "repetition"),
        ("Cook more with less oil: cook more with the Hearthwood skillet, cook more with less oil.", "repetition"),
        ("Fresh coffee beans, roasted this week, 20% off.", "off_product"),
        ("The Hearthwood skillet is now 35% off.", "unsupported_number"),
        ("The Hearthwood skillet, loved by 5,000 reviewers.", "unsupported_number"),
        ("The Hearthwood skillet: sustainable and kinder to the planet.", "false_eco_claim"),
        ("The Pulse yoga mat, now 20% off for a short while.", "unsupported_number"),
        ("The Pulse yoga mat at a discount price for members.", "false_discount_claim"),
        ("The Pulse yoga mat is a bestseller in every gym.", "unsupported_bestseller"),
        ("Shop the Hearthwood skillet at www.example.com now.", "link_or_hashtag"),
        ("The Hearthwood skillet #cooking for everyone.", "link_or_hashtag"),
    ],
)
def test_rejections_name_the_rule(text: str, reason: str) -> None:
    product = MAT if "Pulse" in text else SKILLET
    res = check_copy(text, product)
    assert not res.ok
    assert res.reason == reason


def test_the_records_own_title_is_not_a_hashtag_or_link() -> None:
    knife = Product(
        product_id="rw-0190", title="X-ACTO #1 Precision Knife with Safety Cap", category="crafts/tools",
        brand="X-ACTO", price=6.79, attributes=("precision",), rating=4.8, reviews=21000, eco=False,
        discount_pct=0, noun="precision knife",
    )
    assert check_copy("Get the X-ACTO #1 Precision Knife with Safety Cap for just $6.79.", knife).ok
    res = check_copy("Get the X-ACTO #1 Precision Knife with Safety Cap #crafts for just $6.79.", knife)
    assert res.reason == "link_or_hashtag"  # a hashtag of the model's own is still rejected


def test_numbers_from_product_are_allowed() -> None:
    nums = allowed_numbers(SKILLET)
    assert {39.99, 20.0, 31.99, 8.0, 4.4, 312.0} <= nums
    assert check_copy("The Hearthwood skillet: save $8.00 today, now $31.99.", SKILLET).ok


def test_banned_list_is_data_and_custom_lists_apply() -> None:
    words = load_banned()
    assert "guaranteed" in words and "miracle" in words
    assert all(w == w.lower() for w in words)
    text = "The Hearthwood skillet, a shiny thing for your kitchen."
    assert check_copy(text, SKILLET).ok
    assert check_copy(text, SKILLET, banned=["shiny"]).reason == "banned:shiny"


def test_fallback_is_deterministic_and_passes_for_the_whole_catalog() -> None:
    cat = Catalog.generate(400, 11)
    for p in cat:
        ctx = product_context(p)
        text = fallback_copy(ctx)
        assert text == fallback_copy(ctx)
        assert check_copy(text, p).ok, text


def test_fallback_never_raises_on_a_hostile_product() -> None:
    bad = Product(product_id="x", title="Miracle Cure {name}", category="a/b", brand="", price=5.0, noun="")
    text = fallback_copy(product_context(bad))
    assert isinstance(text, str) and text


def test_first_safe_counts_and_falls_back() -> None:
    ctx = product_context(SKILLET)
    stats = FilterStats()
    texts = ["I love the Hearthwood skillet so much.", "Save 20% on the Hearthwood skillet today."]
    text, fb = first_safe(texts, ctx, stats)
    assert (text, fb) == ("Save 20% on the Hearthwood skillet today.", False)
    text, fb = first_safe(["nope", "guaranteed miracle skillet"], ctx, stats)
    assert fb and text == fallback_copy(ctx)
    d = stats.as_dict()
    assert d["checked"] == 4 and d["passed"] == 1 and d["fallbacks"] == 1
    assert d["reasons"] == {"first_person": 1, "too_short": 1, "banned": 1}
