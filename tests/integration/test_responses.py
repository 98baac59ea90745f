"""The style-response worker on the real broker and the real Redis: the Lua script and the pure
merge agree, the worker counts each impression once (re-deliveries included), rejects bad records
to the DLQ, and the copy service's async reader sees what it wrote."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest
import redis
import redis.asyncio as aredis
from confluent_kafka import Producer

from core.settings import ResponseSettings, Settings
from core.styles import STYLES
from core.wire import Topics
from services.workers.responses import build_responses_loop
from stream.kafka_io import producer_config
from stream.responses.logic import InMemoryResponseStore, ResponseUpdate
from stream.responses.store import AsyncResponseReader, RedisResponseStore, ResponseKeys
from tests.integration.helpers import ThreadWorker, read_topic, wait_until

pytestmark = pytest.mark.integration


def random_updates(n: int, seed: int) -> list[ResponseUpdate]:
    rng = random.Random(seed)
    return [ResponseUpdate(f"i{rng.randrange(int(n * 0.8))}", f"u{rng.randrange(20)}", rng.choice(STYLES),
                           rng.random() * 0.4, rng.random() < 0.2) for _ in range(n)]


@pytest.mark.parametrize("batch", [1, 17, 400])
def test_redis_lua_and_python_merge_agree(settings: Settings, batch: int) -> None:
    cfg = ResponseSettings(dedupe_window_s=5, ttl_s=3600, half_life_days=4 / 86_400)  # evidence halves every 4 s
    ups = random_updates(2000, seed=batch)
    now = 1_000_000
    lua = RedisResponseStore(redis.Redis.from_url(settings.redis.url), cfg, settings.redis.key_prefix,
                             now_ms=lambda: now)
    py = InMemoryResponseStore(cfg, now_ms=lambda: now)
    for i in range(0, len(ups), batch):
        now += 300  # the 5 s dedupe window slides over the run
        assert lua.apply(ups[i:i + batch], now) == py.apply(ups[i:i + batch], now)
    now += 1000  # both read a second after the last update: aged by the reader
    for user in {u.user_id for u in ups}:
        a, b = lua.load(user), py.load(user)
        assert a is not None and b is not None
        assert a.clicks == pytest.approx(b.clicks, rel=1e-12) and a.as_of_ms == b.as_of_ms
        assert a.expected == pytest.approx(b.expected, rel=1e-12)
        assert a.clicks != {s: round(c) for s, c in a.clicks.items()}  # the counts did age
    h, seen = ResponseKeys(settings.redis.key_prefix).of("u1")
    client = redis.Redis.from_url(settings.redis.url)
    assert 0 < client.pttl(h) <= 3_600_000 and 0 < client.pttl(seen) <= 3_600_000


def feedback(i: int, user: str, style: str, clicked: bool) -> bytes:
    return orjson.dumps({
        "impression_id": f"imp{i}", "copy_id": f"c{i}", "user_id": user, "product_id": "p1",
        "model_version": "1.0.0", "text": "Loved by shoppers.", "clicked": clicked,
        "impression_ts": "2026-11-23T10:00:00Z", "click_ts": "2026-11-23T10:00:05Z" if clicked else None,
        "features": {}, "score": 0.125, "style": style, "propensity": 0.5, "policy": "thompson",
    })


def test_worker_counts_each_impression_once_and_dead_letters_bad_records(settings: Settings) -> None:
    # evidence that never ages, so the counts below are exact (ageing: test_redis_lua_and_python_merge_agree)
    settings = settings.model_copy(update={"responses": ResponseSettings(half_life_days=0)})
    topics = Topics.from_settings(settings.topics)
    p = Producer(producer_config(settings.kafka))
    for i in range(40):  # u1: social proof clicked 12 of 24 times, urgency never (16 shown)
        style = "social_proof" if i < 24 else "urgency"
        p.produce(topics.feedback, key=f"c{i}".encode(), value=feedback(i, "u1", style, style == "social_proof"
                                                                        and i % 2 == 0))
    for i in range(10):  # re-deliveries of the first ten (a joiner restart) take no second effect
        p.produce(topics.feedback, key=f"c{i}".encode(), value=feedback(i, "u1", "social_proof", i % 2 == 0))
    p.produce(topics.feedback, key=b"bad", value=b'{"impression_id": 1}')
    assert p.flush(30) == 0
    loop = build_responses_loop(settings)
    store = RedisResponseStore(redis.Redis.from_url(settings.redis.url), settings.responses,
                               settings.redis.key_prefix)

    def counted() -> bool:
        r = store.load("u1")
        return r is not None and sum(r.expected.values()) >= 40 * 0.125 - 1e-9

    with ThreadWorker(loop):
        wait_until(counted, 60, "the worker to count 40 impressions")
        wait_until(lambda: loop.records >= 51, 30, "every record consumed")
    r = store.load("u1")
    assert r is not None
    assert r.clicks == {"social_proof": 12.0}
    assert r.expected == pytest.approx({"social_proof": 3.0, "urgency": 2.0})
    dlq = read_topic(settings, topics.dlq, 1, timeout=20)
    assert [dict(m.headers() or [])["error"] for m in dlq] == [b"wrong_type"]

    async def read() -> object:
        client = aredis.Redis.from_url(settings.redis.url)
        try:
            return await AsyncResponseReader(client, settings.redis.key_prefix).load("u1")
        finally:
            await client.aclose()

    served = asyncio.run(read())  # what the copy service reads
    assert served is not None and (served.clicks, served.expected) == (r.clicks, r.expected)
    # its posterior: social proof ~ (3 + 12) / (3 + 3) = 2.5x the head's CTR, urgency 3 / 5 = 0.6x
    shape, rate = r.posterior("social_proof", 3.0)
    assert shape / rate == pytest.approx(2.5)
