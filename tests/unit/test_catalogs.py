"""The catalogs copy is measured on: the hand-written real-world file and the disjoint generator."""

from __future__ import annotations

from pathlib import Path

from core.catalog import _TAXONOMY, Catalog, vocabulary
from livecopy.sim.disjoint_catalog import generate_disjoint

REAL = Path(__file__).resolve().parents[2] / "catalogs" / "real_world.jsonl"


def test_the_real_world_catalog_is_broad_and_holds_the_hard_cases() -> None:
    cat = Catalog.load_jsonl(REAL)
    products = list(cat)
    assert len(products) >= 150
    assert len({p.product_id for p in products}) == len(products)
    assert len(cat.categories) >= 20
    assert len(set(cat.categories) - set(_TAXONOMY)) >= 8
    assert all(p.price > 0 and p.title for p in products)
    assert any(len(p.title) >= 250 for p in products)
    assert any(not p.title.isascii() for p in products)
    assert any('"' in p.title for p in products)
    assert any(not p.brand for p in products) and any(not p.noun for p in products)
    assert any(not p.attributes for p in products) and any(p.reviews == 0 for p in products)
    assert {p.currency for p in products} >= {"USD", "EUR", "GBP"}


def test_the_disjoint_generator_shares_no_word_with_the_training_one() -> None:
    a, b = generate_disjoint(), generate_disjoint()
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]  # deterministic
    assert len(a) == 600 and len({p.product_id for p in a}) == 600 and len({p.title for p in a}) == 600
    voc = {k: {x.lower() for x in v} for k, v in vocabulary().items()}
    assert not {p.brand.lower() for p in a} & voc["brands"]
    assert not {p.noun.lower() for p in a} & voc["nouns"]
    assert not {x.lower() for p in a for x in p.attributes} & voc["attributes"]
    assert len(set(a.categories) - set(_TAXONOMY)) >= 12
    assert [p.to_dict() for p in generate_disjoint(50, seed=12)] != [p.to_dict() for p in generate_disjoint(50)]
