"""The catalog topic's records -> the changes they make (pure): the last record of each product id
in a batch wins; a tombstone (no value) deletes; an invalid record is rejected with its reason."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from core.catalog import Product
from core.catalog_io import decode_product_json
from core.wire import Record, Rejection


@dataclass
class CatalogChanges:
    upserts: dict[str, Product] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)
    rejected: list[tuple[Record, Rejection]] = field(default_factory=list)


def catalog_changes(records: Sequence[Record]) -> CatalogChanges:
    out = CatalogChanges()
    for rec in records:
        try:
            if rec.value is None:  # tombstone: the product is gone
                if not rec.key:
                    raise Rejection("missing_key", "a tombstone needs the product id as its key")
                pid = rec.key.decode("utf-8", "replace")
                out.upserts.pop(pid, None)
                if pid not in out.deletes:
                    out.deletes.append(pid)
                continue
            product = decode_product_json(rec.key, rec.value)
        except Rejection as rej:
            out.rejected.append((rec, rej))
            continue
        if product.product_id in out.deletes:
            out.deletes.remove(product.product_id)
        out.upserts[product.product_id] = product
    return out
