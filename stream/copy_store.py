"""Where served copy lives besides the topic: the Redis copy cache and the product catalog, and
the ``livecopy.copy`` publisher. Shared by the copy API (``services/api/copy.py``) and the generator
worker (``services/workers/generator.py``), so both read and write the very same keys.

Keys (``P`` = ``redis.key_prefix``):

* ``P{<user_id>}:copy:<model_version>:<profile_version>:<product_id>:<slot>``: one cached copy
  (the contract JSON), ``SET ... EX generation.cache_ttl_s``. The user id is the hash tag, so a
  user's copies and profile live on one Redis Cluster slot; ``model_version`` and ``slot`` are
  percent-encoded (no ``:`` inside), so the key is unambiguous although product ids may hold
  ``:``. A new profile version or model version simply misses (old entries expire).
* ``P<catalog_key>``: one hash, product id -> product JSON (``core.catalog.Product``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any
from urllib.parse import quote

import orjson
import redis
import redis.asyncio as aredis
from confluent_kafka import KafkaError, Message, Producer

from core.catalog import Catalog, Product
from core.contracts import GeneratedCopy

log = logging.getLogger(__name__)


class CopyKeys:
    """Redis key names (pure)."""

    def __init__(self, prefix: str = "lc:", catalog_key: str = "catalog") -> None:
        self.prefix = prefix
        self.catalog = f"{prefix}{catalog_key}"

    def copy(self, user_id: str, product_id: str, slot: str | None, profile_version: int, model_version: str) -> str:
        return (f"{self.prefix}{{{user_id}}}:copy:{quote(model_version, safe='')}:{int(profile_version)}:"
                f"{product_id}:{quote(slot or '', safe='')}")


def encode_copy(copy: GeneratedCopy) -> bytes:
    """The contract JSON of a copy (absent optional fields left out): topic value, cache value, HTTP body."""
    return orjson.dumps(copy.model_dump(mode="json", exclude_none=True))


# -- catalog ------------------------------------------------------------------------------------
def product_from_json(raw: bytes | str) -> Product:
    return Product.from_dict(orjson.loads(raw))


def load_catalog(client: redis.Redis, keys: CopyKeys, catalog: Iterable[Product], chunk: int = 500) -> int:
    """Write products into the catalog hash (replacing same ids); returns how many."""
    n = 0
    batch: dict[str, bytes] = {}
    for p in catalog:
        batch[p.product_id] = orjson.dumps(p.to_dict())
        if len(batch) >= chunk:
            client.hset(keys.catalog, mapping=batch)  # type: ignore[arg-type]
            n += len(batch)
            batch = {}
    if batch:
        client.hset(keys.catalog, mapping=batch)  # type: ignore[arg-type]
        n += len(batch)
    return n


def ensure_catalog(client: redis.Redis, keys: CopyKeys, make: Any = None) -> int:
    """Load the synthetic catalog (``Catalog.generate()``, or ``make()``) when the hash is empty;
    returns the number of products loaded (0 when a catalog was already there)."""
    if int(client.hlen(keys.catalog)):
        return 0
    cat = make() if make is not None else Catalog.generate()
    n = load_catalog(client, keys, cat)
    log.info("catalog was empty: loaded %d synthetic products into %s", n, keys.catalog)
    return n


def read_catalog(client: redis.Redis, keys: CopyKeys) -> Catalog:
    raw: dict[bytes, bytes] = client.hgetall(keys.catalog)  # type: ignore[assignment]
    return Catalog(sorted((product_from_json(v) for v in raw.values()), key=lambda p: p.product_id))


class AsyncCatalog:
    """Product lookups for the API: ``get`` reads Redis every time (the product a copy is filled
    from is always current); ``get_many`` (the shopper's recent products, for the persona) goes
    through a small in-process cache (``ttl_s``; unknown ids are cached too, briefly)."""

    def __init__(self, client: aredis.Redis, keys: CopyKeys, ttl_s: float = 30.0, max_entries: int = 100_000) -> None:
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: dict[str, tuple[Product | None, float]] = {}

    async def get_many(self, ids: Sequence[str]) -> dict[str, Product]:
        now = time.monotonic()
        out: dict[str, Product] = {}
        missing: list[str] = []
        for pid in ids:
            hit = self._cache.get(pid)
            if hit is not None and hit[1] > now:
                if hit[0] is not None:
                    out[pid] = hit[0]
            else:
                missing.append(pid)
        if missing:
            raw = await self.client.hmget(self.keys.catalog, missing)
            if len(self._cache) > self.max_entries:
                self._cache.clear()
            for pid, val in zip(missing, raw, strict=True):
                prod = product_from_json(val) if val is not None else None
                self._cache[pid] = (prod, now + self.ttl_s)
                if prod is not None:
                    out[pid] = prod
        return out

    async def get(self, product_id: str) -> Product | None:
        """The product as Redis holds it now (no in-process cache: a price or title change shows in
        the very next copy)."""
        raw = await self.client.hget(self.keys.catalog, product_id)
        return product_from_json(raw) if raw is not None else None


# -- publishing -----------------------------------------------------------------------------------
class PublishBacklog(Exception):
    """The producer's local queue is full: the broker is unreachable or slower than the copies.
    Nothing was queued; the caller refuses (the API: 503) or retries later (the generator)."""

    def __init__(self, message: str = "the producer's local queue is full (broker unreachable or slow)") -> None:
        super().__init__(message)


class CopyPublisher:
    """Publishes copies to ``livecopy.copy`` (key ``user_id``) with an idempotent producer.

    ``publish`` never blocks: it returns a Future that resolves when the broker acknowledged the
    record (the generator worker waits for it before committing; the API does not wait), or
    raises ``PublishBacklog`` when the producer's local queue (``queue.buffering.max.messages``)
    is full; ``congested()`` says, without producing, whether it still is (the API checks it before
    generating a copy it could not publish). A background thread serves delivery reports; failures
    are logged and counted in ``failed``, refusals in ``backlogged``.
    """

    def __init__(self, producer: Producer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.published = 0
        self.failed = 0
        self.backlogged = 0
        self._full_at: int | None = None  # records in the local queue at the last refusal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="copy-publisher", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    def publish(self, copy: GeneratedCopy, value: bytes | None = None) -> Future[None]:
        fut: Future[None] = Future()

        def done(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                self.failed += 1
                log.error("copy %s not published: %s", copy.copy_id, err.str())
                fut.set_exception(RuntimeError(err.str()))
            else:
                self.published += 1
                fut.set_result(None)

        payload = value if value is not None else encode_copy(copy)
        key = copy.user_id.encode()
        try:
            self.producer.produce(self.topic, key=key, value=payload, on_delivery=done)
        except BufferError:  # local queue full: serve the delivery reports due, then try once more
            self.producer.poll(0)
            try:
                self.producer.produce(self.topic, key=key, value=payload, on_delivery=done)
            except BufferError as exc:
                self.backlogged += 1
                self._full_at = len(self.producer)
                raise PublishBacklog() from exc
        return fut

    def queued(self) -> int:
        """Records in the producer's local queue: not yet acknowledged by the broker."""
        return len(self.producer)

    def congested(self) -> bool:
        """True while the local queue holds as many records as when it last refused one."""
        full = self._full_at
        if full is None:
            return False
        if len(self.producer) < full:  # delivered or expired since: room again
            self._full_at = None
            return False
        return True

    def close(self, timeout_s: float = 10.0) -> int:
        """Flush (waiting up to ``timeout_s``) and stop; returns records still unacknowledged."""
        self._stop.set()
        self._thread.join(2.0)
        left = int(self.producer.flush(timeout_s))
        close = getattr(self.producer, "close", None)  # confluent-kafka >= 2.x: stop its threads now
        if close is not None:
            close()
        return left
