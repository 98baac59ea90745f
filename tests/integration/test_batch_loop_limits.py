"""The batch loop at the real clients' limits: a DLQ record over the producer's message.max.bytes,
and a Redis that refuses writes for a while (maxmemory + noeviction; the style-response worker,
whose script meets the refusal). Neither may kill the loop, lose a record or send good records to
the DLQ."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
import pytest
import redis
from confluent_kafka import Producer

from core.settings import ResponseSettings, Settings
from core.wire import Topics
from services.workers.profile import GROUP, build_profile_loop
from services.workers.responses import GROUP as RESPONSES_GROUP
from services.workers.responses import build_responses_loop
from stream.kafka_io import BatchLoop, NullMetrics, committed_offsets, producer_config
from stream.responses.store import RedisResponseStore
from tests.integration.helpers import read_topic, wait_until

pytestmark = pytest.mark.integration


def now_event(i: int, user: str = "u1", **kw: object) -> dict[str, object]:
    return {"event_id": f"e{i}", "type": "page_view", "user_id": user, "ts": int(time.time() * 1000), **kw}


def steps_until(loop: BatchLoop, records: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while loop.records < records and time.monotonic() < deadline:
        loop.step()
    assert loop.records >= records, f"the loop saw {loop.records} of {records} records"


def test_a_record_over_message_max_bytes_goes_to_the_dlq_cut_down_and_is_committed(settings: Settings) -> None:
    topics = Topics.from_settings(settings.topics)
    big = orjson.dumps(now_event(2, query="x" * 1_100_000))
    p = Producer(producer_config(settings.kafka, **{"message.max.bytes": 2_000_000}))
    for value in (orjson.dumps(now_event(1)), big, orjson.dumps(now_event(3))):
        p.produce(topics.events, value=value, key=b"u1")
    assert p.flush(30) == 0
    loop = build_profile_loop(settings)  # its producer keeps the default message.max.bytes (1 MB)
    loop.start()
    try:
        steps_until(loop, 3)
    finally:
        loop.close()
    (dlq,) = read_topic(settings, topics.dlq, 1)
    h = {k: bytes(v) for k, v in dlq.headers() or []}
    assert h["error"] == b"oversize" and h["error.truncated"] == b"true"
    assert h["source.size"] == str(len(big)).encode() and h["source.topic"] == topics.events.encode()
    assert dlq.key() == b"u1" and dlq.value() == big[:64 * 1024]
    part = int(h["source.partition"])
    committed = committed_offsets(settings.kafka, settings.worker.group_prefix + GROUP, topics.events,
                                  settings.topics.events_partitions)
    assert committed[part] == 3


@contextmanager
def redis_full(client: redis.Redis, filler: str) -> Iterator[None]:
    """Redis over its maxmemory with noeviction (writes answer OOM) until the block ends: a filler
    key pushes it over; the settings are put back after."""
    before = client.config_get("maxmemory-policy")["maxmemory-policy"], client.config_get("maxmemory")["maxmemory"]
    client.set(filler, b"x" * 4_000_000)
    time.sleep(0.5)  # the SET's 4 MB query buffer counts as used memory until the server's cron frees it
    try:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 2_000_000)
        yield
    finally:
        client.delete(filler)
        client.config_set("maxmemory", before[1])
        client.config_set("maxmemory-policy", before[0])


class Retries(NullMetrics):
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def retrying(self, reason: str) -> None:
        self.reasons.append(reason)


def feedback(i: int, user: str) -> bytes:
    return orjson.dumps({
        "impression_id": f"imp{i}", "copy_id": f"c{i}", "user_id": user, "product_id": "p1",
        "model_version": "1.0.0", "text": "Loved by shoppers.", "clicked": i % 2 == 0,
        "impression_ts": "2026-11-23T10:00:00Z", "click_ts": "2026-11-23T10:00:05Z" if i % 2 == 0 else None,
        "features": {}, "score": 0.125, "style": "urgency", "propensity": 0.5, "policy": "thompson",
    })


def test_a_full_redis_holds_the_worker_back_sends_nothing_to_the_dlq_and_it_recovers(settings: Settings) -> None:
    settings = settings.model_copy(update={"responses": ResponseSettings(half_life_days=0)})  # exact counts
    settings = settings.model_copy(update={"worker": settings.worker.model_copy(
        update={"retry_backoff_initial_s": 0.05, "retry_backoff_max_s": 0.2})})
    topics = Topics.from_settings(settings.topics)
    client = redis.Redis.from_url(settings.redis.url)
    users = ["u0", "u1", "u2"]
    p = Producer(producer_config(settings.kafka))
    for i in range(30):
        p.produce(topics.feedback, key=f"c{i}".encode(), value=feedback(i, users[i % 3]))
    assert p.flush(30) == 0
    loop = build_responses_loop(settings)
    loop.metrics = retries = Retries()
    store = RedisResponseStore(client, settings.responses, settings.redis.key_prefix)
    group = settings.worker.group_prefix + RESPONSES_GROUP
    loop.start()
    try:
        with redis_full(client, settings.redis.key_prefix + "filler"):
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                client.set(settings.redis.key_prefix + "probe", b"1")  # the premise: writes are refused
            deadline = time.monotonic() + 60
            while len(retries.reasons) < 3 and time.monotonic() < deadline:
                loop.step()  # the batch meets OOM, is held back and tried again
            assert len(retries.reasons) >= 3 and all("OutOfMemoryError" in r for r in retries.reasons)
            assert loop.records == 0 and [store.load(u) for u in users] == [None] * 3
            committed = committed_offsets(settings.kafka, group, topics.feedback, settings.topics.default_partitions)
            assert set(committed.values()) == {-1}  # nothing committed while refused
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                client.set(settings.redis.key_prefix + "probe", b"1")  # full all along
        steps_until(loop, 30)  # memory freed: everything applies
    finally:
        loop.close()
    assert read_topic(settings, topics.dlq, 0) == []
    committed = committed_offsets(settings.kafka, group, topics.feedback, settings.topics.default_partitions)
    assert sum(o for o in committed.values() if o > 0) == 30
    for u in users:
        r = store.load(u)
        assert r is not None and r.clicks == {"urgency": 5.0} and r.expected == pytest.approx({"urgency": 1.25})


def test_a_redis_busy_with_a_long_script_holds_the_worker_back_until_it_is_killed(settings: Settings) -> None:
    """BUSY (every command, PING included, refused while a script runs past busy-reply-threshold)."""
    settings = settings.model_copy(update={"responses": ResponseSettings(half_life_days=0)})
    settings = settings.model_copy(update={"worker": settings.worker.model_copy(
        update={"retry_backoff_initial_s": 0.05, "retry_backoff_max_s": 0.2})})
    topics = Topics.from_settings(settings.topics)
    client = redis.Redis.from_url(settings.redis.url)
    p = Producer(producer_config(settings.kafka))
    p.produce(topics.feedback, key=b"c0", value=feedback(0, "u0"))
    assert p.flush(30) == 0
    loop = build_responses_loop(settings)
    loop.metrics = retries = Retries()
    store = RedisResponseStore(client, settings.responses, settings.redis.key_prefix)
    threshold = client.config_get("busy-reply-threshold")["busy-reply-threshold"]
    client.config_set("busy-reply-threshold", 50)

    def long_script() -> None:  # read-only, so SCRIPT KILL ends it; 60 s at most
        try:
            redis.Redis.from_url(settings.redis.url).eval(
                "local s = tonumber(redis.call('TIME')[1]) while tonumber(redis.call('TIME')[1]) < s + 60 do end", 0)
        except redis.exceptions.ResponseError:
            pass  # killed

    def kill_once_refused() -> None:  # the loop backs off (its PING answered BUSY too) until this kill
        wait_until(lambda: bool(retries.reasons), 30, "the batch to meet BUSY")
        time.sleep(0.5)
        redis.Redis.from_url(settings.redis.url).script_kill()

    loop.start()
    busy, killer = threading.Thread(target=long_script), threading.Thread(target=kill_once_refused)
    try:
        steps_until(loop, 1)  # joined and working
        busy.start()
        time.sleep(0.3)
        for i in range(1, 21):
            p.produce(topics.feedback, key=f"c{i}".encode(), value=feedback(i, f"u{i % 3}"))
        assert p.flush(30) == 0
        killer.start()
        steps_until(loop, 21)
        killer.join(30)
        assert retries.reasons and all("BUSY" in r for r in retries.reasons)
    finally:
        if busy.is_alive():
            try:
                redis.Redis.from_url(settings.redis.url).script_kill()
            except redis.exceptions.ResponseError:
                pass  # no script running
            busy.join(10)
        client.config_set("busy-reply-threshold", threshold)
        loop.close()
    assert read_topic(settings, topics.dlq, 0) == []
    group = settings.worker.group_prefix + RESPONSES_GROUP
    committed = committed_offsets(settings.kafka, group, topics.feedback, settings.topics.default_partitions)
    assert sum(o for o in committed.values() if o > 0) == 21
    loaded = [store.load(u) for u in ("u0", "u1", "u2")]
    assert sum(sum(r.clicks.values()) for r in loaded if r is not None) == 11  # imp0..imp20, the even ones clicked


def test_a_full_redis_refuses_the_profile_script_whole_and_it_applies_once_memory_is_freed(settings: Settings) -> None:
    """The profile script's first command (pruning the seen-set) is one Redis runs over maxmemory; a
    script without flags would then be let through to write past the limit. Declared as a Redis 7
    script, it is refused whole (OOM) and writes nothing."""
    from core.contracts import Event
    from stream.profile.logic import event_update
    from stream.profile.store import RedisProfileStore
    from stream.redis_io import TransientStoreError

    client = redis.Redis.from_url(settings.redis.url)
    store = RedisProfileStore(client, settings.profile, settings.redis.key_prefix)
    ups = [event_update(Event.model_validate(now_event(i, user="full")), settings.profile) for i in range(3)]
    with redis_full(client, settings.redis.key_prefix + "filler"):
        with pytest.raises(TransientStoreError, match="OutOfMemoryError"):
            store.apply(ups, int(time.time() * 1000))
        assert store.load("full") is None  # nothing written: no seen marker, no field
    assert store.apply(ups, int(time.time() * 1000)) == [True, True, True]
    state = store.load("full")
    assert state is not None and state.version == 3
