"""Events produced with the SDK change Redis profiles exactly as the pure function predicts."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys

import orjson
import pytest

from core.catalog import Catalog
from core.contracts import Event
from core.settings import Settings
from core.wire import Topics
from livecopy import EventProducer, InvalidEvent
from livecopy.sim.loadgen import SessionGenerator
from services.workers.profile import build_profile_loop
from stream.kafka_io import committed_offsets
from tests.integration.helpers import (
    ROOT,
    ThreadWorker,
    expected_profiles,
    mismatches,
    read_topic,
    settings_env,
    wait_profiles,
    wait_until,
)

pytestmark = pytest.mark.integration

T0 = 1_795_341_600_000


def loadgen_events(n: int, users: int, seed: int = 3) -> list[dict[str, object]]:
    gen = SessionGenerator(Catalog.generate(300, seed=seed), users, seed=seed, concurrency=20).events()
    return list(itertools.islice(gen, n))


def late_events(users: int, seed: int = 5) -> list[dict[str, object]]:
    """Events with event times far out of order (hours apart, shuffled)."""
    rng = random.Random(seed)
    out = []
    for i in range(300):
        out.append({"event_id": f"late-{i}", "type": rng.choice(["product_view", "add_to_cart", "purchase"]),
                    "user_id": f"u-{rng.randrange(users):06d}", "ts": T0 - rng.randrange(72 * 3_600_000),
                    "product_id": f"sku-{rng.randrange(50):05d}",
                    "category": rng.choice(["home/kitchen", "toys/games"]),
                    "price": round(rng.random() * 90, 2), "quantity": rng.randint(1, 4)})
    return out


def test_sdk_events_change_profiles_as_the_pure_function_predicts(settings: Settings) -> None:
    # The busiest shopper here has 600 events, and the re-sends come after all of them: with the
    # default cap of 400 dedupe marks a shopper (profile.max_seen), a re-send of one of its oldest
    # events counts again, by design, unless it lands in the same Lua call as the original (which
    # depends on how the consumer's batches fall). The cap's own behaviour: test_profile_store.py.
    settings = settings.model_copy(update={"profile": settings.profile.model_copy(update={"max_seen": 1000})})
    events = loadgen_events(4000, users=60) + late_events(users=60)
    random.Random(1).shuffle(events)
    dups = random.Random(2).sample(events, 600)
    with EventProducer(settings=settings) as p:
        for e in events + dups:  # every duplicate is a re-send of the same event_id
            p.send(e)
    expected = expected_profiles(settings, (Event.model_validate(e) for e in events))
    with ThreadWorker(build_profile_loop(settings)) as w:
        wait_until(lambda: w.loop.records >= len(events) + len(dups), 60, "all records consumed")
        wait_profiles(settings, expected, 60, "profiles to match")
    assert not mismatches(settings, expected)
    assert w.loop.processor.duplicates == len(dups)  # type: ignore[attr-defined]
    assert w.loop.processor.applied == len(events)  # type: ignore[attr-defined]
    # offsets were committed up to the end of every partition that had records
    committed = committed_offsets(settings.kafka, settings.worker.group_prefix + "profile",
                                  Topics.from_settings(settings.topics).events, settings.topics.events_partitions)
    assert sum(committed.values()) == len(events) + len(dups)


MALFORMED: list[tuple[str, bytes | None, bytes]] = [
    ("not_json", b"u-1", b"{this is not json"),
    ("wrong_type", b"u-1", orjson.dumps({"event_id": "b1", "type": "product_view", "user_id": "u-1",
                                          "ts": 1, "product_id": "p", "price": "12.00"})),
    ("missing_field", b"u-1", orjson.dumps({"event_id": "b2", "type": "add_to_cart", "user_id": "u-1", "ts": 1})),
    ("bad_charset", b"u-1", orjson.dumps({"event_id": "b 3 ?", "type": "page_view", "user_id": "u-1", "ts": 1})),
    ("oversize", b"u-1", orjson.dumps({"event_id": "b4", "type": "page_view", "user_id": "u-1", "ts": 1,
                                        "pad": "x" * 70_000})),
    ("key_mismatch", b"u-2", orjson.dumps({"event_id": "b5", "type": "page_view", "user_id": "u-1", "ts": 1})),
    ("unknown_type", b"u-1", orjson.dumps({"event_id": "b6", "type": "teleport", "user_id": "u-1", "ts": 1})),
    ("not_object", b"u-1", b"[1,2,3]"),
]


def test_every_malformed_class_lands_in_the_dlq_and_good_records_around_it_apply(settings: Settings) -> None:
    topics = Topics.from_settings(settings.topics)
    good = [{"event_id": f"g{i}", "type": "add_to_cart", "user_id": "u-1", "ts": T0 + i,
             "product_id": f"p{i}", "category": "toys/games", "price": 2.0} for i in range(len(MALFORMED) + 1)]
    with EventProducer(settings=settings, config={"message.max.bytes": 2_000_000}) as p:
        for g, (_reason, key, value) in itertools.zip_longest(good, MALFORMED, fillvalue=(None, None, None)):
            if g:
                p.send(g)
            if value is not None:
                p.send_raw(key, value)
    expected = expected_profiles(settings, [Event.model_validate(g) for g in good])
    with ThreadWorker(build_profile_loop(settings)):
        wait_profiles(settings, expected, 60, "good records applied")
        dlq = read_topic(settings, topics.dlq, expect=len(MALFORMED))
    assert sorted(dict(m.headers())["error"].decode() for m in dlq) == sorted(r for r, _k, _v in MALFORMED)
    by_reason = {dict(m.headers())["error"].decode(): m for m in dlq}
    for reason, key, value in MALFORMED:
        m = by_reason[reason]
        h = dict(m.headers())
        assert m.value() == value and m.key() == key, reason  # original bytes, unchanged
        assert h["source.topic"].decode() == topics.events
        assert int(h["source.partition"]) in range(settings.topics.events_partitions)
        assert int(h["source.offset"]) >= 0
        assert h["error.detail"] and b"\n" not in h["error.detail"]


def test_the_sdk_sends_an_event_as_given_and_refuses_what_a_worker_would_reject(settings: Settings) -> None:
    topics = Topics.from_settings(settings.topics)
    given = {"event_id": "sdk-1", "type": "product_view", "user_id": "u-7", "ts": "2026-11-22T10:00:00+01:00",
             "product_id": "sku-1", "price": 39, "referrer": "newsletter"}  # a field from a later contract
    text = '{"event_id":"sdk-2","type":"page_view","user_id":"u-7","ts":1795341600000}'
    with EventProducer(settings=settings) as p:
        assert p.send(given).ts == 1_795_338_000_000
        assert p.send(text).event_id == "sdk-2"
        for bad, reason in [({**given, "price": "39"}, "wrong_type"), ({**given, "extra": {1, 2}}, "not_json"),
                            ("{not json", "not_json"), ({**given, "pad": "x" * 70_000}, "oversize"),
                            ({**given, "user_id": "u-7\n"}, "bad_charset")]:
            with pytest.raises(InvalidEvent) as err:
                p.send(bad)
            assert err.value.reason == reason, bad
        assert p.sent == 2
    on_topic = read_topic(settings, topics.events, expect=2)
    # unchanged: the unknown field, the producer's own ts form and the integer price all kept
    assert sorted(m.value() for m in on_topic) == sorted([orjson.dumps(given), text.encode()])
    assert {m.key() for m in on_topic} == {b"u-7"}


def test_livecopy_produce_sends_valid_lines_as_they_are_and_reports_the_others(settings: Settings) -> None:
    good = b'{"event_id":"cli-1","type":"page_view","user_id":"u-9","ts":"2026-11-22T10:00:00Z","x":1}'
    lines = b"\n".join([good, b"5", b"{not json", b'{"event_id":"cli-2","type":"page_view"}', b"", b"null"])
    out = subprocess.run([sys.executable, "-m", "livecopy", "produce", "-"], input=lines + b"\n",
                         env=settings_env(settings), cwd=ROOT, capture_output=True, timeout=60)
    assert out.returncode == 2, out.stderr
    err = out.stderr.decode()
    assert all(f"line {n}: " in err for n in (2, 3, 4, 6)) and "line 1:" not in err
    assert "sent 1 event(s), 4 invalid line(s) skipped" in out.stdout.decode()
    on_topic = read_topic(settings, Topics.from_settings(settings.topics).events, expect=1)
    assert [(m.key(), m.value()) for m in on_topic] == [(b"u-9", good)]


def test_the_topics_are_created_with_their_partitions_and_model_updates_compacted(settings: Settings) -> None:
    from confluent_kafka.admin import AdminClient, ConfigResource

    from stream.kafka_io import base_config

    topics = Topics.from_settings(settings.topics)
    admin = AdminClient(base_config(settings.kafka))
    meta = admin.list_topics(timeout=30).topics
    assert {t: len(meta[t].partitions) for t in topics.partition_counts()} == topics.partition_counts()
    policy = {}
    for res, fut in admin.describe_configs([ConfigResource("topic", t) for t in
                                            (topics.model_updates, topics.events)]).items():
        entry = fut.result(30).get("cleanup.policy")
        policy[res.name] = entry.value if entry is not None else None
    assert policy[topics.model_updates] == "compact"
    assert policy[topics.events] in ("delete", None)  # Kafka's default (tansu lists only configs that were set)
