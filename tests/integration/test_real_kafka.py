"""What the embedded tansu broker gets wrong (docs/embedded-stack.md, "Broken in tansu"), checked
against the session's Apache Kafka: ListOffsets(latest) is the log end, ``offsets_for_times``
finds the first record at or after a timestamp, ``read_committed`` hides an aborted transaction,
consumer lag counts exactly the records a worker has not processed, and the compacted
``livecopy.model-updates`` still gives a follower the newest version of its model.

On tansu these tests skip (they fail under CI, which runs on Apache Kafka).
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Mapping
from typing import cast

import pytest
from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic, OffsetSpec

from core.catalog import Catalog
from core.contracts import Event, ModelVersion
from core.settings import Settings
from core.wire import Topics
from livecopy.devstack import StackInfo
from livecopy.sim.loadgen import SessionGenerator
from services.workers.profile import ProfileProcessor, build_profile_loop
from services.workers.trainer import announce
from stream.kafka_io import base_config, committed_offsets, consumer_config, producer_config
from stream.model_updates import ModelUpdateFollower
from tests.integration.helpers import ThreadWorker, expected_profiles, mismatches, produce, wait_profiles, wait_until

pytestmark = pytest.mark.integration


def _is_tansu(stack: StackInfo) -> bool:
    return "tansu" in str(stack.details.get("broker", "")).lower()


@pytest.fixture(autouse=True)
def _real_kafka_only(stack: StackInfo) -> None:
    """Skip on tansu (it gets exactly these behaviours wrong); under CI that is a failure."""
    if _is_tansu(stack):
        reason = f"the session broker is {stack.details.get('broker')}: these behaviours need Apache Kafka"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


# ---------------------------------------------------------------- helpers


def _admin(s: Settings) -> AdminClient:
    return AdminClient(base_config(s.kafka))


def _create_topic(s: Settings, name: str, partitions: int, config: Mapping[str, str] | None = None) -> str:
    """Create ``name`` (broker-default replication) and wait until every partition has a leader."""
    admin = _admin(s)
    fut = admin.create_topics([NewTopic(name, num_partitions=partitions, config=dict(config or {}))],
                              request_timeout=30)[name]
    fut.result(timeout=30)

    def ready() -> bool:
        md = admin.list_topics(name, timeout=10).topics.get(name)
        return md is not None and md.error is None and len(md.partitions) == partitions \
            and all(p.leader >= 0 for p in md.partitions.values())

    wait_until(ready, 30, f"topic {name} to have leaders")
    return name


def _consumer(s: Settings, **overrides: object) -> Consumer:
    return Consumer(consumer_config(s.kafka, "t-reader-" + uuid.uuid4().hex[:8], **overrides))


def _read_to_end(s: Settings, topic: str, partitions: int, timeout: float = 30.0,
                 config: Mapping[str, object] | None = None) -> list[Message]:
    """Every record of ``topic`` from the beginning up to the end each partition had when reading started
    (partition EOF; with ``read_committed`` the end is the last stable offset). ``config``: consumer overrides."""
    c = _consumer(s, **{"enable.partition.eof": True, **(config or {})})
    out: list[Message] = []
    try:
        c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(at_end) < partitions:
            assert time.monotonic() < deadline, f"{topic}: no EOF on partitions {set(range(partitions)) - at_end}"
            m = c.poll(0.2)
            if m is None:
                continue
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(m.partition() or 0)
                    continue
                raise KafkaException(err)
            out.append(m)
    finally:
        c.close()
    return out


def _high_watermarks(c: Consumer, topic: str, partitions: int) -> dict[int, int]:
    """The high watermark (ListOffsets latest, asked of the broker, not cached) per partition."""
    return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
            for p in range(partitions)}


def _session_events(n: int, users: int, seed: int) -> list[dict[str, object]]:
    gen = SessionGenerator(Catalog.generate(400, seed=seed), users, seed=seed, concurrency=30).events()
    return list(itertools.islice(gen, n))


# ---------------------------------------------------------------- ListOffsets / timestamps


def test_list_offsets_latest_is_the_log_end(settings: Settings) -> None:
    """tansu answers "start of the last batch + 1": several batches per partition tell the two apart."""
    topic = _create_topic(settings, settings.topics.prefix + "list-offsets", 3)
    counts = {0: 37, 1: 50, 2: 1}
    p = Producer(producer_config(settings.kafka))
    for chunk in range(3):  # three produce requests (batches) per partition
        for part, n in counts.items():
            lo, hi = n * chunk // 3, n * (chunk + 1) // 3
            for i in range(lo, hi):
                p.produce(topic, value=f"{part}-{i}".encode(), key=f"k{i}".encode(), partition=part)
        assert p.flush(30) == 0

    c = _consumer(settings)
    try:
        assert _high_watermarks(c, topic, 3) == counts
        lows = {q: c.get_watermark_offsets(TopicPartition(topic, q), timeout=10, cached=False)[0] for q in counts}
        assert lows == dict.fromkeys(counts, 0)
    finally:
        c.close()

    admin = _admin(settings)
    latest = admin.list_offsets({TopicPartition(topic, q): OffsetSpec.latest() for q in counts}, request_timeout=30)
    assert {tp.partition: f.result(30).offset for tp, f in latest.items()} == counts
    earliest = admin.list_offsets({TopicPartition(topic, q): OffsetSpec.earliest() for q in counts},
                                  request_timeout=30)
    assert {tp.partition: f.result(30).offset for tp, f in earliest.items()} == dict.fromkeys(counts, 0)

    got = _read_to_end(settings, topic, 3)
    per_part = {q: [m.offset() for m in got if m.partition() == q] for q in counts}
    assert per_part == {q: list(range(n)) for q, n in counts.items()}, "offsets 0..end-1, each once"


def test_offsets_for_times_finds_the_first_offset_at_or_after_a_timestamp(settings: Settings) -> None:
    """tansu answers 0 whatever the timestamp."""
    topic = _create_topic(settings, settings.topics.prefix + "times", 1)
    base = int(time.time() * 1000) - 600_000  # ten minutes ago, one record a second
    p = Producer(producer_config(settings.kafka))
    for i in range(20):
        p.produce(topic, value=f"r{i}".encode(), partition=0, timestamp=base + i * 1000)
        if i % 5 == 4:
            assert p.flush(30) == 0  # four batches: the time index has to be searched, not just read

    c = _consumer(settings)
    try:
        queries = {
            base - 1: 0,  # before every record: the first
            base: 0,
            base + 5000: 5,  # exactly a record's timestamp: that record
            base + 5500: 6,  # between two: the later one
            base + 12_999: 13,
            base + 19_000: 19,
            base + 19_001: OFFSET_END,  # after every record: none (-1)
        }
        for ts, want in queries.items():
            [res] = c.offsets_for_times([TopicPartition(topic, 0, ts)], timeout=10)
            assert res.error is None
            assert res.offset == want, f"offsets_for_times({ts - base:+d} ms) = {res.offset}, expected {want}"
        # the record found really is the first at or after the timestamp
        c.assign([TopicPartition(topic, 0, 6)])
        m = c.poll(10)
        assert m is not None and m.error() is None and m.value() == b"r6"
        assert m.timestamp()[1] == base + 6000
    finally:
        c.close()

    admin = _admin(settings)
    tp = TopicPartition(topic, 0)
    assert admin.list_offsets({tp: OffsetSpec.for_timestamp(base + 5500)})[tp].result(30).offset == 6
    newest = admin.list_offsets({tp: OffsetSpec.max_timestamp()})[tp].result(30)
    assert (newest.offset, newest.timestamp) == (19, base + 19_000)


# ---------------------------------------------------------------- transactions


def test_read_committed_hides_an_aborted_transaction(settings: Settings) -> None:
    """tansu shows aborted records to read_committed consumers."""
    topic = _create_topic(settings, settings.topics.prefix + "tx", 1)
    p = Producer({**producer_config(settings.kafka), "transactional.id": settings.topics.prefix + "tx-producer"})
    p.init_transactions(30)
    batches = {"c1": (5, True), "ab": (7, False), "c2": (3, True)}
    for tag, (n, commit) in batches.items():
        p.begin_transaction()
        for i in range(n):
            p.produce(topic, value=f"{tag}-{i}".encode(), partition=0)
        if commit:
            p.commit_transaction(30)
        else:
            p.flush(30)  # the aborted records really reach the log before the abort
            p.abort_transaction(30)

    committed = [f"{t}-{i}".encode() for t, (n, ok) in batches.items() if ok for i in range(n)]
    everything = [f"{t}-{i}".encode() for t, (n, _) in batches.items() for i in range(n)]
    seen_committed = [m.value() for m in _read_to_end(settings, topic, 1, config={"isolation.level": "read_committed"})]
    seen_all = [m.value() for m in _read_to_end(settings, topic, 1, config={"isolation.level": "read_uncommitted"})]
    assert seen_committed == committed
    assert seen_all == everything

    c = _consumer(settings)
    try:  # 15 records + one commit/abort marker per transaction
        assert _high_watermarks(c, topic, 1) == {0: 15 + 3}
    finally:
        c.close()


# ---------------------------------------------------------------- consumer lag


def test_consumer_lag_equals_the_events_the_profile_worker_has_not_processed(settings: Settings) -> None:
    """Lag = high watermark - committed offset, per partition, is exactly what the worker then processes."""
    topics = Topics.from_settings(settings.topics)
    parts = settings.topics.events_partitions
    group = settings.worker.group_prefix + "profile"
    first = _session_events(400, users=60, seed=51)
    extra = _session_events(250, users=60, seed=52)
    expected_first = expected_profiles(settings, (Event.model_validate(e) for e in first))
    expected_all = expected_profiles(settings, (Event.model_validate(e) for e in first + extra))

    def committed() -> dict[int, int]:
        return committed_offsets(settings.kafka, group, topics.events, parts)

    produce(settings, first)
    with ThreadWorker(build_profile_loop(settings)):
        wait_profiles(settings, expected_first, 60, "the first events applied")
        wait_until(lambda: sum(committed().values()) == len(first), 20, "the first events committed")
    # stopped: the loop committed synchronously on the way out

    c = _consumer(settings)
    try:
        before = _high_watermarks(c, topics.events, parts)
        done = committed()
        assert done == before, "a drained worker has no lag"
        produce(settings, extra)
        after = _high_watermarks(c, topics.events, parts)
    finally:
        c.close()
    lag = {q: after[q] - done[q] for q in range(parts)}
    assert lag == {q: after[q] - before[q] for q in range(parts)}
    assert sum(lag.values()) == len(extra)
    assert sum(1 for n in lag.values() if n) > 1, "the extra events spread over partitions"

    loop = build_profile_loop(settings)
    processor = cast(ProfileProcessor, loop.processor)
    with ThreadWorker(loop):
        wait_until(lambda: sum(committed().values()) == sum(after.values()), 60, "the lag worked off")
        wait_profiles(settings, expected_all, 20, "every event applied")
    assert processor.applied == sum(lag.values()), "the worker processed exactly the lag"
    assert processor.duplicates == 0, "and nothing it had processed before"
    assert committed() == after
    assert not mismatches(settings, expected_all)


# ---------------------------------------------------------------- compaction of model-updates


FAST_COMPACTION = {
    "cleanup.policy": "compact",
    "segment.ms": "100",
    "min.cleanable.dirty.ratio": "0.01",
    "delete.retention.ms": "100",
    "min.compaction.lag.ms": "0",
}


def _version(name: str, i: int, action: str = "promote") -> ModelVersion:
    return ModelVersion(name=name, version=f"0.{i}.0", parent_version=f"0.{i - 1}.0" if i else None,
                        path=f"/registry/{name}/0.{i}.0", created_at="2026-01-01T00:00:00Z",
                        metrics={"step": i}, action=action)


def test_compacted_model_updates_still_give_a_follower_the_newest_version(settings: Settings) -> None:
    """tansu never compacts. Here the broker drops superseded promotes of a model (same key, as the
    trainer announces them) and a follower starting afterwards applies exactly the newest one."""
    # a topic prefix of its own, so model-updates is created here with fast compaction (the fixture
    # already created the project's topics under the test's prefix)
    s = settings.model_copy(update={"topics": settings.topics.model_copy(
        update={"prefix": settings.topics.prefix + "compact."})})
    topic = Topics.from_settings(s.topics).model_updates
    parts = s.topics.default_partitions
    assert Topics.from_settings(s.topics).configs()[topic]["cleanup.policy"] == "compact"
    _create_topic(s, topic, parts, FAST_COMPACTION)

    model, other = "student-live", "student-other"
    promotes = 40
    produced = 0
    p = Producer(producer_config(s.kafka))
    junk = 0
    for i in range(1, promotes + 1):
        announce(p, topic, _version(model, i))  # key: the model name, as the trainer's announcements
        produced += 1
        if i % 10 == 5:  # junk in between: an unreadable record (a key of its own) and another model
            p.produce(topic, key=f"junk-{i}".encode(), value=b"not a model version")
            announce(p, topic, _version(other, i))
            junk += 1
            produced += 2
        time.sleep(0.03)  # segment.ms 100: the log rolls every few records
    newest = _version(model, promotes)

    def ours_in_log() -> list[ModelVersion]:
        out = []
        for m in _read_to_end(s, topic, parts):
            if m.key() == model.encode():
                out.append(ModelVersion.model_validate_json(m.value() or b""))
        return out

    started = time.monotonic()
    deadline = started + 60
    rolls = 0
    while True:
        kept = ours_in_log()
        if len(kept) < promotes:
            break
        assert time.monotonic() < deadline, f"no compaction within 60 s ({len(kept)} of {promotes} promotes kept)"
        # a record now and then rolls the active segment, so older ones become cleanable
        p.produce(topic, key=b"roll", value=b"roll")
        assert p.flush(10) == 0
        rolls += 1
        time.sleep(0.5)
    compacted_s = time.monotonic() - started
    assert kept[-1] == newest, "compaction keeps the newest record of a key"
    assert [int(v.version.split(".")[1]) for v in kept] == sorted(int(v.version.split(".")[1]) for v in kept)

    got: list[ModelVersion] = []
    follower = ModelUpdateFollower(s, model, got.append).start()
    try:
        assert follower.caught_up.wait(30), "the follower caught up with the log"
        assert got, "the follower applied a version"
        assert got[-1] == newest, f"applied {[v.version for v in got]}, newest is {newest.version}"
        assert all(v.name == model for v in got), "never another model's version"
        assert follower.invalid == junk, "every junk record (a key of its own) survives compaction and is skipped"
        assert follower.applied == len(got)
    finally:
        follower.stop()
    print(f"\ncompaction: {promotes} promotes of one model (+{produced - promotes} junk, {rolls} roll records); "
          f"{len(kept)} left after {compacted_s:.1f} s; follower applied {[v.version for v in got]}")
