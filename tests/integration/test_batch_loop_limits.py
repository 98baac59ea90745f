"""The batch loop at the real clients' limits: a DLQ record over the producer's message.max.bytes,
and a Redis that refuses writes for a while (maxmemory + noeviction). Neither may kill the loop,
lose a record or send good records to the DLQ."""

from __future__ import annotations

import time

import orjson
import pytest
from confluent_kafka import Producer

from livecopy.settings import Settings
from stream.kafka_io import BatchLoop, committed_offsets, producer_config
from stream.profile_worker import GROUP, build_profile_loop
from stream.wire import Topics
from tests.integration.helpers import read_topic

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
