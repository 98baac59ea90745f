"""Validation of a site's product records (catalog files and the catalog topic): one row -> a
`Product`, or a `Rejection` naming the reason, exactly as the DLQ reports it."""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from core.catalog import Product
from core.wire import Rejection, one_line

MAX_PRODUCT_BYTES = 64 * 1024
_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no space (ids end up in Redis keys and URLs)
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_FIELDS = frozenset(Product.__dataclass_fields__)
_TRUE = {"true", "1", "yes", "y"}
_FALSE = {"false", "0", "no", "n", ""}


def _text(row: Mapping[str, Any], name: str, limit: int, *, required: bool = False) -> str:
    v = row.get(name)
    if v is None:
        if required:
            raise Rejection("missing_field", f"{name} is required")
        return ""
    if not isinstance(v, str):
        raise Rejection("wrong_type", f"{name} must be a string, not {type(v).__name__}")
    v = " ".join(v.split())
    if required and not v:
        raise Rejection("missing_field", f"{name} is empty")
    if len(v) > limit:
        raise Rejection("bad_length", f"{name} is {len(v)} characters, over {limit}")
    return v


def _number(row: Mapping[str, Any], name: str, default: float, lo: float, hi: float, *, integer: bool = False,
            required: bool = False) -> float:
    v = row.get(name)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise Rejection("missing_field", f"{name} is required")
        return default
    if isinstance(v, bool):
        raise Rejection("wrong_type", f"{name} must be a number, not a boolean")
    if isinstance(v, str):  # CSV cells
        try:
            v = float(v.strip().replace(",", "")) if not integer else int(float(v.strip().replace(",", "")))
        except ValueError:
            raise Rejection("wrong_type", one_line(f"{name} must be a number, not {v[:40]!r}")) from None
    if not isinstance(v, (int, float)):
        raise Rejection("wrong_type", f"{name} must be a number, not {type(v).__name__}")
    x = float(v)
    if not math.isfinite(x) or not lo <= x <= hi:
        raise Rejection("out_of_range", f"{name} {v} is outside [{lo:g}, {hi:g}]")
    if integer and x != int(x):
        raise Rejection("wrong_type", f"{name} must be a whole number, not {v}")
    return x


def decode_product(row: Any) -> Product:
    """Validate one product record (a parsed JSON object or a CSV row); raises `Rejection`."""
    if not isinstance(row, Mapping):
        raise Rejection("not_object", f"a product is a JSON object, not {type(row).__name__}")
    unknown = sorted(str(k) for k in row if k not in _FIELDS)
    if unknown:  # a typo ("prize") must not be lost without a word
        raise Rejection("unknown_field", one_line(f"unknown field(s) {', '.join(unknown)}; fields are "
                                                  f"{', '.join(sorted(_FIELDS))}"))
    pid = row.get("product_id")
    if not isinstance(pid, str) or not _ID.match(pid):
        raise Rejection("missing_field" if not pid else "bad_format",
                        one_line(f"product_id must be 1-128 printable characters without spaces, not {pid!r:.60}"))
    title = _text(row, "title", 1000, required=True)
    category = _text(row, "category", 200, required=True).lower()
    if any(not part.strip() for part in category.split("/")):
        raise Rejection("bad_format", f"category {category!r} must be 'top' or 'top/sub'")
    attrs = row.get("attributes")
    if attrs is None or attrs == "":
        attributes: tuple[str, ...] = ()
    elif isinstance(attrs, str):  # CSV: "wireless|noise-cancelling" or "wireless; compact"
        attributes = tuple(a for a in (" ".join(x.split()) for x in re.split(r"[|;]", attrs)) if a)
    elif isinstance(attrs, list) and all(isinstance(a, str) for a in attrs):
        attributes = tuple(a for a in (" ".join(x.split()) for x in attrs) if a)
    else:
        raise Rejection("wrong_type", "attributes must be a list of strings")
    if len(attributes) > 32 or any(len(a) > 80 for a in attributes):
        raise Rejection("bad_length", "at most 32 attributes of at most 80 characters")
    eco = row.get("eco", False)
    if isinstance(eco, str):
        if eco.strip().lower() not in _TRUE | _FALSE:
            raise Rejection("wrong_type", one_line(f"eco must be true or false, not {eco[:20]!r}"))
        eco = eco.strip().lower() in _TRUE
    if not isinstance(eco, bool):
        raise Rejection("wrong_type", "eco must be true or false")
    currency = _text(row, "currency", 16) or "USD"
    if not _CURRENCY.match(currency):
        raise Rejection("bad_format", f"currency {currency!r} must be an ISO 4217 code such as USD")
    return Product(
        product_id=pid, title=title, category=category, brand=_text(row, "brand", 200),
        price=round(_number(row, "price", 0.0, 0.01, 1e7, required=True), 2), attributes=attributes,
        rating=_number(row, "rating", 0.0, 0.0, 5.0), reviews=int(_number(row, "reviews", 0, 0, 1e9, integer=True)),
        eco=eco, discount_pct=int(_number(row, "discount_pct", 0, 0, 95, integer=True)),
        noun=_text(row, "noun", 200), currency=currency,
    )


def decode_product_json(key: bytes | None, value: bytes | None) -> Product:
    """One `livecopy.catalog` record (not a tombstone): JSON, its key the product id."""
    if value is None:
        raise Rejection("empty", "record has no value")
    if len(value) > MAX_PRODUCT_BYTES:
        raise Rejection("oversize", f"record is {len(value)} bytes, over the 64 KiB limit")
    try:
        row = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise Rejection("not_json", one_line(str(exc))) from None
    product = decode_product(row)
    if key is not None and key != product.product_id.encode():
        raise Rejection("key_mismatch", one_line(f"record key {key[:80]!r} differs from product_id "
                                                 f"{product.product_id!r}"))
    return product


def parse_rows(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, row, parse error) of a catalog file: JSON lines (``.jsonl``/``.json``/``.ndjson``)
    or CSV with a header row (``.csv``); blank lines are skipped."""
    p = Path(path)
    if p.suffix.lower() == ".csv":
        text = p.read_text(encoding="utf-8-sig")
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            line = reader.line_num
            if None in row:
                yield line, None, "more cells than the header has columns"
                continue
            yield line, {k.strip(): v for k, v in row.items() if k is not None and v is not None and v != ""}, None
        return
    with p.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield n, orjson.loads(raw), None
            except orjson.JSONDecodeError as exc:
                yield n, None, one_line(str(exc), 200)
