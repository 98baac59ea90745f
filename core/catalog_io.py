"""Validation of a site's product records (catalog files and the catalog topic): one row -> a
`Product`, or a `Rejection` naming the reason, exactly as the DLQ reports it."""

from __future__ import annotations

import csv
import io
import json
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


_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")  # "1,299.00"; "1.299,00" is refused, not misread


def _number(
    row: Mapping[str, Any],
    name: str,
    default: float,
    lo: float,
    hi: float,
    *,
    integer: bool = False,
    required: bool = False,
) -> float:
    v = row.get(name)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise Rejection("missing_field", f"{name} is required")
        return default
    if isinstance(v, bool):
        raise Rejection("wrong_type", f"{name} must be a number, not a boolean")
    if isinstance(v, str):  # CSV cells
        cell = v.strip()
        if _THOUSANDS.match(cell):
            cell = cell.replace(",", "")
        try:
            v = float(cell)
        except ValueError:
            raise Rejection("wrong_type", one_line(f"{name} must be a number, not {cell[:40]!r}")) from None
    if not isinstance(v, (int, float)):
        raise Rejection("wrong_type", f"{name} must be a number, not {type(v).__name__}")
    try:
        x = float(v)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x) or not lo <= x <= hi:
        raise Rejection("out_of_range", one_line(f"{name} {v!s:.40} is outside [{lo:g}, {hi:g}]"))
    if integer and x != int(x):
        raise Rejection("wrong_type", f"{name} must be a whole number, not {v}")
    return x


def decode_product(row: Any) -> Product:
    """Validate one product record (a parsed JSON object or a CSV row); raises `Rejection`."""
    if not isinstance(row, Mapping):
        raise Rejection("not_object", f"a product is a JSON object, not {type(row).__name__}")
    unknown = sorted(str(k) for k in row if k not in _FIELDS)
    if unknown:  # a typo ("prize") must not be lost without a word
        raise Rejection(
            "unknown_field", one_line(f"unknown field(s) {', '.join(unknown)}; fields are {', '.join(sorted(_FIELDS))}")
        )
    pid = row.get("product_id")
    if pid is None or pid == "":
        raise Rejection("missing_field", "product_id is required")
    if not isinstance(pid, str):
        raise Rejection("wrong_type", f"product_id must be a string, not {type(pid).__name__}")
    if not _ID.match(pid):
        raise Rejection(
            "bad_length" if len(pid) > 128 else "bad_format",
            one_line(f"product_id must be 1-128 printable characters without spaces, not {pid!r:.60}"),
        )
    title = _text(row, "title", 1000, required=True)
    category = "/".join(part.strip() for part in _text(row, "category", 200, required=True).lower().split("/"))
    if any(not part for part in category.split("/")):
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
    eco = row.get("eco")
    if eco is None:
        eco = False
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
        product_id=pid,
        title=title,
        category=category,
        brand=_text(row, "brand", 200),
        price=round(_number(row, "price", 0.0, 0.01, 1e7, required=True), 2),
        attributes=attributes,
        rating=_number(row, "rating", 0.0, 0.0, 5.0),
        reviews=int(_number(row, "reviews", 0, 0, 1e9, integer=True)),
        eco=eco,
        discount_pct=int(_number(row, "discount_pct", 0, 0, 95, integer=True)),
        noun=_text(row, "noun", 200),
        currency=currency,
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
        raise Rejection(
            "key_mismatch", one_line(f"record key {key[:80]!r} differs from product_id {product.product_id!r}")
        )
    return product


def parse_rows(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, row, parse error) of a catalog file: JSON lines (``.jsonl``/``.json``/``.ndjson``; a
    ``.json`` file may also hold one array of products) or CSV with a header row (``.csv``). Blank lines
    are skipped; a file that is not UTF-8 yields its first undecodable line as an error and ends."""
    p = Path(path)
    data = p.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        yield line, None, f"not UTF-8 (byte {data[exc.start]:#04x}); save the file as UTF-8"
        return
    if p.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            line = reader.line_num
            if None in row:
                yield line, None, "more cells than the header has columns"
                continue
            yield line, {k.strip(): v for k, v in row.items() if k is not None and v is not None and v != ""}, None
        return
    if text.lstrip().startswith("["):
        yield from _json_array(text)
        return
    for n, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            yield n, orjson.loads(raw), None
        except orjson.JSONDecodeError as exc:
            yield n, None, one_line(str(exc), 200)


def _json_array(text: str) -> Iterator[tuple[int, Any, str | None]]:
    """The elements of one JSON array, each with the line it starts on; a syntax error ends it."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    i = ws.match(text, text.index("[") + 1).end()  # type: ignore[union-attr]
    if text.startswith("]", i):
        return
    while True:
        line = text.count("\n", 0, i) + 1
        try:
            row, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            yield exc.lineno, None, one_line(exc.msg, 200)
            return
        yield line, row, None
        i = ws.match(text, i).end()  # type: ignore[union-attr]
        if text.startswith("]", i):
            if text[i + 1 :].strip():
                yield text.count("\n", 0, i) + 1, None, "text after the closing ]"
            return
        if not text.startswith(",", i):
            yield text.count("\n", 0, i) + 1, None, "expected , or ] between products"
            return
        i = ws.match(text, i + 1).end()  # type: ignore[union-attr]
