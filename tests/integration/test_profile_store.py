"""The Lua script in Redis and the pure Python merge are the same function."""

from __future__ import annotations

import random

import pytest
import redis

from core.contracts import Event
from core.settings import ProfileSettings, Settings
from stream.profile.logic import ProfileState, apply_update, event_update
from stream.profile.store import InMemoryProfileStore, RedisProfileStore
from stream.redis_io import TransientStoreError

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


@pytest.mark.parametrize(("batch", "users_per_call"), [(1, 64), (13, 1), (13, 4), (500, 7), (500, 64)])
def test_redis_lua_and_python_merge_agree_exactly(settings: Settings, batch: int, users_per_call: int) -> None:
    cfg = ProfileSettings(recent_products=7, half_life_s=5000, dedupe_window_s=10, users_per_call=users_per_call)
    client = redis.Redis.from_url(settings.redis.url)
    lua = RedisProfileStore(client, cfg, settings.redis.key_prefix)
    py = InMemoryProfileStore(cfg)
    ups = [event_update(e, cfg) for e in random_events(3000, seed=batch + users_per_call)]
    now = 1_000_000
    for i in range(0, len(ups), batch):
        now += 700  # the dedupe window (10 s) slides over the run
        assert lua.apply(ups[i:i + batch], now) == py.apply(ups[i:i + batch], now)
    for user in {u.user_id for u in ups}:
        assert lua.load(user) == py.load(user), user  # every field, floats bit for bit


@pytest.mark.parametrize("batch", [1, 7, 400])
def test_capped_profiles_agree_exactly_and_stay_bounded(settings: Settings, batch: int) -> None:
    """With tight caps (4 categories, 5 dedupe marks) and many categories, the Lua script and the Python
    merge keep the very same categories (ties by name) and marks, and the Redis hash stays bounded."""
    cfg = ProfileSettings(recent_products=3, half_life_s=5000, dedupe_window_s=10_000, max_categories=4, max_seen=5)
    rng = random.Random(batch)
    cats = [f"c{i}/s{j}" for i in range(6) for j in range(3)] + ["ü/ñ", "Z", "a", "a/b"]
    events = [Event.model_validate({
        "event_id": f"e{rng.randrange(900)}", "type": rng.choice(TYPES), "user_id": f"u{rng.randrange(4)}",
        "ts": 1_795_000_000_000 + rng.randrange(10**8), "category": rng.choice(cats), "price": 1.0, "quantity": 1,
        "product_id": f"p{rng.randrange(9)}", "query": "q", "impression_id": "i", "copy_id": "c"}) for _ in range(1200)]
    client = redis.Redis.from_url(settings.redis.url)
    lua = RedisProfileStore(client, cfg, settings.redis.key_prefix)
    py = InMemoryProfileStore(cfg)
    ups = [event_update(e, cfg) for e in events]
    now = 1_000_000
    for i in range(0, len(ups), batch):
        now += 50
        assert lua.apply(ups[i:i + batch], now) == py.apply(ups[i:i + batch], now)
    for user in {u.user_id for u in ups}:
        state = lua.load(user)
        assert state == py.load(user), user
        assert state is not None and len(state.affinity) == 4 and len(state.seen) == 5
        p, _r, _s = lua.keys.of(user)
        assert client.hlen(p) <= 2 * 4 + 12


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


def deep_category_events(n: int, seed: int, user: str = "bot") -> list[Event]:
    """One shopper, each event in its own random 5-level category path (each credits 5 prefixes)."""
    rng = random.Random(seed)
    credited = [t for t in TYPES if t != "impression"]  # the types with an affinity weight
    return [Event.model_validate({
        "event_id": f"deep-{i}", "type": rng.choice(credited), "user_id": user,
        "ts": 1_795_000_000_000 + rng.randrange(10**9),
        "category": "/".join(f"{level}{rng.randrange(10**6)}" for level in "abcde"),
        "price": round(rng.random() * 300, 2), "quantity": rng.randint(1, 5),
        "product_id": f"p{rng.randrange(10**6)}", "query": "q", "impression_id": "i", "copy_id": "c",
    }) for i in range(n)]


def test_one_call_touching_more_fields_than_lua_unpack_takes_applies_every_event(settings: Settings) -> None:
    # Regression: profile.lua used to unpack() every touched field into one HMGET/HSET; past Lua's
    # limit (~8000 values) the script failed after it had marked the events seen, so the worker's
    # one-at-a-time retry found only "duplicates" and the events were lost without a DLQ record.
    cfg = ProfileSettings(max_categories=0, max_seen=0)  # uncapped: every field is written in this one call
    client = redis.Redis.from_url(settings.redis.url)
    store = RedisProfileStore(client, cfg, settings.redis.key_prefix)
    ups = [event_update(e, cfg) for e in deep_category_events(450, seed=3)]
    fields = {f"{kind}:{cat}" for u in ups for cat, _ in u.affinity for kind in "at"}
    assert 2 * len(fields) > 8000  # HSET field/value arguments of this one call
    now = 1_795_500_000_000
    assert store.apply(ups, now) == [True] * len(ups)
    expected = ProfileState()
    for u in ups:
        expected, _ = apply_update(expected, u, now, cfg)
    got = store.load("bot")
    assert got is not None and got.version == len(ups)
    assert got == expected  # every field, floats bit for bit
    assert store.apply(ups, now + 1) == [False] * len(ups)  # a redelivery is all duplicates
    assert store.load("bot") == expected


def test_a_call_that_fails_writes_nothing_so_a_retry_applies_its_events(settings: Settings) -> None:
    """A bad update of the last user of a call fails the whole call before anything is written, the users
    before it included (the script checks every user's updates first)."""
    cfg = ProfileSettings()
    client = redis.Redis.from_url(settings.redis.url)
    store = RedisProfileStore(client, cfg, settings.redis.key_prefix)
    ups = {user: [event_update(e, cfg) for e in deep_category_events(5, seed=4, user=user)] for user in ("u0", "u1")}
    now = 1_795_500_000_000
    for bad in (b"{not json", b'{"i": "x", "y": "page_view"}', b'{"i": "x", "y": "search", "t": 1, "a": [["c"]]}'):
        keys, args = store.call(list(ups.items()), now)
        with pytest.raises(redis.ResponseError, match="more arguments than the keys have updates"):
            store.script.run([(keys, [*args, bad])])  # u1's count still says 5
        args[7 + 1 + 5] = 6  # u1's update count: the bad one is its sixth
        with pytest.raises(redis.ResponseError, match=r"profile\.lua: update 6: "):
            store.script.run([(keys, [*args, bad])])
        assert client.exists(*keys) == 0  # no marker, no field, no product of either user
    keys, args = store.call(list(ups.items()), now)
    with pytest.raises(redis.ResponseError, match="bad update count"):
        store.script.run([(keys, [*args[:7], 99, *args[8:]])])  # u0 says 99 updates
    assert client.exists(*keys) == 0
    for user, us in ups.items():
        assert store.apply(us, now) == [True] * len(us)
        assert (got := store.load(user)) is not None and got.version == len(us)
