"""Catalog validation (files and the catalog topic) and the catalog processor on the in-memory store."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from core.catalog_io import decode_product, decode_product_json, parse_rows
from core.wire import Record, Rejection
from services.workers.catalog import CatalogProcessor
from stream.catalog.store import InMemoryCatalogStore

GOOD = {"product_id": "rw-1", "title": "Lodge 10.25 Inch Cast Iron Skillet", "category": "Home/Kitchen",
        "brand": "Lodge", "price": 19.9, "attributes": ["pre-seasoned"], "rating": 4.7, "reviews": 152004,
        "discount_pct": 22, "noun": "skillet"}


def test_valid_rows_from_json_and_csv_cells() -> None:
    p = decode_product(GOOD)
    assert (p.category, p.price, p.currency, p.attributes) == ("home/kitchen", 19.9, "USD", ("pre-seasoned",))
    csv_row = {"product_id": "rw-2", "title": "Crème  Brûlée Torch", "category": "home", "price": "1,299.00",
               "attributes": "refillable| adjustable flame ;", "rating": "4.5", "reviews": "1,204", "eco": "yes",
               "discount_pct": "10", "currency": "EUR"}
    q = decode_product(csv_row)
    assert (q.title, q.price, q.reviews, q.eco, q.attributes, q.currency) == \
        ("Crème Brûlée Torch", 1299.0, 1204, True, ("refillable", "adjustable flame"), "EUR")
    long = decode_product({**GOOD, "title": "x" * 300, "brand": "", "noun": "", "attributes": []})
    assert len(long.title) == 300 and not long.brand and not long.attributes
    assert decode_product({"product_id": "a", "title": "無印良品 Side Table", "category": "home", "price": 1}).rating == 0


@pytest.mark.parametrize(("change", "reason"), [
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
])
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
    c.write_text("product_id,title,category,price,attributes\nrw-1,Mug,home,9.5,handmade|blue\nrw-2,Cup,home,x,\n"
                 "rw-3,Bowl,home,3,a,extra\n")
    rows = list(parse_rows(c))
    assert rows[0][0] == 2 and decode_product(rows[0][1]).attributes == ("handmade", "blue")
    with pytest.raises(Rejection, match="wrong_type"):
        decode_product(rows[1][1])
    assert rows[2][2] is not None  # more cells than columns


def rec(key: str | None, value: dict[str, object] | None | bytes, offset: int = 0) -> Record:
    raw = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
    return Record("livecopy.catalog", 0, offset, key.encode() if key is not None else None, raw)


def test_catalog_processor_upserts_updates_deletes_and_rejects() -> None:
    store = InMemoryCatalogStore()
    proc = CatalogProcessor(store)
    out = proc.process([rec("rw-1", GOOD), rec("rw-2", {**GOOD, "product_id": "rw-2"}),
                        rec("rw-x", {**GOOD, "product_id": "rw-3"}), rec("rw-4", {**GOOD, "product_id": "rw-4",
                                                                                  "price": -1}),
                        rec("rw-5", b"not json"), rec(None, None)])
    assert sorted(store.products) == ["rw-1", "rw-2"]
    assert [r.reason for _, r in out.rejected] == ["key_mismatch", "out_of_range", "not_json", "missing_key"]
    proc.process([rec("rw-1", {**GOOD, "price": 99.0}), rec("rw-2", None)])
    assert store.products["rw-1"].price == 99.0 and "rw-2" not in store.products
    # within one batch the last record of a key wins (a delete after an update, an update after a delete)
    proc.process([rec("rw-1", None), rec("rw-1", {**GOOD, "price": 5.0}), rec("rw-6", {**GOOD, "product_id": "rw-6"}),
                  rec("rw-6", None)])
    assert store.products["rw-1"].price == 5.0 and "rw-6" not in store.products
    # replays are harmless
    proc.process([rec("rw-1", {**GOOD, "price": 5.0})])
    assert store.products["rw-1"].price == 5.0
    with pytest.raises(Rejection, match="key_mismatch"):
        decode_product_json(b"other", orjson.dumps(GOOD))
