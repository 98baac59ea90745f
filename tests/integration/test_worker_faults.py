"""Faults: kill -9 mid-stream, Redis going away, SIGTERM. Every event's effect lands exactly once."""

from __future__ import annotations

import itertools
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from core.catalog import Catalog
from core.contracts import Event
from core.settings import Settings
from core.wire import Topics
from livecopy import EventProducer
from livecopy.devstack import free_port, redis_binary, wait_redis
from livecopy.sim.loadgen import SessionGenerator, paced
from services.workers.profile import build_profile_loop
from stream.kafka_io import committed_offsets
from tests.integration.helpers import (
    ThreadWorker,
    expected_profiles,
    mismatches,
    redis_profiles,
    start_cli,
    wait_profiles,
    wait_until,
)

pytestmark = pytest.mark.integration


def session_events(n: int, users: int, seed: int) -> list[dict[str, object]]:
    gen = SessionGenerator(Catalog.generate(400, seed=seed), users, seed=seed, concurrency=50).events()
    return list(itertools.islice(gen, n))


def applied_versions(settings: Settings, users: list[str]) -> int:
    return sum(p.profile_version for p in redis_profiles(settings, users).values() if p)


def test_kill_9_mid_stream_then_restart_applies_every_event_exactly_once(settings: Settings, tmp_path: Path) -> None:
    events = session_events(12_000, users=300, seed=11)
    expected = expected_profiles(settings, (Event.model_validate(e) for e in events))
    users = list(expected)
    log = tmp_path / "worker.log"
    worker = start_cli(settings, "worker", "profile", "--max-batch", "200", log=log)
    warmup, rest = events[:300], events[300:]
    with EventProducer(settings=settings) as p:
        for e in warmup:
            p.send(e)
    wait_until(lambda: applied_versions(settings, users) >= len(warmup), 60, "the worker to run")

    def producer() -> None:  # a steady stream (~6 s) while the worker gets killed
        with EventProducer(settings=settings) as p:
            for n in paced(2000, None):
                if n >= len(rest):
                    break
                p.send(rest[n])

    t = threading.Thread(target=producer)
    t.start()
    try:
        time.sleep(2.0)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        at_kill = applied_versions(settings, users)
        assert 0 < at_kill < len(events), "the kill must happen mid-stream"
        t.join(60)
        worker = start_cli(settings, "worker", "profile", "--max-batch", "200", log=log)
        wait_profiles(settings, expected, 90, "every event applied after the restart")
        assert not mismatches(settings, expected)
    finally:
        worker.kill()
        worker.wait(10)
        t.join(5)


def test_sigterm_finishes_commits_and_exits(settings: Settings, tmp_path: Path) -> None:
    events = session_events(3000, users=100, seed=12)
    expected = expected_profiles(settings, (Event.model_validate(e) for e in events))
    worker = start_cli(settings, "worker", "profile", log=tmp_path / "w.log")
    try:
        with EventProducer(settings=settings) as p:
            for e in events:
                p.send(e)
        wait_profiles(settings, expected, 60, "events applied")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    topics = Topics.from_settings(settings.topics)
    committed = committed_offsets(settings.kafka, settings.worker.group_prefix + "profile", topics.events,
                                  settings.topics.events_partitions)
    assert sum(committed.values()) == len(events)


class RedisServer:
    """A Redis of this test's own, so it can be stopped, killed and started again (AOF on, every write
    fsynced before it is acknowledged, as the dev stack and docker-compose run it)."""

    def __init__(self, workdir: Path, fsync: str = "always") -> None:
        self.port = free_port()
        self.dir = workdir
        self.fsync = fsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", self.fsync, "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_redis(self.url, 10)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill_9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None


def test_redis_outage_pauses_commits_nothing_loses_nothing(settings: Settings, tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    s = settings.model_copy(update={
        "redis": settings.redis.model_copy(update={"url": server.url, "socket_timeout_s": 1.0}),
        "worker": settings.worker.model_copy(update={"retry_backoff_initial_s": 0.1, "retry_backoff_max_s": 0.5}),
    })
    topics = Topics.from_settings(s.topics)
    group = s.worker.group_prefix + "profile"
    first = session_events(500, users=40, seed=21)
    second = session_events(1500, users=40, seed=22)
    expected_first = expected_profiles(s, (Event.model_validate(e) for e in first))
    expected_all = expected_profiles(s, (Event.model_validate(e) for e in first + second))
    try:
        with ThreadWorker(build_profile_loop(s)) as w:
            with EventProducer(settings=s) as p:
                for e in first:
                    p.send(e)
            wait_profiles(s, expected_first, 60, "first events applied")
            wait_until(lambda: sum(committed_offsets(s.kafka, group, topics.events, 4).values()) == len(first),
                       20, "first offsets committed")
            server.stop()
            with EventProducer(settings=s) as p:
                for e in second:
                    p.send(e)
            time.sleep(4)  # the worker meets the outage, backs off, retries
            assert w.loop.processor.applied == len(first)  # type: ignore[attr-defined]
            committed = committed_offsets(s.kafka, group, topics.events, 4)
            assert sum(committed.values()) == len(first), "nothing committed during the outage"
            server.start()
            wait_profiles(s, expected_all, 60, "all events applied after Redis is back")
            assert not mismatches(s, expected_all)
            wait_until(lambda: sum(committed_offsets(s.kafka, group, topics.events, 4).values())
                       == len(first) + len(second), 20, "all offsets committed")
    finally:
        server.stop()


def test_redis_kill_9_ten_times_under_load_loses_and_doubles_nothing(settings: Settings, tmp_path: Path) -> None:
    """redis-server killed with SIGKILL ten times while events stream through a profile worker process:
    every event's effect exactly once at the end. An offset is committed only after Redis acknowledged
    the batch, and with appendfsync always an acknowledged write is on disk, so the restarted Redis has
    every effect whose offset was committed (with everysec, one run in five lost events for good)."""
    server = RedisServer(tmp_path)
    server.start()
    s = settings.model_copy(update={
        "redis": settings.redis.model_copy(update={"url": server.url, "socket_timeout_s": 1.0}),
        "worker": settings.worker.model_copy(update={"retry_backoff_initial_s": 0.05, "retry_backoff_max_s": 0.3}),
    })
    events = session_events(8_000, users=250, seed=31)
    expected = expected_profiles(s, (Event.model_validate(e) for e in events))
    worker = start_cli(s, "worker", "profile", log=tmp_path / "worker.log")
    sent = [0]

    def producer() -> None:  # ~8 s of steady load at 1,000 events/s
        with EventProducer(settings=s) as p:
            for n in paced(1000, None):
                if n >= len(events):
                    break
                p.send(events[n])
                sent[0] = n + 1

    t = threading.Thread(target=producer)
    kills = []
    try:
        wait_until(lambda: worker.poll() is None and (tmp_path / "worker.log").exists(), 10, "the worker to start")
        t.start()
        time.sleep(0.8)
        for _ in range(10):
            time.sleep(0.5)
            kills.append(sent[0])
            server.kill_9()
            server.start()
        assert kills[0] > 0 and kills[-1] < len(events), f"the kills must happen mid-stream: {kills}"
        t.join(60)
        started = time.monotonic()
        wait_profiles(s, expected, 120, "every event applied after the last restart")
        assert not mismatches(s, expected)
        topics = Topics.from_settings(s.topics)
        wait_until(lambda: sum(committed_offsets(s.kafka, s.worker.group_prefix + "profile", topics.events,
                                                 s.topics.events_partitions).values()) == len(events),
                   30, "every offset committed")
        print(f"\nredis kill -9 x{len(kills)} at events {kills}; {len(events)} events, 0 lost, 0 doubled; "
              f"caught up {time.monotonic() - started:.1f} s after the producer finished")
    finally:
        worker.kill()
        worker.wait(10)
        t.join(5)
        server.stop()
