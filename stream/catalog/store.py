"""Where the catalog lives: the Redis hash the copy service reads (production) and a dict (tests)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import orjson
import redis

from core.catalog import Product
from stream.redis_io import TRANSIENT_REDIS_ERRORS, TransientStoreError


class CatalogStore(Protocol):
    def apply(self, upserts: Mapping[str, Product], deletes: Sequence[str]) -> None:
        """Write the products and delete the ids, all or nothing; idempotent (last write wins)."""
        ...

    def get(self, product_id: str) -> Product | None: ...

    def ping(self) -> bool: ...


class InMemoryCatalogStore:
    def __init__(self) -> None:
        self.products: dict[str, Product] = {}
        self.down = False

    def apply(self, upserts: Mapping[str, Product], deletes: Sequence[str]) -> None:
        if self.down:
            raise TransientStoreError("in-memory catalog store is down")
        for pid in deletes:
            self.products.pop(pid, None)
        self.products.update(upserts)

    def get(self, product_id: str) -> Product | None:
        return self.products.get(product_id)

    def ping(self) -> bool:
        return not self.down


class RedisCatalogStore:
    """One hash (``stream.copy_store.CopyKeys.catalog``): HSET and HDEL in one MULTI/EXEC."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client = client
        self.key = key

    def apply(self, upserts: Mapping[str, Product], deletes: Sequence[str]) -> None:
        if not upserts and not deletes:
            return
        try:
            pipe = self.client.pipeline(transaction=True)
            if deletes:
                pipe.hdel(self.key, *deletes)
            if upserts:
                pipe.hset(self.key, mapping={pid: orjson.dumps(p.to_dict()) for pid, p in upserts.items()})
            pipe.execute()
        except TRANSIENT_REDIS_ERRORS as exc:
            raise TransientStoreError(str(exc)) from exc

    def get(self, product_id: str) -> Product | None:
        raw = self.client.hget(self.key, product_id)
        return Product.from_dict(orjson.loads(raw)) if raw else None

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except TRANSIENT_REDIS_ERRORS:
            return False
