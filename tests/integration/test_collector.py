"""POST /v1/events against the real broker + Redis: posted events change profiles exactly as the pure
function predicts, a bad event is refused with its reason while the others apply, a retried batch is
not written twice, who may write what (publishable key + shopper token from an allowed origin, rates,
server keys), impressions of a copy never served to the shopper go to the DLQ, and a broker that does
not acknowledge is a 503 that says what was written."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from confluent_kafka import Producer

from core.catalog import Catalog
from core.contracts import Event
from core.settings import CollectorSettings, PublishableKey, Settings
from core.wire import Topics
from livecopy.devstack import free_port
from livecopy.sim.loadgen import SessionGenerator
from services.api.app import create_app
from services.api.copy import copy_extension
from services.api.events import events_extension
from services.workers.profile import build_profile_loop
from stream.access.keys import KeyStore
from stream.access.shopper_token import sign_shopper_token
from stream.collector.sink import sink_config
from tests.copygen import ServerThread, copy_settings, save_tiny_student
from tests.integration.helpers import (
    ThreadWorker,
    expected_profiles,
    mismatches,
    read_topic,
    wait_profiles,
    wait_until,
)

pytestmark = pytest.mark.integration

PK = "lcpk_shop_test"
SECRET = "site-secret-for-tests-0123456789abcdef"
SHOP = "https://shop.example"


def collecting(settings: Settings, **over: Any) -> Settings:
    key = PublishableKey(site="shop", origins=[SHOP], **{k: over.pop(k) for k in list(over) if "rate" in k
                                                        or "burst" in k})
    col = CollectorSettings(publishable_keys={PK: key}, site_secrets={"shop": SECRET}, **over)
    return settings.model_copy(update={"collector": col, "api": settings.api.model_copy(update={"auth": "keys"})})


def page(user: str, **extra: str) -> dict[str, Any]:
    """What the tracker sends with: the key and the shopper's token in the query, the page's origin."""
    return {"params": {"key": PK, "token": sign_shopper_token(SECRET, user, 3600)},
            "headers": {"Origin": SHOP, "Content-Type": "text/plain;charset=UTF-8", **extra}}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def loadgen(n: int, users: int) -> list[dict[str, Any]]:
    gen = SessionGenerator(Catalog.generate(200, seed=7), users, seed=7, concurrency=10).events()
    return list(itertools.islice(gen, n))


def topic_values(settings: Settings, topic: str, expect: int) -> list[Any]:
    return read_topic(settings, topic, expect, timeout=30)


def test_posted_events_change_profiles_as_the_pure_function_predicts(settings: Settings) -> None:
    s = collecting(settings)
    _, server = KeyStore(redis.Redis.from_url(s.redis.url), s.redis.key_prefix).create("shop-backend", ["events"])
    events = loadgen(400, users=25)
    batches = [events[i:i + 20] for i in range(0, len(events), 20)]
    bad = {"event_id": "bad-1", "type": "add_to_cart", "user_id": "u-000001", "ts": events[0]["ts"]}  # no product_id
    with ServerThread(create_app(s, extensions=[events_extension(s)])) as url, \
            httpx.Client(base_url=url, headers=bearer(server), timeout=30) as http:
        for n, batch in enumerate(batches):
            if n % 3 == 0:  # a JSON array
                r = http.post("/v1/events", content=orjson.dumps(batch), headers={"Content-Type": "application/json"})
            elif n % 3 == 1:  # JSON lines
                r = http.post("/v1/events", content=b"\n".join(orjson.dumps(e) for e in batch),
                              headers={"Content-Type": "application/x-ndjson"})
            else:  # what sendBeacon sends
                r = http.post("/v1/events", content=orjson.dumps(batch), headers={"Content-Type": "text/plain"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["accepted"] == len(batch)
            assert [x["status"] for x in body["results"]] == ["accepted"] * len(batch)
        # a bad event among good ones: refused with its reason, the others apply
        extra = [{**events[0], "event_id": "late-1", "type": "purchase", "product_id": "sku-x", "price": 5.0},
                 bad, {**events[1], "event_id": "late-2"}]
        r = http.post("/v1/events", json=extra)
        assert r.status_code == 207, r.text
        res = r.json()["results"]
        assert [x["status"] for x in res] == ["accepted", "rejected", "accepted"]
        assert res[1]["reason"] == "missing_field" and "product_id" in res[1]["detail"]
        assert res[1]["event_id"] == "bad-1"
        # a batch sent again (its answer lost): answered duplicate, not written twice
        again = http.post("/v1/events", json=batches[0])
        assert again.status_code == 200 and all(x.get("duplicate") for x in again.json()["results"])
        metrics = http.get("/metrics", headers=bearer(
            KeyStore(redis.Redis.from_url(s.redis.url), s.redis.key_prefix).create("ops", ["admin"])[1])).text
        assert 'livecopy_collector_events_total{outcome="rejected",reason="missing_field"} 1.0' in metrics
    good = [*events, extra[0], extra[2]]
    on_topic = topic_values(s, Topics.from_settings(s.topics).events, len(good))
    assert sorted(orjson.loads(m.value() or b"")["event_id"] for m in on_topic) == sorted(e["event_id"] for e in good)
    assert all(m.key() == orjson.loads(m.value() or b"")["user_id"].encode() for m in on_topic)
    expected = expected_profiles(s, (Event.model_validate(e) for e in good))
    with ThreadWorker(build_profile_loop(s)) as w:
        wait_until(lambda: w.loop.records >= len(good), 60, "every posted event consumed")
        wait_profiles(s, expected, 15, "profiles to match")
    assert not mismatches(s, expected)


def test_who_may_write_what(settings: Settings) -> None:
    s = collecting(settings, rate_per_s=1000.0, burst=1000, ip_rate_per_s=2.0, ip_burst=6, forwarded_hops=1,
                   max_batch=50, max_body_bytes=16 * 1024)
    store = KeyStore(redis.Redis.from_url(s.redis.url), s.redis.key_prefix)
    _, copy_only = store.create("site", ["copy"])
    _, server = store.create("backend", ["events"])
    one = [{"event_id": "p-1", "type": "page_view", "user_id": "u-1", "ts": int(time.time() * 1000)}]
    with ServerThread(create_app(s, extensions=[events_extension(s)])) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        def post(events: Any, ip: str = "203.0.113.1", **kw: Any) -> httpx.Response:
            args = page("u-1", **{"X-Forwarded-For": ip})
            for k, v in kw.items():
                if k in ("params", "headers"):
                    args[k] = {**args[k], **v}
                else:
                    args[k] = v
            body = events if isinstance(events, bytes) else orjson.dumps(events)
            return http.post("/v1/events", content=body, params=args["params"], headers=args["headers"])

        assert post(one).status_code == 200
        # the tracker: served open, cacheable
        js = http.get("/v1/tracker.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert b"sendBeacon" in js.content and b"IntersectionObserver" in js.content
        # no credentials at all; a forged token; an expired one; an unknown key
        r = http.post("/v1/events", json=one)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        forged = sign_shopper_token("not-the-sites-secret-0123456789", "u-1", 3600)
        r = post(one, params={"token": forged})
        assert r.status_code == 401 and r.json()["error"] == "bad_token"
        assert r.headers["Access-Control-Allow-Origin"] == SHOP  # the page can read why
        r = post(one, params={"token": sign_shopper_token(SECRET, "u-1", -5)})
        assert r.status_code == 401 and r.json()["error"] == "token_expired"
        assert post(one, params={"token": ""}).json()["error"] == "token_required"
        assert post(one, params={"key": "lcpk_unknown"}).status_code == 401
        # a foreign origin, or none, with a publishable key
        r = post(one, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["error"] == "foreign_origin"
        assert "Access-Control-Allow-Origin" not in r.headers
        no_origin = http.post("/v1/events", content=orjson.dumps(one), params=page("u-1")["params"])
        assert no_origin.status_code == 403
        # another shopper's events: refused (403 alone, 207 among the shopper's own)
        other = [{**one[0], "event_id": "p-2", "user_id": "u-2"}]
        r = post(other, ip="203.0.113.2")
        assert r.status_code == 403 and r.json()["results"][0]["reason"] == "forbidden_user"
        r = post([{**one[0], "event_id": "p-3"}, *other], ip="203.0.113.2")
        assert r.status_code == 207 and [x["status"] for x in r.json()["results"]] == ["accepted", "rejected"]
        # over the rate per client IP: 429 with Retry-After; another client is not affected
        assert post([{**one[0], "event_id": f"r-{i}"} for i in range(4)], ip="198.51.100.7").status_code == 200
        r = post([{**one[0], "event_id": "r-9"}, {**one[0], "event_id": "r-10"}, {**one[0], "event_id": "r-11"}],
                 ip="198.51.100.7")
        assert r.status_code == 429 and r.json()["error"] == "rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 3
        assert post([{**one[0], "event_id": "r-12"}], ip="198.51.100.8").status_code == 200
        # limits on the body and the batch
        r = post(b"[" + b",".join([orjson.dumps({**one[0], "pad": "x" * 1000})] * 20) + b"]", ip="198.51.100.9")
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
        big = b"\n".join(orjson.dumps({**one[0], "event_id": f"b{i}"}) for i in range(51))
        r = post(big, ip="198.51.100.10")
        assert r.status_code == 413 and r.json()["error"] == "batch_too_large"
        # CORS preflight: the allowlist
        pre = http.options("/v1/events", headers={"Origin": SHOP, "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "content-type, x-livecopy-key"})
        assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == SHOP
        assert "POST" in pre.headers["Access-Control-Allow-Methods"]
        assert "x-livecopy-key" in pre.headers["Access-Control-Allow-Headers"]
        assert http.options("/v1/events", headers={"Origin": "https://evil.example",
                                                   "Access-Control-Request-Method": "POST"}).status_code == 403
        # key and token as headers (a fetch after that preflight)
        r = http.post("/v1/events", json=[{**one[0], "event_id": "h-1"}],
                      headers={"Origin": SHOP, "X-Livecopy-Key": PK, "X-Forwarded-For": "198.51.100.11",
                               "X-Livecopy-Token": sign_shopper_token(SECRET, "u-1", 600)})
        assert r.status_code == 200, r.text
        # a site's server: an API key with the events scope writes any shopper; another scope is refused
        assert http.post("/v1/events", json=other, headers=bearer(copy_only)).status_code == 403
        r = http.post("/v1/events", json=other, headers=bearer(server))
        assert r.status_code == 200 and r.json()["accepted"] == 1


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("m") / "v1", "v1", seed=1)


def test_an_impression_of_a_copy_not_served_to_the_shopper_goes_to_the_dlq(settings: Settings, model: Path) -> None:
    s = collecting(settings)
    s = s.model_copy(update={"generation": copy_settings(model_dir=model, candidates=2, max_new_tokens=8,
                                                         mc_draws=20, hot_reload=False)})
    _, site = KeyStore(redis.Redis.from_url(s.redis.url), s.redis.key_prefix).create("site", ["copy"])
    product = Catalog.generate().products[0].product_id
    topics = Topics.from_settings(s.topics)
    with ServerThread(create_app(s, extensions=[copy_extension(s), events_extension(s)])) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        mine = http.get("/v1/copy", params={"user_id": "u-a", "product_id": product}, headers=bearer(site)).json()
        theirs = http.get("/v1/copy", params={"user_id": "u-b", "product_id": product}, headers=bearer(site)).json()
        cached = http.get("/v1/copy", params={"user_id": "u-a", "product_id": product}, headers=bearer(site))
        assert cached.headers["X-Livecopy-Cache"] == "hit" and cached.json()["copy_id"] == mine["copy_id"]
        t = int(time.time() * 1000)

        def shown(n: int, copy_id: str, kind: str = "impression") -> dict[str, Any]:
            return {"event_id": f"{kind[0]}{n}", "type": kind, "user_id": "u-a", "ts": t, "product_id": product,
                    "impression_id": f"imp-{n}", "copy_id": copy_id}

        batch = [shown(1, mine["copy_id"]), shown(1, mine["copy_id"], "click"), shown(2, theirs["copy_id"]),
                 shown(3, "never-served", "click")]
        r = http.post("/v1/events", content=orjson.dumps(batch), **page("u-a"))
        assert r.status_code == 207, r.text
        res = r.json()["results"]
        assert [x["status"] for x in res] == ["accepted", "accepted", "rejected", "rejected"]
        assert all(x["reason"] == "unknown_copy" and x["dlq"] is True for x in res[2:])
    on_topic = read_topic(s, topics.events, 2)
    assert sorted(orjson.loads(m.value() or b"")["event_id"] for m in on_topic) == ["c1", "i1"]
    dlq = read_topic(s, topics.dlq, 2)
    assert sorted(orjson.loads(m.value() or b"")["event_id"] for m in dlq) == ["c3", "i2"]
    for m in dlq:
        h = dict(m.headers() or [])
        assert h["error"] == b"unknown_copy" and m.key() == b"u-a"
        assert h["source.topic"] == topics.events.encode() and h["collector.site"] == b"shop"
        value = m.value() or b""
        assert value == orjson.dumps(next(e for e in batch if e["event_id"] == orjson.loads(value)["event_id"]))
    served = redis.Redis.from_url(s.redis.url).zrange(f"{s.redis.key_prefix}{{u-a}}:served", 0, -1)
    assert served == [mine["copy_id"].encode()]


def test_a_broker_that_does_not_acknowledge_is_a_503_saying_what_was_not_written(settings: Settings) -> None:
    s = collecting(settings, ack_timeout_s=1.0)
    s = s.model_copy(update={"api": s.api.model_copy(update={"auth": "open"})})
    dead = Producer(sink_config(s.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"}), 1.0))
    batch = [{"event_id": "x1", "type": "page_view", "user_id": "u-1", "ts": 1_795_000_000_000}, {"event_id": "bad"}]
    with ServerThread(create_app(s, extensions=[events_extension(s, producer=dead)])) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        started = time.monotonic()
        r = http.post("/v1/events", json=batch)  # open mode: no key needed
        assert time.monotonic() - started < 5
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        res = r.json()["results"]
        assert res[0]["status"] == "failed" and res[0]["reason"] == "not_written"
        assert res[1]["status"] == "rejected" and res[1]["reason"] == "missing_field"
        # nothing remembered as written: a retry is written, not answered duplicate
        assert not redis.Redis.from_url(s.redis.url).exists(f"{s.redis.key_prefix}{{u-1}}:collected")
