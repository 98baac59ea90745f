"""Helpers for integration tests: produce, read topics, run workers (threads or processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from core.contracts import Event, Profile
from core.settings import Settings
from core.wire import Topics
from livecopy import EventProducer
from stream.kafka_io import BatchLoop, consumer_config
from stream.profile.logic import render, replay
from stream.profile.store import RedisProfileStore
from stream.redis_io import redis_client

ROOT = Path(__file__).resolve().parents[2]


def wait_until(cond: Callable[[], bool], timeout: float, what: str = "condition", every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def produce(settings: Settings, events: Iterable[Mapping[str, Any]]) -> int:
    n = 0
    with EventProducer(settings=settings) as p:
        for e in events:
            p.send(e)
            n += 1
    return n


def read_topic(settings: Settings, topic: str, expect: int, timeout: float = 30.0) -> list[Message]:
    """Read a topic from the beginning (assign, no group) until `expect` records arrived."""
    parts = Topics.from_settings(settings.topics).partition_counts()[topic]
    c = Consumer(consumer_config(settings.kafka, "reader-" + os.urandom(4).hex()))
    c.assign([TopicPartition(topic, p, 0) for p in range(parts)])
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is not None and m.error() is None:
                out.append(m)
        # linger briefly to catch records beyond `expect` (there should be none)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            m = c.poll(0.1)
            if m is not None and m.error() is None:
                out.append(m)
    finally:
        c.close()
    return out


def store_for(settings: Settings) -> RedisProfileStore:
    return RedisProfileStore(redis_client(settings.redis), settings.profile, settings.redis.key_prefix)


def expected_profiles(settings: Settings, events: Iterable[Event]) -> dict[str, Profile]:
    return {u: render(u, s, settings.profile) for u, s in replay(events, settings.profile).items()}


def redis_profiles(settings: Settings, users: Iterable[str]) -> dict[str, Profile | None]:
    store = store_for(settings)
    out: dict[str, Profile | None] = {}
    for u in users:
        st = store.load(u)
        out[u] = render(u, st, settings.profile) if st else None
    return out


def same_profile(a: Profile | None, b: Profile | None) -> bool:
    """Equal, floats compared to 1e-9 relative (Lua and Python add in the same order only per user)."""
    if a is None or b is None:
        return a is b
    da, db = a.model_dump(), b.model_dump()
    for k in da:
        if k == "category_affinity":
            if da[k].keys() != db[k].keys():
                return False
            if any(abs(da[k][c] - db[k][c]) > 1e-9 * max(1.0, abs(db[k][c])) for c in da[k]):
                return False
        elif k in ("cart_value", "purchase_value"):
            if abs(da[k] - db[k]) > 1e-6 * max(1.0, abs(db[k])):
                return False
        elif da[k] != db[k]:
            return False
    return True


def profiles_match(settings: Settings, expected: Mapping[str, Profile]) -> Callable[[], bool]:
    def check() -> bool:
        got = redis_profiles(settings, expected)
        return all(same_profile(got[u], p) for u, p in expected.items())

    return check


def mismatches(settings: Settings, expected: Mapping[str, Profile]) -> list[str]:
    got = redis_profiles(settings, expected)
    return [f"{u}: got {got[u]}, expected {p}" for u, p in expected.items() if not same_profile(got[u], p)][:3]


def wait_profiles(settings: Settings, expected: Mapping[str, Profile], timeout: float, what: str) -> None:
    """Wait until Redis holds ``expected``; on a timeout, say which profiles differ and how."""
    try:
        wait_until(profiles_match(settings, expected), timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; first mismatches: {mismatches(settings, expected)}") from None


class ThreadWorker:
    """A BatchLoop running in a thread (stop() then join())."""

    def __init__(self, loop: BatchLoop) -> None:
        self.loop = loop
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def __enter__(self) -> ThreadWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 30.0) -> None:
        self.loop.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        if self.error:
            raise self.error


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a `livecopy` process use these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOPY_")}
    env.update({
        "LIVECOPY_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "LIVECOPY_REDIS__URL": settings.redis.url,
        "LIVECOPY_REDIS__KEY_PREFIX": settings.redis.key_prefix,
        "LIVECOPY_TOPICS__PREFIX": settings.topics.prefix,
        "LIVECOPY_TOPICS__EVENTS_PARTITIONS": str(settings.topics.events_partitions),
        "LIVECOPY_TOPICS__DEFAULT_PARTITIONS": str(settings.topics.default_partitions),
        "LIVECOPY_WORKER__GROUP_PREFIX": settings.worker.group_prefix,
        "LIVECOPY_WORKER__POLL_TIMEOUT_S": str(settings.worker.poll_timeout_s),
        "LIVECOPY_WORKER__RETRY_BACKOFF_INITIAL_S": str(settings.worker.retry_backoff_initial_s),
        "LIVECOPY_WORKER__RETRY_BACKOFF_MAX_S": str(settings.worker.retry_backoff_max_s),
        "LIVECOPY_REDIS__SOCKET_TIMEOUT_S": str(settings.redis.socket_timeout_s),
        "LIVECOPY_PROFILE__MAX_SEEN": str(settings.profile.max_seen),
        "LIVECOPY_REDIS__CLUSTER": str(settings.redis.cluster).lower(),
        "LIVECOPY_REDIS__WAIT_REPLICAS": str(settings.redis.wait_replicas),
        "LIVECOPY_REDIS__WAIT_TIMEOUT_MS": str(settings.redis.wait_timeout_ms),
        "LIVECOPY_API__AUTH": settings.api.auth,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def start_cli(settings: Settings, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    return subprocess.Popen([sys.executable, "-m", "livecopy", *args], env=settings_env(settings),
                            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
