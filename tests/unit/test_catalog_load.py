"""Catalog validation (files and the catalog topic) and the catalog processor on the in-memory store."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from core.catalog_io import decode_product, decode_product_json, parse_rows
from core.wire import Record, Rejection
from services.workers.catalog import CatalogProcessor
from stream.catalog.store import InMemoryCatalogStore

GOOD = {
    "product_id": "rw-1",
    "title": "Lodge 10.25 Inch Cast Iron Skillet",
    "category": "Home/Kitchen",
    "brand": "Lodge",
    "price": 19.9,
    "attributes": ["pre-seasoned"],
    "rating": 4.7,
    "reviews": 152004,
    "discount_pct": 22,
    "noun": "skillet",
}


def test_valid_rows_from_json_and_csv_cells() -> None:
    p = decode_product(GOOD)
    assert (p.category, p.price, p.currency, p.attributes) == ("home/kitchen", 19.9, "USD", ("pre-seasoned",))
    csv_row = {
        "product_id": "rw-2",
        "title": "Crème  Brûlée Torch",
        "category": "home",
        "price": "1,299.00",
        "attributes": "refillable| adjustable flame ;",
        "rating": "4.5",
        "reviews": "1,204",
        "eco": "yes",
        "discount_pct": "10",
        "currency": "EUR",
    }
    q = decode_product(csv_row)
    assert (q.title, q.price, q.reviews, q.eco, q.attributes, q.currency) == (
        "Crème Brûlée Torch",
        1299.0,
        1204,
        True,
        ("refillable", "adjustable flame"),
        "EUR",
    )
    long = decode_product({**GOOD, "title": "x" * 300, "brand": "", "noun": "", "attributes": []})
    assert len(long.title) == 300 and not long.brand and not long.attributes
    cjk = {"product_id": "a", "title": "無印良品 Side Table", "category": "home", "price": 1}
    assert decode_product(cjk).rating == 0


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"product_id": None}, "missing_field"),
        ({"product_id": "has space"}, "bad_format"),
        ({"title": "  "}, "missing_field"),
        ({"title": 5}, "wrong_type"),
        ({"category": "home//kitchen"}, "bad_format"),
        ({"price": 0}, "out_of_range"),
        ({"price": "free"}, "wrong_type"),
        ({"price": float("nan")}, "out_of_range"),
        ({"rating": 7}, "out_of_range"),
        ({"reviews": -1}, "out_of_range"),
        ({"reviews": 2.5}, "wrong_type"),
        ({"discount_pct": 99}, "out_of_range"),
        ({"currency": "dollars"}, "bad_format"),
        ({"attributes": [1, 2]}, "wrong_type"),
        ({"attributes": ["x" * 81]}, "bad_length"),
        ({"eco": "maybe"}, "wrong_type"),
        ({"prize": 10}, "unknown_field"),
        ({"title": "t" * 1001}, "bad_length"),
        ({"product_id": 17}, "wrong_type"),
        ({"product_id": "p" * 129}, "bad_length"),
        ({"price": "1.299,00"}, "wrong_type"),  # a decimal comma is refused, not read as 1.299
        ({"price": 1e7 + 1}, "out_of_range"),
        ({"price": 10**400}, "out_of_range"),
        ({"reviews": "2.5"}, "wrong_type"),  # a CSV cell is not truncated to 2
        ({"reviews": "inf"}, "out_of_range"),
        ({"discount_pct": "-5"}, "out_of_range"),
        ({"brand": "b" * 201}, "bad_length"),
        ({"noun": ["pan"]}, "wrong_type"),
        ({"attributes": ["a"] * 33}, "bad_length"),
        ({"eco": 1}, "wrong_type"),
        ({"category": ""}, "missing_field"),
    ],
)
def test_each_bad_field_is_rejected_with_its_reason(change: dict[str, object], reason: str) -> None:
    row = {**GOOD, **change}
    if change.get("product_id", "") is None:
        del row["product_id"]
    with pytest.raises(Rejection) as exc:
        decode_product(row)
    assert exc.value.reason == reason


def test_parse_rows_reports_line_numbers(tmp_path: Path) -> None:
    j = tmp_path / "c.jsonl"
    j.write_bytes(orjson.dumps(GOOD) + b"\n\n{broken\n" + orjson.dumps({**GOOD, "product_id": "rw-9"}) + b"\n")
    rows = list(parse_rows(j))
    assert [(n, err is None) for n, _, err in rows] == [(1, True), (3, False), (4, True)]
    c = tmp_path / "c.csv"
    c.write_text(
        "product_id,title,category,price,attributes\nrw-1,Mug,home,9.5,handmade|blue\nrw-2,Cup,home,x,\n"
        "rw-3,Bowl,home,3,a,extra\n"
    )
    rows = list(parse_rows(c))
    assert rows[0][0] == 2 and decode_product(rows[0][1]).attributes == ("handmade", "blue")
    with pytest.raises(Rejection, match="wrong_type"):
        decode_product(rows[1][1])
    assert rows[2][2] is not None  # more cells than columns


def test_optional_fields_may_be_null_and_category_is_normalized() -> None:
    p = decode_product(
        {
            **GOOD,
            "category": " Home / Kitchen ",
            "eco": None,
            "rating": None,
            "brand": None,
            "attributes": None,
            "currency": None,
        }
    )
    assert (p.category, p.eco, p.rating, p.brand, p.attributes, p.currency) == (
        "home/kitchen",
        False,
        0.0,
        "",
        (),
        "USD",
    )
    assert decode_product({**GOOD, "price": 1e7, "eco": "No", "reviews": "0"}).price == 1e7


def test_parse_rows_reads_a_json_array_and_reports_what_it_cannot_read(tmp_path: Path) -> None:
    a = tmp_path / "c.json"
    a.write_text(
        '[\n  {"product_id": "a", "title": "T", "category": "home", "price": 1},\n\n'
        '  {"product_id": "b", "title": "U", "category": "home", "price": 2}\n]\n'
    )
    rows = list(parse_rows(a))
    assert [(n, r["product_id"], e) for n, r, e in rows] == [(2, "a", None), (4, "b", None)]
    a.write_text('[{"product_id": "a", "title": "T", "category": "home", "price": 1},\n{"product_id": ]')
    rows = list(parse_rows(a))
    assert [n for n, _, _ in rows] == [1, 2] and rows[1][1] is None and rows[1][2]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("product_id,title,category,price\nrw-1,Mug,home,1\nrw-2,Crème,home,2\n".encode("latin-1"))
    assert [(n, r, e is not None) for n, r, e in parse_rows(latin)] == [(3, None, True)]
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfproduct_id,title,category,price\r\nrw-1,Mug,home,1\r\n")
    assert decode_product(next(iter(parse_rows(bom)))[1]).product_id == "rw-1"


def rec(key: str | None, value: dict[str, object] | bytes | None, offset: int = 0) -> Record:
    raw = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
    return Record("livecopy.catalog", 0, offset, key.encode() if key is not None else None, raw)


def test_catalog_processor_upserts_updates_deletes_and_rejects() -> None:
    store = InMemoryCatalogStore()
    proc = CatalogProcessor(store)
    out = proc.process(
        [
            rec("rw-1", GOOD),
            rec("rw-2", {**GOOD, "product_id": "rw-2"}),
            rec("rw-x", {**GOOD, "product_id": "rw-3"}),
            rec("rw-4", {**GOOD, "product_id": "rw-4", "price": -1}),
            rec("rw-5", b"not json"),
            rec(None, None),
        ]
    )
    assert sorted(store.products) == ["rw-1", "rw-2"]
    assert [r.reason for _, r in out.rejected] == ["key_mismatch", "out_of_range", "not_json", "missing_key"]
    proc.process([rec("rw-1", {**GOOD, "price": 99.0}), rec("rw-2", None)])
    assert store.products["rw-1"].price == 99.0 and "rw-2" not in store.products
    # within one batch the last record of a key wins (a delete after an update, an update after a delete)
    proc.process(
        [
            rec("rw-1", None),
            rec("rw-1", {**GOOD, "price": 5.0}),
            rec("rw-6", {**GOOD, "product_id": "rw-6"}),
            rec("rw-6", None),
        ]
    )
    assert store.products["rw-1"].price == 5.0 and "rw-6" not in store.products
    # replays are harmless
    proc.process([rec("rw-1", {**GOOD, "price": 5.0})])
    assert store.products["rw-1"].price == 5.0
    with pytest.raises(Rejection, match="key_mismatch"):
        decode_product_json(b"other", orjson.dumps(GOOD))
