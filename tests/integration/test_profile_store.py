"""The Lua script in Redis and the pure Python merge are the same function."""

from __future__ import annotations

import random

import pytest
import redis

from livecopy.settings import ProfileSettings, Settings
from stream.contracts import Event
from stream.profile import event_update
from stream.profile_store import InMemoryProfileStore, RedisProfileStore
from stream.redis_lua import TransientStoreError

pytestmark = pytest.mark.integration

TYPES = ["page_view", "product_view", "search", "add_to_cart", "purchase", "click", "impression"]


def random_events(n: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(Event.model_validate({
            "event_id": f"e{rng.randrange(max(1, int(n * 0.8)))}",  # ~20% re-deliveries
            "type": rng.choice(TYPES), "user_id": f"u{rng.randrange(25)}",
            "ts": 1_795_000_000_000 + rng.randrange(10**9),
            "category": rng.choice(["a", "a/b", "a/b/c", "d/e/f/g/h/i", "ü/ñ"]),
            "price": round(rng.random() * 300, 2), "quantity": rng.randint(1, 5),
            "product_id": f"p{rng.randrange(60)}", "query": "q", "impression_id": "i", "copy_id": "c",
        }))
    return out


@pytest.mark.parametrize("batch", [1, 13, 500])
def test_redis_lua_and_python_merge_agree_exactly(settings: Settings, batch: int) -> None:
    cfg = ProfileSettings(recent_products=7, half_life_s=5000, dedupe_window_s=10)
    client = redis.Redis.from_url(settings.redis.url)
    lua = RedisProfileStore(client, cfg, settings.redis.key_prefix)
    py = InMemoryProfileStore(cfg)
    ups = [event_update(e, cfg) for e in random_events(3000, seed=batch)]
    now = 1_000_000
    for i in range(0, len(ups), batch):
        now += 700  # the dedupe window (10 s) slides over the run
        assert lua.apply(ups[i:i + batch], now) == py.apply(ups[i:i + batch], now)
    for user in {u.user_id for u in ups}:
        assert lua.load(user) == py.load(user), user  # every field, floats bit for bit


def test_unreachable_redis_is_a_transient_error() -> None:
    cfg = ProfileSettings()
    store = RedisProfileStore(redis.Redis(port=1, socket_connect_timeout=0.2), cfg)
    ev = random_events(1, seed=1)[0]
    with pytest.raises(TransientStoreError):
        store.apply([event_update(ev, cfg)], 0)
    assert store.ping() is False


def test_the_script_is_reloaded_after_redis_forgets_it(settings: Settings) -> None:
    cfg = ProfileSettings()
    client = redis.Redis.from_url(settings.redis.url)
    store = RedisProfileStore(client, cfg, settings.redis.key_prefix)
    a, b = random_events(50, seed=9)[:2]
    b = b.model_copy(update={"event_id": "another-id"})
    assert store.apply([event_update(a, cfg)], 0) == [True]
    client.script_flush()
    assert store.apply([event_update(b, cfg), event_update(a, cfg)], 0) == [True, False]
