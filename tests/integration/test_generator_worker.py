"""The generator worker on the real broker + Redis: product views -> cached, published copies that
GET /v1/copy then serves from the cache (same copy_id); offsets committed after the effects."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Producer

from livecopy.settings import Settings
from models.serving import CopyEngine
from services.api import create_app
from services.copy import copy_extension
from stream.contracts import Event
from stream.generator_worker import GROUP, GeneratorWorker, plan_products
from stream.kafka_io import committed_offsets, producer_config
from stream.profile_worker import build_profile_loop
from stream.wire import Topics
from tests.copygen import ServerThread, save_tiny_student
from tests.integration.helpers import ThreadWorker, expected_profiles, produce, profiles_match, wait_until
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
        wait_until(profiles_match(s, expected_profiles(s, [Event.model_validate(e) for e in events])), 60,
                   "profiles applied")
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
