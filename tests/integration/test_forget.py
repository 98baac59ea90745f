"""Forgetting a shopper, on the real Redis: every key of theirs goes, a tombstone keeps re-delivered
older events out (the Lua script and the in-memory twin alike), new activity starts a new profile."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import redis

from core.contracts import Event
from core.settings import Settings
from services.api.app import create_app
from stream.access.keys import KeyStore
from stream.forget import forget, shopper_keys
from stream.profile.logic import event_update
from stream.profile.store import InMemoryProfileStore, RedisProfileStore
from stream.responses.logic import ResponseUpdate
from stream.responses.store import RedisResponseStore
from tests.copygen import ServerThread
from tests.integration.helpers import ROOT, settings_env

pytestmark = pytest.mark.integration

T0 = 1_796_000_000_000


def ev(i: int, user: str, ts: int) -> Event:
    return Event.model_validate({"event_id": f"f{i}", "type": "add_to_cart", "user_id": user, "ts": ts,
                                 "product_id": f"p{i}", "category": "home/kitchen", "price": 10.0})


def a_shopper(settings: Settings, user: str) -> tuple[RedisProfileStore, list[Event]]:
    client = redis.Redis.from_url(settings.redis.url)
    store = RedisProfileStore(client, settings.profile, settings.redis.key_prefix)
    events = [ev(i, user, T0 + i * 1000) for i in range(30)]
    assert all(store.apply([event_update(e, settings.profile) for e in events], T0 + 60_000))
    RedisResponseStore(client, settings.responses, settings.redis.key_prefix).apply(
        [ResponseUpdate("imp-1", user, "urgency", 0.1, True)], T0 + 60_000)
    client.set(f"{settings.redis.key_prefix}{{{user}}}:copy:v1:3:p1:", b"{}")  # a cached copy
    client.set(f"{settings.redis.key_prefix}{{{user}x}}:p", b"another shopper")  # must survive
    return store, events


def test_forget_removes_every_key_and_replays_do_not_bring_the_profile_back(settings: Settings) -> None:
    user = "forget-me@shop"
    store, events = a_shopper(settings, user)
    client = redis.Redis.from_url(settings.redis.url)
    before = shopper_keys(client, settings.redis.key_prefix, user)
    assert {k.rsplit(":", 1)[-1] for k in before} >= {"p", "r", "s", "sr"} and len(before) >= 5
    done = forget(client, settings, user, now_ms=T0 + 90_000)
    assert done.deleted == len(before)
    left = shopper_keys(client, settings.redis.key_prefix, user)
    assert left == [done.tombstone]  # nothing of the shopper's data, only when they were forgotten
    assert int(client.get(done.tombstone) or 0) == T0 + 90_000
    assert 0 < client.pttl(done.tombstone) <= settings.profile.dedupe_window_s * 1000
    assert client.get(f"{settings.redis.key_prefix}{{{user}x}}:p") == b"another shopper"
    # the stream re-delivers (or someone replays) the shopper's events: no effect
    assert store.apply([event_update(e, settings.profile) for e in events], T0 + 100_000) == [False] * len(events)
    assert store.load(user) is None
    # the shopper comes back later: a new profile, from the new events only
    assert store.apply([event_update(ev(99, user, T0 + 120_000), settings.profile)], T0 + 130_000) == [True]
    state = store.load(user)
    assert state is not None and state.version == 1 and list(state.recent) == ["p99"]
    # the in-memory twin answers the same
    twin = InMemoryProfileStore(settings.profile)
    twin.forgotten[user] = T0 + 90_000
    assert twin.apply([event_update(e, settings.profile) for e in events], T0 + 100_000) == [False] * len(events)


def test_forget_over_http_needs_admin_and_the_cli_forgets_too(settings: Settings) -> None:
    s = settings.model_copy(update={"api": settings.api.model_copy(update={"auth": "keys"})})
    keys = KeyStore(redis.Redis.from_url(s.redis.url), s.redis.key_prefix)
    _, admin = keys.create("ops", ["admin"])
    _, reader = keys.create("crm", ["profile:read"])
    a_shopper(s, "http-user")
    with ServerThread(create_app(s)) as url, httpx.Client(base_url=url) as http:
        assert http.delete("/v1/profile/http-user").status_code == 401
        assert http.delete("/v1/profile/http-user", headers={"Authorization": f"Bearer {reader}"}).status_code == 403
        assert http.get("/v1/profile/http-user", headers={"Authorization": f"Bearer {reader}"}).status_code == 200
        r = http.delete("/v1/profile/http-user", headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 200 and r.json()["keys_deleted"] >= 5
        assert http.get("/v1/profile/http-user", headers={"Authorization": f"Bearer {reader}"}).status_code == 404
    a_shopper(settings, "cli-user")
    out = subprocess.run([sys.executable, "-m", "livecopy", "profile", "forget", "cli-user"],
                         env=settings_env(settings), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    client = redis.Redis.from_url(settings.redis.url)
    tomb = f"{settings.redis.key_prefix}{{cli-user}}:gone"
    assert shopper_keys(client, settings.redis.key_prefix, "cli-user") == [tomb]
