"""Faults on a 3-node Apache Kafka cluster (KRaft, every node broker+controller, replication factor 3,
min.insync.replicas 2, idempotent acks=all producers), all on loopback, with the session's Redis:

- the broker leading most events partitions is killed with SIGKILL mid-stream while a profile worker
  consumes, then restarted: every event's effect is in Redis exactly once;
- one of three profile workers of a group is killed with SIGKILL mid-stream: exactly once in effect,
  and the group's committed offsets never go backwards on any partition.

Without Java 17+ (or the jars and Maven) these skip locally and fail under CI. Every JVM is stopped
at the end of the module, whatever happened.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import ConsumerGroupState, KafkaException
from confluent_kafka.admin import AdminClient

from core.catalog import Catalog
from core.contracts import Event
from core.settings import Settings
from core.wire import Topics
from livecopy import EventProducer
from livecopy import kafka_kraft as kk
from livecopy.devstack import StackInfo, free_port, free_ports
from livecopy.sim.loadgen import SessionGenerator, paced
from stream.kafka_io import base_config, committed_offsets, ensure_topics
from tests.integration.helpers import (
    ROOT,
    expected_profiles,
    mismatches,
    produce,
    read_topic,
    redis_profiles,
    settings_env,
    wait_profiles,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CACHE = ROOT / ".livecopy" / "kafka-cache"  # .livecopy/ is gitignored
EVENTS_PARTITIONS = 6
QUIET = {"log_level": 2}  # this process's clients: no "connection refused" lines for the node that is down


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"a real Kafka cluster is needed under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kk.KafkaCluster]:
    if not kk.java_available():
        _unavailable("Java 17+ not found (apt-get install openjdk-17-jre-headless)")
    if not kk.kafka_available(CACHE):
        _unavailable(f"Kafka {kk.version()} jars not cached in {CACHE} and Maven (mvn) not found")
    c = kk.KafkaCluster(tmp_path_factory.mktemp("kraft3"), n=3, cache_dir=CACHE, die_with_parent=True)
    try:
        started = time.monotonic()
        c.start(timeout=180)
        print(f"\n3-node KRaft cluster up in {time.monotonic() - started:.1f} s: {c.bootstrap_servers}")
        yield c
    finally:
        try:
            c.stop(timeout=20)
        finally:
            for node in c:  # a node that ignored SIGTERM, or one a failed test left half-started
                node.kill()
    assert all(node.pid is None for node in c)


@pytest.fixture
def csettings(cluster: kk.KafkaCluster, stack: StackInfo) -> Settings:
    """Settings on the cluster (every node up, the test's topics fully replicated) and the session's
    Redis, with topics, group and Redis keys of this test alone."""
    for node in cluster:
        if not node.is_running():  # an earlier test failed before restarting it
            node.start(timeout=120)
    tag = uuid.uuid4().hex[:8]
    s = Settings(
        topics={"prefix": f"f{tag}.", "events_partitions": EVENTS_PARTITIONS, "default_partitions": 2,
                "replication_factor": 3},
        redis={"url": stack.redis_url, "key_prefix": f"f{tag}:"},
        worker={"group_prefix": f"f{tag}-", "poll_timeout_s": 0.1},
        kafka={"bootstrap_servers": cluster.bootstrap_servers, "client_config": QUIET},
    )
    topics = Topics.from_settings(s.topics)
    ensure_topics(s.kafka, topics)
    wait_until(lambda: _fully_replicated(s, topics.events, EVENTS_PARTITIONS), 60,
               "every events partition to have a leader and 3 in-sync replicas")
    return s


# ---------------------------------------------------------------- helpers


def _admin(s: Settings) -> AdminClient:
    return AdminClient(base_config(s.kafka))


def _partitions(s: Settings, topic: str) -> dict[int, tuple[int, list[int]]]:
    """partition -> (leader, in-sync replicas), as the cluster's metadata says now."""
    md = _admin(s).list_topics(topic, timeout=10).topics[topic]
    return {p: (pm.leader, list(pm.isrs)) for p, pm in md.partitions.items()}


def _fully_replicated(s: Settings, topic: str, partitions: int) -> bool:
    try:
        parts = _partitions(s, topic)
    except KafkaException:
        return False
    return len(parts) == partitions and all(leader >= 0 and len(isr) == 3 for leader, isr in parts.values())


def session_events(n: int, users: int, seed: int) -> list[dict[str, object]]:
    gen = SessionGenerator(Catalog.generate(400, seed=seed), users, seed=seed, concurrency=50).events()
    return list(itertools.islice(gen, n))


def applied_versions(s: Settings, users: list[str]) -> int:
    return sum(p.profile_version for p in redis_profiles(s, users).values() if p)


def start_worker(s: Settings, name: str, log: Path, metrics_port: int) -> subprocess.Popen[bytes]:
    """``livecopy worker profile`` as a process, its Kafka client id ``name`` (to find it in the group)."""
    env = settings_env(s)
    env["LIVECOPY_KAFKA__CLIENT_CONFIG"] = json.dumps({"client.id": name})
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "livecopy", "worker", "profile", "--max-batch", "200",
             "--metrics-port", str(metrics_port)], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


_RECORDS = re.compile(r'^livecopy_records_total\{(?=[^}]*outcome="(\w+)")[^}]*\}\s+([0-9.e+]+)$', re.M)


def worker_counts(port: int) -> dict[str, int]:
    """The worker's ``livecopy_records_total`` by outcome (applied, duplicate, rejected); {} if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {outcome: int(float(v)) for outcome, v in _RECORDS.findall(text)}


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Paced(threading.Thread):
    """Produces ``events`` at ``rate``/s with one idempotent acks=all producer; ``sent`` counts them."""

    def __init__(self, s: Settings, events: list[dict[str, object]], rate: float) -> None:
        super().__init__(daemon=True)
        self.s, self.events, self.rate = s, events, rate
        self.sent = 0
        self.error: BaseException | None = None
        self.finished_at: float | None = None

    def run(self) -> None:
        try:
            with EventProducer(settings=self.s) as p:
                for n in paced(self.rate, None):
                    if n >= len(self.events):
                        break
                    p.send(self.events[n])
                    self.sent = n + 1
                p.flush(120)  # what waits for a new leader is retried by the producer, never dropped
            self.finished_at = time.monotonic()
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def assert_log_exactly(s: Settings, events: list[dict[str, object]]) -> None:
    """The events topic holds each event once: the idempotent producer's retries across the failover
    wrote no duplicate."""
    got = read_topic(s, Topics.from_settings(s.topics).events, len(events), timeout=60)
    ids = Counter(json.loads(m.value() or b"{}")["event_id"] for m in got)
    assert len(got) == len(events), f"{len(got)} records in the log for {len(events)} events"
    assert set(ids) == {e["event_id"] for e in events} and max(ids.values()) == 1


# ---------------------------------------------------------------- a broker dies


def test_leader_broker_kill_9_mid_stream_then_restart_applies_every_event_exactly_once(
        cluster: kk.KafkaCluster, csettings: Settings, tmp_path: Path) -> None:
    s = csettings
    topics = Topics.from_settings(s.topics)
    group = s.worker.group_prefix + "profile"
    events = session_events(5600, users=200, seed=41)
    warmup, stream, tail = events[:300], events[300:5000], events[5000:]
    expected_stream = expected_profiles(s, (Event.model_validate(e) for e in warmup + stream))
    expected = expected_profiles(s, (Event.model_validate(e) for e in events))
    users = list(expected)
    log, port = tmp_path / "worker.log", free_port()
    worker = start_worker(s, "profile-w1", log, port)
    producer = Paced(s, stream, rate=1200)
    try:
        produce(s, warmup)
        wait_until(lambda: applied_versions(s, users) >= len(warmup), 60, "the worker to run")

        producer.start()
        time.sleep(1.2)
        leaders = {p: leader for p, (leader, _) in _partitions(s, topics.events).items()}
        victim = Counter(leaders.values()).most_common(1)[0][0]
        led = sorted(p for p, leader in leaders.items() if leader == victim)
        sent_at_kill = producer.sent
        killed_at = time.monotonic()
        cluster.kill(victim)  # SIGKILL
        applied_at_kill = worker_counts(port).get("applied", 0)
        assert 0 < sent_at_kill < len(stream), "the kill must happen mid-stream"
        assert applied_at_kill < len(warmup) + len(stream)

        # writes to the partitions the dead broker led resume once another replica leads them
        failover_s = None
        while failover_s is None and producer.is_alive():
            try:
                now = _partitions(s, topics.events)
            except KafkaException:
                now = {}
            if led and all(p in now and now[p][0] not in (-1, victim) for p in led):
                failover_s = time.monotonic() - killed_at
            else:
                time.sleep(0.1)

        producer.join(180)
        assert not producer.is_alive(), "the producer finished"
        assert producer.error is None, f"the producer failed: {producer.error!r}"
        assert producer.finished_at is not None
        wait_profiles(s, expected_stream, 120, "every event applied with one broker down")
        caught_up_at = time.monotonic()
        assert worker.poll() is None, f"the worker died with the broker:\n{log_tail(log)}"

        restart_started = time.monotonic()
        cluster.node(victim).start(timeout=120)
        restart_s = time.monotonic() - restart_started
        wait_until(lambda: _fully_replicated(s, topics.events, EVENTS_PARTITIONS), 60,
                   "the restarted broker back in every partition's ISR")
        produce(s, tail)
        wait_profiles(s, expected, 60, "every event applied after the restart")
        assert not mismatches(s, expected)
        wait_until(lambda: sum(committed_offsets(s.kafka, group, topics.events, EVENTS_PARTITIONS).values())
                   == len(events), 30, "every offset committed")
        assert worker.poll() is None, f"the worker died:\n{log_tail(log)}"
        counts = worker_counts(port)
        assert_log_exactly(s, events)
        assert counts.get("applied") == len(events), f"worker counts {counts}"
        print(f"\nbroker kill -9: {len(events)} events, 1 kill (node {victim}, leader of partitions {led} of "
              f"{EVENTS_PARTITIONS}) after {sent_at_kill} of {len(stream)} streamed events; "
              f"leaders moved in {failover_s if failover_s is None else round(failover_s, 1)} s; "
              f"producer done {producer.finished_at - killed_at:.1f} s after the kill; worker caught up "
              f"{caught_up_at - killed_at:.1f} s after the kill ({caught_up_at - producer.finished_at:.1f} s after the "
              f"producer); node restarted in {restart_s:.1f} s; applied {counts.get('applied')}, duplicates "
              f"skipped {counts.get('duplicate', 0)}, rejected {counts.get('rejected', 0)}; 0 lost, 0 doubled")
    finally:
        stop_all([worker])
        if producer.ident is not None:
            producer.join(5)


# ---------------------------------------------------------------- a worker dies


def _group_members(s: Settings, group: str) -> dict[str, set[int]] | None:
    """client id -> assigned partitions, once the group is stable; None before."""
    admin = _admin(s)  # kept alive until the future resolves (a collected client never answers it)
    try:
        desc = admin.describe_consumer_groups([group], request_timeout=10)[group].result(15)
    except (KafkaException, TimeoutError):
        return None
    if desc.state != ConsumerGroupState.STABLE:
        return None
    return {m.client_id: {tp.partition for tp in m.assignment.topic_partitions} for m in desc.members}


class CommitSampler(threading.Thread):
    """Samples the group's committed offsets every ``every`` s (until stopped)."""

    def __init__(self, s: Settings, group: str, topic: str, partitions: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.s, self.group, self.topic, self.partitions, self.every = s, group, topic, partitions, every
        self.samples: list[tuple[float, dict[int, int]]] = []
        self.failed = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append((time.monotonic(),
                                     committed_offsets(self.s.kafka, self.group, self.topic, self.partitions)))
            except KafkaException:
                self.failed += 1
            self._stop_event.wait(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)

    def rewinds(self) -> list[str]:
        """Every time a partition's committed offset went down between two samples."""
        out = []
        last: dict[int, int] = {}
        for t, offsets in self.samples:
            for p, off in offsets.items():
                if off < last.get(p, -1):
                    out.append(f"partition {p}: {last[p]} -> {off} at {t:.1f}")
                last[p] = max(off, last.get(p, -1))
        return out


def test_one_of_three_workers_kill_9_exactly_once_and_commits_never_go_back(
        cluster: kk.KafkaCluster, csettings: Settings, tmp_path: Path) -> None:
    s = csettings
    topics = Topics.from_settings(s.topics)
    group = s.worker.group_prefix + "profile"
    events = session_events(6000, users=240, seed=42)
    warmup, stream = events[:300], events[300:]
    expected = expected_profiles(s, (Event.model_validate(e) for e in events))
    users = list(expected)
    names = [f"profile-w{i}" for i in range(3)]
    ports = free_ports(len(names))  # distinct
    logs = [tmp_path / f"{n}.log" for n in names]
    workers = [start_worker(s, n, log, port) for n, log, port in zip(names, logs, ports, strict=True)]
    sampler = CommitSampler(s, group, topics.events, EVENTS_PARTITIONS)
    producer = Paced(s, stream, rate=1200)
    try:
        started = time.monotonic()
        members: dict[str, set[int]] = {}

        def three_members() -> bool:
            nonlocal members
            got = _group_members(s, group)
            members = got or {}
            return got is not None and set(got) == set(names) and all(got.values())

        try:
            wait_until(three_members, 90, "three workers sharing the events partitions", every=0.5)
        except AssertionError:
            raise AssertionError(f"group {members}:\n" + "\n".join(log_tail(g) for g in logs)) from None
        joined_s = time.monotonic() - started
        produce(s, warmup)
        wait_until(lambda: applied_versions(s, users) >= len(warmup), 60, "the workers to run")

        sampler.start()
        producer.start()
        time.sleep(1.5)
        victim = 1
        victim_parts = sorted(members[names[victim]])
        at_kill = committed_offsets(s.kafka, group, topics.events, EVENTS_PARTITIONS)
        sent_at_kill = producer.sent
        killed_at = time.monotonic()
        workers[victim].send_signal(signal.SIGKILL)
        workers[victim].wait(10)
        assert 0 < sent_at_kill < len(stream), "the kill must happen mid-stream"
        assert sum(at_kill.values()) < len(events)

        # the dead member's partitions move to the others after session.timeout.ms and go on from its commits
        def moved() -> bool:
            got = _group_members(s, group)
            return got is not None and names[victim] not in got and set().union(*got.values()) == set(
                range(EVENTS_PARTITIONS))

        wait_until(moved, 60, "the dead worker's partitions reassigned", every=0.25)
        moved_s = time.monotonic() - killed_at

        producer.join(120)
        assert not producer.is_alive() and producer.error is None, f"producer: {producer.error!r}"
        wait_profiles(s, expected, 120, "every event applied")
        caught_up_s = time.monotonic() - killed_at
        assert not mismatches(s, expected)
        wait_until(lambda: sum(committed_offsets(s.kafka, group, topics.events, EVENTS_PARTITIONS).values())
                   == len(events), 30, "every offset committed")
        time.sleep(0.5)  # a last sample or two after the final commits
        sampler.stop()
        assert sampler.samples and sampler.samples[-1][1] == committed_offsets(
            s.kafka, group, topics.events, EVENTS_PARTITIONS)
        assert len(sampler.samples) >= 20, f"only {len(sampler.samples)} samples of the committed offsets"
        assert not sampler.rewinds(), f"committed offsets went backwards: {sampler.rewinds()[:5]}"
        survivors = [w for i, w in enumerate(workers) if i != victim]
        assert all(w.poll() is None for w in survivors), "the other workers kept running"
        counts = [worker_counts(p) for i, p in enumerate(ports) if i != victim]
        assert all(c.get("applied") for c in counts), f"survivors' metrics: {counts}"
        for w in survivors:  # SIGTERM: finish, commit, exit cleanly
            w.send_signal(signal.SIGTERM)
        assert [w.wait(20) for w in survivors] == [0, 0]
        assert sum(committed_offsets(s.kafka, group, topics.events, EVENTS_PARTITIONS).values()) == len(events)
        assert_log_exactly(s, events)
        dups = sum(c.get("duplicate", 0) for c in counts)
        print(f"\nworker kill -9: {len(events)} events, 3 workers, 1 kill (owner of partitions {victim_parts}) after "
              f"{sent_at_kill} of {len(stream)} streamed events; group of three in {joined_s:.1f} s; partitions moved "
              f"{moved_s:.1f} s after the kill; caught up {caught_up_s:.1f} s after it; duplicates skipped by the "
              f"survivors {dups} (their counts {counts}); {len(sampler.samples)} commit samples "
              f"({sampler.failed} failed), 0 rewinds; 0 lost, 0 doubled")
    finally:
        stop_all(workers)
        if producer.ident is not None:
            producer.join(5)
        if sampler.is_alive():
            sampler.stop()
