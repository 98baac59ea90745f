"""The model-update follower at start-up: the whole log as it was when it started, then only its
model's newest record, once (not the newest of every chunk it happened to read on the way)."""

from __future__ import annotations

import pytest
from confluent_kafka import Producer

from core.contracts import ModelVersion
from core.settings import Settings
from core.wire import Topics
from stream.kafka_io import producer_config
from stream.model_updates import ModelUpdateFollower

pytestmark = pytest.mark.integration


def version(name: str, i: int) -> ModelVersion:
    return ModelVersion(name=name, version=f"0.{i}.0", parent_version=f"0.{i - 1}.0" if i else None,
                        path=f"/registry/{name}/0.{i}.0", created_at="2026-01-01T00:00:00Z", metrics={},
                        action="promote")


def test_a_long_log_applies_only_the_newest_version_at_start_up_then_follows(settings: Settings) -> None:
    topic = Topics.from_settings(settings.topics).model_updates
    p = Producer(producer_config(settings.kafka))
    for i in range(1, 1201):  # more than one read's worth (500 records)
        p.produce(topic, key=b"m", value=version("m", i).model_dump_json().encode())
        if i % 300 == 0:
            p.produce(topic, key=b"other", value=version("other", i).model_dump_json().encode())
    assert p.flush(30) == 0
    got: list[str] = []
    follower = ModelUpdateFollower(settings, "m", lambda mv: got.append(mv.version)).start()
    try:
        assert follower.caught_up.wait(60), "the follower caught up with the log"
        assert got == ["0.1200.0"]  # before: 0.500.0, 0.1000.0, then 0.1200.0 (old versions loaded and served)
        p.produce(topic, key=b"m", value=version("m", 1201).model_dump_json().encode())
        assert p.flush(30) == 0
        for _ in range(100):
            if len(got) == 2:
                break
            follower._stop.wait(0.1)
        assert got == ["0.1200.0", "0.1201.0"]  # and then each new one as it comes
    finally:
        follower.stop()
