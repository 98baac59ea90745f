"""The catalogs copy is measured on: the hand-written real-world file and the disjoint generator."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from core.catalog import _TAXONOMY, Catalog, Product, vocabulary
from core.catalog_io import decode_product
from livecopy.sim.disjoint_catalog import _TAXONOMY as DISJOINT_TAXONOMY
from livecopy.sim.disjoint_catalog import disjoint_vocabulary, generate_disjoint

REAL = Path(__file__).resolve().parents[2] / "catalogs" / "real_world.jsonl"


def _norm(word: str) -> str:
    """'Ultra-Light' and 'ultralight' are one word."""
    return re.sub(r"[^0-9a-z]", "", word.lower())


@pytest.fixture(scope="module")
def real() -> Catalog:
    return Catalog.load_jsonl(REAL)


def test_every_line_of_the_real_world_file_is_a_valid_product() -> None:
    lines = [line for line in REAL.read_bytes().splitlines() if line.strip()]
    assert len(lines) >= 160
    for n, line in enumerate(lines, 1):
        row = orjson.loads(line)
        assert set(row) == set(Product.__dataclass_fields__), f"line {n}"
        p = Product.from_dict(row)
        assert decode_product(row) == p, f"line {n}: the catalog loader would change it"
        assert re.fullmatch(r"rw-\d{4}", p.product_id), f"line {n}"


def test_the_real_world_catalog_is_broad(real: Catalog) -> None:
    products = list(real)
    assert len(products) >= 160
    assert len({p.product_id for p in products}) == len(products)
    assert len(real.categories) >= 24
    assert len(set(real.categories) - set(_TAXONOMY)) >= 10
    assert all(re.fullmatch(r"[a-z-]+/[a-z-]+", c) for c in real.categories)
    assert all(p.price > 0 and p.title for p in products)
    assert all(p.rating == 0 or 1.0 <= p.rating <= 5.0 for p in products)
    assert all(0 <= p.discount_pct <= 90 and p.reviews >= 0 for p in products)
    assert {p.currency for p in products} >= {"USD", "EUR", "GBP"}
    assert sum(p.currency == "USD" for p in products) > 0.8 * len(products)
    assert len({p.brand for p in products}) >= 100


def test_the_real_world_catalog_holds_the_hard_cases(real: Catalog) -> None:
    products = list(real)
    assert any(len(p.title) >= 250 for p in products)
    assert any(not p.title.isascii() for p in products)
    assert any(re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", p.title) for p in products)  # CJK
    assert any(any(ord(ch) >= 0x1F300 for ch in p.title) for p in products)  # an emoji
    assert any('"' in p.title for p in products) and any("'" in p.title for p in products)
    assert any(not p.brand for p in products)
    assert any(not p.noun for p in products)
    assert any(not p.attributes for p in products)
    assert any(p.reviews == 0 and p.rating == 0 for p in products)
    assert any(p.discount_pct >= 50 for p in products)
    assert sum(p.discount_pct == 0 for p in products) >= 20
    nouns = {p.noun for p in products}
    assert {"air fryer", "e-reader", "umbrella", "oven mitt", "hourglass"} <= nouns  # take "an"
    assert {"headphones", "sneakers", "jeans", "diapers", "AA batteries"} <= nouns  # plurals
    attrs = {a for p in products for a in p.attributes}
    assert {"5.5 qt", "18V", "10,000 mAh", "1000-piece"} <= attrs  # numeric attributes


def test_the_disjoint_generator_is_deterministic_and_unique() -> None:
    a, b = generate_disjoint(), generate_disjoint()
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert len(a) == 600
    assert len({p.product_id for p in a}) == 600 and len({p.title for p in a}) == 600
    assert {p.product_id for p in a} == {f"dj-{i:05d}" for i in range(1, 601)}
    assert [p.to_dict() for p in generate_disjoint(50, seed=12)] != [p.to_dict() for p in generate_disjoint(50)]
    assert len(generate_disjoint(37, seed=3)) == 37


def test_the_disjoint_generator_shares_no_word_with_the_training_one() -> None:
    cat = generate_disjoint()
    train = {k: {_norm(x) for x in v} for k, v in vocabulary().items()}
    assert not {_norm(p.brand) for p in cat} & train["brands"]
    assert not {_norm(p.noun) for p in cat} & train["nouns"]
    assert not {_norm(x) for p in cat for x in p.attributes} & train["attributes"]
    own = disjoint_vocabulary()  # the whole vocabulary, not only what seed 11 drew
    everything = set().union(*train.values())
    assert not {_norm(x) for words in own.values() for x in words} & everything


def test_the_disjoint_generator_covers_new_categories_like_a_shop() -> None:
    cat = generate_disjoint()
    products = list(cat)
    assert len(set(cat.categories) - set(_TAXONOMY)) >= 12
    assert sum(len(n) >= 5 and len(a) >= 5 for n, a, _ in DISJOINT_TAXONOMY.values()) >= 12
    for c in cat.categories:
        _, _, (lo, hi) = DISJOINT_TAXONOMY[c]
        assert all(lo - 1 <= p.price <= hi for p in cat.in_category(c))
    unrated = sum(p.reviews == 0 for p in products) / len(products)
    assert 0.05 <= unrated <= 0.15
    assert all((p.reviews == 0) == (p.rating == 0) for p in products)
    assert all(p.rating == 0 or 3.0 <= p.rating <= 5.0 for p in products)
    assert 0.01 <= sum(not p.attributes for p in products) / len(products) <= 0.1
    assert 0.15 <= sum(p.discount_pct > 0 for p in products) / len(products) <= 0.45
    assert all(p.title.startswith(p.brand + " ") and p.title.lower().find(p.noun.lower()) > 0 for p in products)
