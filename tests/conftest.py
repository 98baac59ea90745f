"""Shared fixtures. Integration tests run against a real broker and a real Redis: Apache Kafka +
Redis containers (testcontainers) when a Docker daemon answers, else Apache Kafka in KRaft mode from
Maven Central jars (Java 17+) + redis-server, else the embedded tansu broker + redis-server. The
choice is made once per session and printed in the pytest header; under CI it must be Apache Kafka."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from core.settings import DevStackSettings, Settings
from core.wire import Topics
from livecopy.devstack import StackInfo, choose_broker, docker_available, open_stack
from stream.kafka_io import ensure_topics

_CHOICE: dict[str, str] = {}


def stack_choice() -> str:
    """docker | kafka | tansu."""
    if not _CHOICE:
        _CHOICE["kind"] = "docker" if docker_available() else choose_broker(DevStackSettings())
    return _CHOICE["kind"]


def pytest_report_header(config: pytest.Config) -> str:
    kind = stack_choice()
    if kind == "docker":
        return "livecopy stack: testcontainers (Apache Kafka KRaft + Redis containers; a Docker daemon answers)"
    from livecopy.devstack import _version, broker_version, redis_binary

    redis = _version([redis_binary(), "--version"]).split(" v=")[-1].split()[0]
    why = "Java 17+ found" if kind == "kafka" else "no Java 17+ / Maven: the embedded broker"
    return f"livecopy stack: {broker_version(kind)} + redis-server {redis} (no Docker daemon; {why})"


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("CI") and stack_choice() == "tansu":
        raise pytest.UsageError("CI runs the suite on Apache Kafka: install Java 17+ and Maven (scripts/setup.sh does)")


@pytest.fixture(scope="session")
def stack() -> Iterator[StackInfo]:
    with open_stack(prefer=stack_choice()) as info:
        yield info


@pytest.fixture
def settings(stack: StackInfo) -> Settings:
    """Settings pointing at the session's stack, with topics, consumer groups and Redis keys of
    this test alone (tests share one broker and one Redis). The API runs open here (no keys); the
    tests of API keys (tests/integration/test_api_auth.py) switch them on."""
    tag = uuid.uuid4().hex[:8]
    s = Settings(
        topics={"prefix": f"t{tag}.", "events_partitions": 4, "default_partitions": 2},  # type: ignore[arg-type]
        redis={"url": stack.redis_url, "key_prefix": f"t{tag}:"},  # type: ignore[arg-type]
        worker={"group_prefix": f"t{tag}-", "poll_timeout_s": 0.1},  # type: ignore[arg-type]
        kafka={"bootstrap_servers": stack.bootstrap_servers},  # type: ignore[arg-type]
        api={"auth": "open"},  # type: ignore[arg-type]
    )
    ensure_topics(s.kafka, Topics.from_settings(s.topics))
    return s
