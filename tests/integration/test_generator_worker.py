"""The generator worker on the real broker + Redis: product views -> cached, published copies that
GET /v1/copy then serves from the cache (same copy_id); offsets committed after the effects."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from confluent_kafka import KafkaError, Producer

from core.catalog import Catalog
from core.contracts import Event, GeneratedCopy
from core.settings import Settings
from core.wire import Topics
from engine.executor import CopyRequest, CopyResult
from engine.serving import CopyEngine
from services.api.app import create_app
from services.api.copy import copy_extension
from services.workers.generator import GROUP, GeneratorWorker, Pregenerator, Stopping, plan_products
from services.workers.profile import build_profile_loop
from stream.copy_store import CopyPublisher
from stream.kafka_io import committed_offsets, producer_config
from tests.copygen import ServerThread, save_tiny_student
from tests.integration.helpers import ThreadWorker, expected_profiles, produce, wait_profiles, wait_until
from tests.integration.test_copy_api import CATALOG, copies_on_topic, with_generation

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("tight_queue", [False, True], ids=["producer-default", "producer-queue-of-one"])
def test_product_views_are_pregenerated_into_the_cache(settings: Settings, tmp_path: Path, tight_queue: bool) -> None:
    s = with_generation(settings, save_tiny_student(tmp_path / "v1", "v1", seed=1), hot_reload=False)
    s = s.model_copy(update={"generator": s.generator.model_copy(update={"related": 2, "profile_wait_ms": 2000.0})})
    now = int(time.time() * 1000)
    viewed = {"g1": CATALOG.products[3], "g2": CATALOG.products[5]}
    events = [{"event_id": f"v-{u}", "type": "product_view", "user_id": u, "ts": now, "product_id": p.product_id,
               "category": p.category, "price": p.price} for u, p in viewed.items()]
    events += [
        {"event_id": "pv-1", "type": "page_view", "user_id": "g1", "ts": now},  # not a product view: skipped
        {"event_id": "old-1", "type": "product_view", "user_id": "g3", "ts": now - 3_600_000,
         "product_id": CATALOG.products[7].product_id},  # too old: skipped
    ]
    produce(s, events)
    with ThreadWorker(build_profile_loop(s)):
        wait_profiles(s, expected_profiles(s, [Event.model_validate(e) for e in events]), 60, "profiles applied")
    engine = CopyEngine.from_settings(s).start()
    # queue of one: each view's 3 copies overflow the producer's local queue; refused records are published again
    producer = (Producer(producer_config(s.kafka, **{"queue.buffering.max.messages": 1, "linger.ms": 100}))
                if tight_queue else None)
    worker = GeneratorWorker(s, engine, producer=producer)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        copies = copies_on_topic(s, 6)
        wait_until(lambda: worker.tracker.pending() == 0 and worker.records == len(events), 30, "records finished")
    finally:
        worker.stop()
        thread.join(60)
    assert not thread.is_alive()
    assert len(copies) == 6 and len({c.copy_id for c in copies}) == 6  # each published once
    assert (worker.publisher.backlogged > 0) == tight_queue and worker.publisher.published == 6
    for u, p in viewed.items():
        planned = [q.product_id for q in plan_products(p, CATALOG, [p.product_id], 2)]
        assert sorted(c.product_id for c in copies if c.user_id == u) == sorted(planned)
        pv = {"g1": 2, "g2": 1}[u]  # g1 also has a page view
        assert all(c.features and c.features["profile_version"] == pv for c in copies if c.user_id == u)
    parts = Topics.from_settings(s.topics).events_partitions
    committed = committed_offsets(s.kafka, s.worker.group_prefix + GROUP, Topics.from_settings(s.topics).events, parts)
    assert sum(max(o, 0) for o in committed.values()) == len(events)
    # the API serves the pre-generated copies from the cache
    by_key = {(c.user_id, c.product_id): c.copy_id for c in copies}
    with ServerThread(create_app(s, extensions=[copy_extension(s, engine=engine)])) as url, \
            httpx.Client(base_url=url) as http:
        for (u, pid), copy_id in by_key.items():
            r = http.get("/v1/copy", params={"user_id": u, "product_id": pid})
            assert r.status_code == 200 and r.headers["X-Livecopy-Cache"] == "hit"
            assert r.json()["copy_id"] == copy_id
    engine.stop()


# -- the Pregenerator's effects, in order: a cached copy is always one the broker acknowledged ---------
class StubEngine:
    """Makes one copy per request at once (no model); ``meanwhile`` runs while it "generates"."""

    model = "livecopy-student"
    version = "v1"

    def __init__(self, meanwhile: Callable[[], None] | None = None) -> None:
        self.meanwhile = meanwhile

    def submit(self, req: CopyRequest, timeout_ms: float = 0.0) -> Future[CopyResult]:
        if self.meanwhile is not None:
            self.meanwhile()
        fut: Future[CopyResult] = Future()
        fut.set_result(CopyResult(copy_id=uuid.uuid4().hex, user_id=req.user_id, product_id=req.product_id,
                                  text="made for you", style=None, score=0.1, propensity=1.0, policy="greedy",
                                  model=self.model, model_version=self.version, slot=req.slot, features={}))
        return fut


class Broker:
    """A producer whose broker acknowledges every record at once (``up``) or times each one out;
    ``on_produce`` runs before the delivery report (what happens while the record is in flight)."""

    def __init__(self, up: bool, on_produce: Callable[[], None] | None = None) -> None:
        self.up = up
        self.on_produce = on_produce
        self.acked: list[bytes] = []

    def produce(self, topic: str, key: bytes | None = None, value: bytes | None = None,
                on_delivery: Callable[..., Any] | None = None, **_: Any) -> None:
        assert on_delivery is not None and value is not None
        if self.on_produce is not None:
            self.on_produce()
        if self.up:
            self.acked.append(value)
            on_delivery(None, None)
        else:
            on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), None)

    def poll(self, timeout: float = 0.0) -> int:
        time.sleep(min(timeout, 0.05))
        return 0

    def flush(self, timeout: float | None = None) -> int:
        return 0

    def __len__(self) -> int:
        return 0


CAT = Catalog.generate(20)


def pregen_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "generator": settings.generator.model_copy(update={"related": 1, "profile_wait_ms": 0.0}),
        "generation": settings.generation.model_copy(update={"style_response_strength": 0.0})})


def pregenerator(s: Settings, engine: StubEngine, broker: Broker, stop: threading.Event) -> Pregenerator:
    client = redis.Redis.from_url(s.redis.url)
    return Pregenerator(s, engine, client, CopyPublisher(broker, "copy"), lambda: CAT, stop)  # type: ignore[arg-type]


def a_view(user: str) -> Event:
    p = CAT.products[0]
    return Event.model_validate({"event_id": f"v-{user}", "type": "product_view", "user_id": user,
                                 "ts": int(time.time() * 1000), "product_id": p.product_id, "category": p.category})


def cached(pg: Pregenerator, ev: Event) -> dict[str, GeneratedCopy]:
    """product_id -> the cached copy, for the products the view plans (cold start: profile version 0)."""
    out = {}
    for p in plan_products(CAT.get(ev.product_id or "") or CAT.products[0], CAT, [], pg.cfg.related):
        raw = pg.client.get(pg.flow.keys.copy(ev.user_id, p.product_id, pg.cfg.slot, 0, StubEngine.version))
        if raw is not None:
            out[p.product_id] = GeneratedCopy.model_validate_json(raw)
    return out


def test_a_copy_is_cached_only_once_the_broker_acknowledged_it(settings: Settings) -> None:
    """SIGTERM while the broker is not acknowledging: nothing is cached and the record is not done, so
    the re-delivered view makes (and publishes) the copies; a cached key could otherwise have been
    skipped on re-delivery and its copy served without ever being on livecopy.copy."""
    s = pregen_settings(settings)
    ev = a_view("ack-1")
    stop = threading.Event()
    down = Broker(up=False, on_produce=stop.set)  # the signal arrives while the records are in flight
    first = pregenerator(s, StubEngine(), down, stop)
    with pytest.raises(Stopping):
        first.handle(ev)
    first.publisher.close()
    assert cached(first, ev) == {}  # nothing unpublished is cached
    up = Broker(up=True)
    second = pregenerator(s, StubEngine(), up, threading.Event())  # the restarted worker, record re-delivered
    assert second.handle(ev) == 2
    second.publisher.close()
    published = {GeneratedCopy.model_validate_json(v).copy_id for v in up.acked}
    served = cached(second, ev)
    assert len(served) == 2 and {c.copy_id for c in served.values()} == published
    # and a third delivery (say its commit was lost) finds both cached: they are published, skipping is safe
    assert pregenerator(s, StubEngine(), Broker(up=True), threading.Event()).handle(ev) == 0


def test_a_copy_the_api_cached_meanwhile_is_kept(settings: Settings) -> None:
    """The API misses the same key while the worker generates, serves its own copy and caches it: the
    worker's copy (published) does not replace it, so the cache keeps serving the copy_id it served."""
    s = pregen_settings(settings)
    ev = a_view("nx-1")
    api_copy = {"copy_id": "api-made", "user_id": ev.user_id, "product_id": ev.product_id, "text": "from the API",
                "model": StubEngine.model, "model_version": StubEngine.version, "score": 0.2, "policy": "greedy",
                "created_at": "2026-01-01T00:00:00Z"}
    up = Broker(up=True)
    engine = StubEngine()
    pg = pregenerator(s, engine, up, threading.Event())
    key = pg.flow.keys.copy(ev.user_id, ev.product_id or "", pg.cfg.slot, 0, StubEngine.version)
    engine.meanwhile = lambda: pg.client.set(key, orjson.dumps(api_copy))
    assert pg.handle(ev) == 2
    pg.publisher.close()
    served = cached(pg, ev)
    assert served[ev.product_id or ""].copy_id == "api-made"  # the API's, not overwritten
    published = {GeneratedCopy.model_validate_json(v).copy_id for v in up.acked}
    assert len(published) == 2 and all(c.copy_id in published | {"api-made"} for c in served.values())
