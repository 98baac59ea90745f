"""Abuse benchmark: what one hostile caller or one runaway shopper can do, on the real stack.

Prints, in one run:
  - the Redis size of a profile after 20,000 valid events for one shopper (many categories, one day)
    through the profile worker, beside a normal shopper's (target <= 64 KB);
  - GET /v1/profile and cached GET /v1/copy latency for that shopper vs the normal one (unchanged);
  - an unauthenticated profile read (401), uncached copies over the key's rate (429 + Retry-After);
  - after forgetting the shopper: the keys a Redis scan finds, and whether a replay of their events
    (inside the dedupe window) brings the profile back.

    python benchmarks/abuse.py [--events 20000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine
from core.settings import Settings
from core.wire import Topics
from livecopy import EventProducer
from livecopy.devstack import open_stack
from services.api.app import create_app
from services.api.copy import copy_extension
from services.workers.profile import build_profile_loop
from stream.access.keys import KeyStore
from stream.forget import shopper_keys
from stream.kafka_io import ensure_topics
from tests.copygen import ServerThread


def events_for(user: str, n: int, seed: int, now_ms: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(60)]
    out = []
    for i in range(n):
        cat = "/".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        out.append({"event_id": f"{user}-{i}", "type": rng.choice(["product_view", "add_to_cart", "search"]),
                    "user_id": user, "ts": now_ms - (n - i) * 4000, "product_id": f"sku-{rng.randrange(2000):05d}",
                    "category": cat, "price": 9.5, "query": "q"})
    return out


def drain(s: Settings, total: int, timeout_s: float = 300) -> float:
    loop = build_profile_loop(s)
    t = threading.Thread(target=loop.run, daemon=True)
    started = time.monotonic()
    t.start()
    proc: Any = loop.processor
    while proc.applied + proc.duplicates < total and time.monotonic() - started < timeout_s:
        time.sleep(0.1)
    loop.stop()
    t.join(30)
    return time.monotonic() - started


def size_of(client: redis.Redis, keys: list[str]) -> int:
    return sum(int(client.memory_usage(k) or 0) for k in keys)


def latency(http: httpx.Client, path: str, headers: dict[str, str], n: int = 200, **params: str) -> tuple[float, float]:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = http.get(path, params=params, headers=headers)
        lat.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
    lat.sort()
    return statistics.median(lat) * 1e3, lat[int(0.99 * (len(lat) - 1))] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    a = ap.parse_args()
    print(f"machine: {machine()}")
    with open_stack() as info:
        tag = uuid.uuid4().hex[:6]
        s = Settings(kafka={"bootstrap_servers": info.bootstrap_servers},  # type: ignore[arg-type]
                     redis={"url": info.redis_url, "key_prefix": f"ab{tag}:"},  # type: ignore[arg-type]
                     topics={"prefix": f"ab{tag}."}, worker={"group_prefix": f"ab{tag}-"},  # type: ignore[arg-type]
                     api={"auth": "keys", "generate_rate_per_s": 0.5, "generate_burst": 3})  # type: ignore[arg-type]
        ensure_topics(s.kafka, Topics.from_settings(s.topics))
        print(f"stack: {info.describe()}")
        now = int(time.time() * 1000)
        bot, human = events_for("bot-1", a.events, 1, now), events_for("human-1", 50, 2, now)
        with EventProducer(settings=s) as p:
            for e in bot + human:
                p.send(e)
        secs = drain(s, len(bot) + len(human))
        client = redis.Redis.from_url(s.redis.url)
        pfx = s.redis.key_prefix
        bot_keys, human_keys = shopper_keys(client, pfx, "bot-1"), shopper_keys(client, pfx, "human-1")
        bot_size, human_size = size_of(client, bot_keys), size_of(client, human_keys)
        print(f"\n{a.events:,} events for one shopper through the profile worker in {secs:.1f} s "
              f"(caps: {s.profile.max_categories} categories, {s.profile.max_seen} dedupe marks)")
        print(f"{'shopper':10} {'events':>7} {'keys':>5} {'hash fields':>12} {'marks':>6} {'Redis bytes':>12}")
        for name, evs, keys, size in (("runaway", bot, bot_keys, bot_size), ("normal", human, human_keys, human_size)):
            user = evs[0]["user_id"]
            fields = client.hlen(f"{pfx}{{{user}}}:p")
            marks = client.zcard(f"{pfx}{{{user}}}:s")
            print(f"{name:10} {len(evs):7,} {len(keys):5} {fields:12,} {marks:6,} {size:12,}")
        print("runaway per key: " + ", ".join(f"{k.rsplit(':', 1)[-1]} {int(client.memory_usage(k) or 0):,} B "
                                             f"({client.object('encoding', k).decode()})" for k in bot_keys))
        verdict = "met" if bot_size <= 64 * 1024 else "MISSED"
        print(f"target: runaway profile <= 64 KB: {verdict} ({bot_size / 1024:.1f} KB)")

        keys = KeyStore(client, pfx)
        _, reader = keys.create("crm", ["profile:read"])
        _, site = keys.create("site", ["copy"])
        _, admin = keys.create("ops", ["admin"])
        app = create_app(s, extensions=[copy_extension(s, follow_updates=False)])
        with ServerThread(app, s.api) as url, httpx.Client(base_url=url, timeout=60) as http:
            rh, sh, ah = ({"Authorization": f"Bearer {k}"} for k in (reader, site, admin))
            print(f"\n{'request':28} {'runaway p50/p99 ms':>20} {'normal p50/p99 ms':>20}")
            for what, path, hdr, extra in (("GET /v1/profile", "/v1/profile/{}", rh, {}),
                                           ("GET /v1/copy (cached)", "/v1/copy", sh, {"product_id": "sku-00001"})):
                row = []
                for user in ("bot-1", "human-1"):
                    params = {"user_id": user, **extra} if extra else {}
                    p = path.format(user)
                    http.get(p, params=params, headers=hdr)  # warm (the copy: generated once, then cached)
                    row.append(latency(http, p, hdr, **params))
                print(f"{what:28} {row[0][0]:9.1f} / {row[0][1]:7.1f} {row[1][0]:9.1f} / {row[1][1]:7.1f}")
            print(f"\nunauthenticated GET /v1/profile/human-1: {http.get('/v1/profile/human-1').status_code}")
            codes, retry = [], None
            for i in range(6):
                r = http.get("/v1/copy", params={"user_id": "human-1", "product_id": f"sku-{100 + i:05d}"}, headers=sh)
                codes.append(r.status_code)
                retry = r.headers.get("Retry-After", retry)
            print(f"6 uncached copies at once, rate {s.api.generate_rate_per_s:g}/s burst {s.api.generate_burst}: "
                  f"{codes} (Retry-After: {retry})")
            r = http.delete("/v1/profile/bot-1", headers=ah)
            print(f"\nforget bot-1: {r.status_code} {r.json()}")
        left = shopper_keys(client, pfx, "bot-1")
        print(f"keys of bot-1 a scan finds after forget: {left}")
        with EventProducer(settings=s) as p:  # a replay of their events, inside the dedupe window
            for e in bot[-2000:]:
                p.send(e)
        drain(s, 2000)
        back = client.exists(f"{pfx}{{bot-1}}:p")
        print(f"after a replay of 2,000 of their events: profile {'BACK' if back else 'still gone'}")


if __name__ == "__main__":
    main()
