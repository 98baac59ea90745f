"""The profile update of `livecopy worker profile`, written as a quixstreams application.

The peer of `benchmarks/ingest.py`. It runs in its own virtualenv (quixstreams pins other
confluent-kafka versions than livecopy), so it imports nothing of livecopy: what it needs of it
comes as data, one JSON line on stdin: the `ProfileSettings`, the source of `profile.lua` and the
keys and header arguments `RedisProfileStore` calls it with. Same work per event: parse the JSON,
compute what the event contributes (livecopy's `event_update`: counter, first/last seen, money,
category-prefix affinity credits, recent product), and apply it in Redis with the same script, so
the Redis side (atomic merge, decay, dedupe by event id, bounds) is the same by construction.

The writes go through a `BatchingSink`, the quixstreams way to write a batch at each checkpoint
(offsets are committed after it returns: at-least-once, made exactly-once in effect by the
script's dedupe): a partition's records are grouped by user and sent as one pipeline of script
calls, each for up to ``users_per_call`` users, as livecopy's store does for its batches.

Prints JSON lines on stdout: {"ready": true, "quixstreams": version} at start, {"t": monotonic s,
"n": records applied} after each checkpoint that wrote something, and on exit (SIGTERM)
{"p50_ms", "p99_ms", "n"}: record CreateTime -> Redis acknowledged, over the records after --skip.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
import quixstreams
import redis
from quixstreams import Application
from quixstreams.sinks import BatchingSink, SinkBatch

USER = "<user>"  # the user id's place in the key templates
REQUIRED = ("event_id", "type", "user_id", "ts")


def parse_ts(v: Any) -> int:
    """RFC 3339 string or integer epoch ms -> epoch ms."""
    if isinstance(v, int):
        return v
    dt = datetime.fromisoformat(v)
    return int(dt.replace(microsecond=0).timestamp()) * 1000 + dt.microsecond // 1000


@functools.lru_cache(maxsize=4096)
def category_credits(category: str | None, weight: float, depth: int) -> tuple[tuple[str, float], ...]:
    """electronics/audio/headphones -> electronics, electronics/audio, ... (up to depth) and the full path."""
    if not category or weight == 0.0:
        return ()
    parts = category.split("/")
    cats = ["/".join(parts[: i + 1]) for i in range(min(len(parts), depth))]
    if category not in cats:
        cats.append(category)
    return tuple((c, weight) for c in cats)


def make_update(cfg: dict[str, Any]) -> Callable[[dict[str, Any]], tuple[str, bytes] | None]:
    weights, depth, recent_types = cfg["type_weights"], cfg["category_depth"], frozenset(cfg["recent_types"])
    max_future_ms = cfg["max_future_s"] * 1000

    def update(ev: dict[str, Any]) -> tuple[str, bytes] | None:
        """(user, what the event contributes to its profile, as profile.lua reads it); None for an event
        livecopy would reject (not an object, a required field missing, dated ahead of the clock)."""
        if not isinstance(ev, dict) or not all(k in ev for k in REQUIRED):
            return None
        ts = parse_ts(ev["ts"])
        if ts > time.time() * 1000 + max_future_ms:
            return None
        etype = ev["type"]
        price = ev.get("price")
        money = price * (ev.get("quantity") or 1) if price is not None else 0.0
        u: dict[str, Any] = {"i": ev["event_id"], "y": etype, "t": ts}
        if etype in recent_types and ev.get("product_id") is not None:
            u["p"] = ev["product_id"]
        if money and etype == "add_to_cart":
            u["c"] = money
        if money and etype == "purchase":
            u["u"] = money
        credits = category_credits(ev.get("category"), weights.get(etype, 0.0), depth)
        if credits:
            u["a"] = credits
        return ev["user_id"], orjson.dumps(u)

    return update


class ProfileSink(BatchingSink):
    """Writes a checkpoint's records of one partition: one script call per user, in one pipeline."""

    def __init__(self, redis_url: str, spec: dict[str, Any], skip: int) -> None:
        super().__init__()
        self.redis_url, self.skip = redis_url, skip
        self.lua, self.keys, self.head = spec["lua"], spec["keys"], spec["head"]
        self.users_per_call = int(spec["users_per_call"])
        self.applied = 0
        self.latencies_ms: list[float] = []

    def setup(self) -> None:
        self.client = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.script = self.client.register_script(self.lua)
        self.client.ping()

    def write(self, batch: SinkBatch) -> None:
        by_user: dict[str, list[bytes]] = {}
        for item in batch:
            user, update = item.value
            by_user.setdefault(user, []).append(update)
        now_ms = int(time.time() * 1000)
        users, n = list(by_user), self.users_per_call
        with self.client.pipeline(transaction=False) as pipe:
            for i in range(0, len(users), n):
                keys, args = [], [now_ms, *self.head]
                for user in users[i:i + n]:
                    keys += [k.replace(USER, user) for k in self.keys]
                    args += [len(by_user[user]), *by_user[user]]
                self.script(keys=keys, args=args, client=pipe)
            pipe.execute()
        acked = time.time() * 1000
        for item in batch:
            self.applied += 1
            if self.applied > self.skip:
                self.latencies_ms.append(acked - item.timestamp)

    def flush(self) -> None:
        before = self.applied
        super().flush()
        if self.applied != before:
            print(json.dumps({"t": time.monotonic(), "n": self.applied}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="stdin: one JSON line {profile, lua, keys, head}")
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--commit-interval", type=float, default=0.1, help="seconds between checkpoints (sink writes)")
    ap.add_argument("--fetch-wait-max-ms", type=int, default=10)
    ap.add_argument("--skip", type=int, default=0, help="records left out of the latency figures (warm-up)")
    a = ap.parse_args()
    spec = json.loads(sys.stdin.readline())

    app = Application(
        broker_address=a.bootstrap,
        consumer_group=a.group,
        auto_offset_reset="earliest",
        processing_guarantee="at-least-once",
        commit_interval=a.commit_interval,
        consumer_poll_timeout=min(a.commit_interval, 0.2),
        consumer_extra_config={"fetch.wait.max.ms": a.fetch_wait_max_ms},
        state_dir=tempfile.mkdtemp(prefix="quix-state-"),
        use_changelog_topics=False,
        loglevel="WARNING",
    )
    sink = ProfileSink(a.redis_url, spec, a.skip)
    sdf = app.dataframe(app.topic(a.topic, value_deserializer="json", key_deserializer="str"))
    sdf = sdf.apply(make_update(spec["profile"])).filter(lambda u: u is not None)
    sdf.sink(sink)
    print(json.dumps({"ready": True, "quixstreams": quixstreams.__version__}), flush=True)
    app.run()  # until SIGTERM

    lat = sorted(sink.latencies_ms)
    nan = float("nan")
    print(json.dumps({"p50_ms": lat[len(lat) // 2] if lat else nan, "p99_ms": lat[int(len(lat) * 0.99)] if lat else nan,
                      "n": len(lat), "applied": sink.applied}), flush=True)


if __name__ == "__main__":
    main()
