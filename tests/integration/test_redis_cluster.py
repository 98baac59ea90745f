"""Redis Cluster (3 masters + 3 replicas, redis-server in cluster mode on loopback) under the workers and the API,
against the suite's real broker; a master failover mid-stream, with and without ``redis.wait_replicas``."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import orjson
import pytest
from confluent_kafka import Producer

from core.catalog import Catalog
from core.contracts import Event, Profile
from core.settings import FeedbackSettings, ResponseSettings, Settings
from core.wire import Topics
from livecopy import EventProducer
from services.api.app import create_app
from services.api.copy import copy_extension
from services.workers.feedback import build_feedback_loop
from services.workers.profile import build_profile_loop
from services.workers.responses import build_responses_loop
from stream.catalog.store import RedisCatalogStore
from stream.copy_store import CopyKeys
from stream.feedback.store import RedisFeedbackStore
from stream.forget import shopper_keys
from stream.kafka_io import committed_offsets, producer_config
from stream.profile.logic import ProfileUpdate
from stream.profile.store import ProfileKeys, RedisProfileStore
from stream.redis_io import TransientStoreError, durability_problem, redis_client
from stream.responses.store import RedisResponseStore
from tests.copygen import ServerThread, save_tiny_student
from tests.feedback_data import click_event, copy_record, impression_event
from tests.integration.helpers import (
    ROOT,
    ThreadWorker,
    expected_profiles,
    mismatches,
    produce,
    read_topic,
    redis_profiles,
    settings_env,
    start_cli,
    wait_profiles,
    wait_until,
)
from tests.integration.redis_cluster import LocalCluster, Node
from tests.integration.test_copy_api import with_generation
from tests.integration.test_worker_faults import session_events

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(node_timeout_ms=1000) as c:
        yield c


def on_cluster(settings: Settings, c: LocalCluster, *, wait_replicas: int = 1) -> Settings:
    """The test's settings on the cluster. No cap on a shopper's dedupe marks (profile.max_seen 0): the busiest
    generated shoppers have more events (713) than the default cap (400), and a failover re-delivers whole
    batches, whose events beyond the cap would count again (that bound: docs/durability.md)."""
    return settings.model_copy(update={
        "profile": settings.profile.model_copy(update={"max_seen": 0}),
        "redis": settings.redis.model_copy(update={"url": c.url, "cluster": True, "wait_replicas": wait_replicas,
                                                   "wait_timeout_ms": 500, "socket_timeout_s": 1.0}),
        "worker": settings.worker.model_copy(update={"retry_backoff_initial_s": 0.05, "retry_backoff_max_s": 0.5}),
    })


def lost_and_doubled(s: Settings, expected: Mapping[str, Profile]) -> tuple[int, int]:
    """Events missing from / counted twice in the profiles, against the pure function (profile_version counts
    the events applied)."""
    got = redis_profiles(s, expected)
    lost = doubled = 0
    for u, p in expected.items():
        g = got[u].profile_version if got[u] is not None else 0  # type: ignore[union-attr]
        lost += max(0, p.profile_version - g)
        doubled += max(0, g - p.profile_version)
    return lost, doubled


def committed(s: Settings) -> int:
    topics = Topics.from_settings(s.topics)
    offs = committed_offsets(s.kafka, s.worker.group_prefix + "profile", topics.events, s.topics.events_partitions)
    return sum(max(0, o) for o in offs.values())


def masters_holding(c: LocalCluster, prefix: str) -> int:
    return sum(1 for n in c.nodes if n.proc is not None and n.client().info("replication")["role"] == "master"
               and any(True for _ in n.client().scan_iter(match=prefix + "*", count=1000)))


def test_profile_worker_on_the_cluster_equals_the_pure_function(settings: Settings, cluster: LocalCluster) -> None:
    s = on_cluster(settings, cluster)
    assert durability_problem(redis_client(s.redis), s.redis) is None
    events = session_events(3000, users=200, seed=5)
    expected = expected_profiles(s, (Event.model_validate(e) for e in events))
    produce(s, events)
    produce(s, events[:500])  # re-delivered: no second effect
    with ThreadWorker(build_profile_loop(s, max_batch=300)):
        wait_profiles(s, expected, 90, "every profile on the cluster")
    assert not mismatches(s, expected)
    assert lost_and_doubled(s, expected) == (0, 0)
    assert masters_holding(cluster, s.redis.key_prefix) == 3  # the shoppers spread over the three masters


def test_api_reads_profiles_serves_copy_and_forgets_on_the_cluster(settings: Settings, cluster: LocalCluster,
                                                                   tmp_path: Path) -> None:
    s = with_generation(on_cluster(settings, cluster), save_tiny_student(tmp_path / "v1", "v1", seed=1),
                        hot_reload=False)
    events = session_events(400, users=20, seed=7)
    expected = expected_profiles(s, (Event.model_validate(e) for e in events))
    produce(s, events)
    with ThreadWorker(build_profile_loop(s)):
        wait_profiles(s, expected, 60, "profiles applied")
    users = sorted(expected)[:6]
    with ServerThread(create_app(s, extensions=[copy_extension(s)])) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/healthz").status_code == 200
        for u in users:
            r = http.get(f"/v1/profile/{u}")
            assert r.status_code == 200 and r.json() == orjson.loads(expected[u].model_dump_json())
        product = expected[users[0]].recent_products[0]
        first = http.get("/v1/copy", params={"user_id": users[0], "product_id": product})
        assert first.status_code == 200, first.text
        again = http.get("/v1/copy", params={"user_id": users[0], "product_id": product})
        assert again.headers["X-Livecopy-Cache"] == "hit" and again.json()["copy_id"] == first.json()["copy_id"]
        gone = http.delete(f"/v1/profile/{users[0]}")
        assert gone.status_code == 200 and gone.json()["keys_deleted"] >= 3  # profile, recent, seen, copy...
        assert http.get(f"/v1/profile/{users[0]}").status_code == 404
        keys = shopper_keys(redis_client(s.redis), s.redis.key_prefix, users[0])
        assert keys == [ProfileKeys(s.redis.key_prefix).tombstone(users[0])]
        assert http.get(f"/v1/profile/{users[1]}").status_code == 200


def test_feedback_joiner_and_responses_worker_on_the_cluster(settings: Settings, cluster: LocalCluster) -> None:
    fb = FeedbackSettings(window_s=1, lateness_s=0.2, copy_wait_s=30, orphan_wait_s=60, sweep_interval_s=0.1,
                          shards=8)
    s = on_cluster(settings, cluster).model_copy(update={"feedback": fb,
                                                         "responses": ResponseSettings(half_life_days=0)})
    topics = Topics.from_settings(s.topics)
    now = int(time.time() * 1000)
    n = 60
    truth = {f"imp-{i}": i % 3 == 0 for i in range(n)}
    p = Producer(producer_config(s.kafka))
    for i in range(n):
        imp, cp, user = f"imp-{i}", f"cp-{i}", f"fan{i % 6}"
        p.produce(topics.copy, key=user.encode(), value=copy_record(cp, user=user, product=f"p{i}",
                                                                   style="social_proof" if i % 2 else "eco"))
        for ev in [impression_event(imp, cp, ts=now, user=user, product=f"p{i}")] * 2:  # a duplicate impression
            p.produce(topics.events, key=user.encode(), value=orjson.dumps(ev))
        if truth[imp]:
            p.produce(topics.events, key=user.encode(),
                      value=orjson.dumps(click_event(imp, cp, ts=now + 300, user=user, product=f"p{i}")))
    assert p.flush(30) == 0
    joiner = build_feedback_loop(s)
    responses = build_responses_loop(s)
    store = RedisResponseStore(redis_client(s.redis), s.responses, s.redis.key_prefix)

    with ThreadWorker(joiner), ThreadWorker(responses):
        wait_until(lambda: joiner.feedback.emitted >= n, 60, "every impression joined and emitted")
        got = read_topic(s, topics.feedback, n, timeout=30)
        wait_until(lambda: responses.records >= n, 60, "every feedback record counted")
    assert sorted(orjson.loads(m.value() or b"")["impression_id"] for m in got) == sorted(truth)
    assert {orjson.loads(m.value() or b"")["impression_id"]: orjson.loads(m.value() or b"")["clicked"]
            for m in got} == truth
    stats = RedisFeedbackStore(redis_client(s.redis), s.feedback, s.redis.key_prefix).stats()  # every shard
    assert stats.by["all"]["all"] == (n, sum(truth.values()))
    clicks = {u: store.load(f"fan{u}") for u in range(6)}
    assert sum(sum(r.clicks.values()) for r in clicks.values() if r is not None) == sum(truth.values())
    assert read_topic(s, topics.dlq, 0, timeout=1) == []


def test_wait_replicas_holds_a_batch_back_until_replicas_acknowledge(settings: Settings, cluster: LocalCluster) -> None:
    """A Redis whose writes no replica acknowledged (the suite's standalone Redis has none; a cluster master whose
    replica is gone): the batch is applied there but reported as TransientStoreError, so the worker commits no
    offset and applies the batch again later (its dedupe marks make that a no-op)."""
    now = int(time.time() * 1000)
    updates = [ProfileUpdate(f"w{i}", f"waiter{i % 3}", "page_view", now) for i in range(9)]
    lone = settings.redis.model_copy(update={"wait_replicas": 1, "wait_timeout_ms": 50})
    store = RedisProfileStore(redis_client(lone), settings.profile, settings.redis.key_prefix)
    with pytest.raises(TransientStoreError, match="only 0 of 1 Redis replicas"):
        store.apply(updates, now)
    plain = RedisProfileStore(redis_client(settings.redis), settings.profile, settings.redis.key_prefix)
    assert plain.apply(updates, now) == [False] * 9  # applied the first time, though not acknowledged
    wait_until(cluster.healthy, 60, "a healthy cluster")
    on = on_cluster(settings, cluster)
    clustered = RedisProfileStore(redis_client(on.redis), on.profile, on.redis.key_prefix)
    assert clustered.apply(updates, now) == [True] * 9 and clustered.apply(updates, now) == [False] * 9


def test_the_cli_on_the_cluster_keys_and_forget(settings: Settings, cluster: LocalCluster) -> None:
    """`livecopy keys` and `livecopy profile forget` with LIVECOPY_REDIS__CLUSTER=true; the API (auth=keys)
    finds the key the CLI made."""
    wait_until(cluster.healthy, 60, "a healthy cluster")
    s = on_cluster(settings, cluster)
    env = settings_env(s)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "livecopy", *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    made = cli("keys", "create", "--name", "shop", "--scope", "profile:read")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert "shop" in cli("keys", "list").stdout
    now = int(time.time() * 1000)
    store = RedisProfileStore(redis_client(s.redis), s.profile, s.redis.key_prefix)
    store.apply([ProfileUpdate("c1", "cli-shopper", "product_view", now, "p1")], now)
    keyed = s.model_copy(update={"api": s.api.model_copy(update={"auth": "keys"})})
    with ServerThread(create_app(keyed)) as url, httpx.Client(base_url=url, timeout=30) as http:
        auth = {"Authorization": f"Bearer {secret}"}
        assert http.get("/v1/profile/cli-shopper", headers=auth).status_code == 200
        out = cli("profile", "forget", "cli-shopper")
        assert out.returncode == 0, out.stderr
        assert http.get("/v1/profile/cli-shopper", headers=auth).status_code == 404
    assert shopper_keys(redis_client(s.redis), s.redis.key_prefix, "cli-shopper") == [
        ProfileKeys(s.redis.key_prefix).tombstone("cli-shopper")]


def test_catalog_store_and_the_feedback_stats_span_the_cluster(settings: Settings, cluster: LocalCluster) -> None:
    """The catalog's MULTI (one hash: one slot) and a read over every feedback shard (several nodes)."""
    wait_until(cluster.healthy, 60, "a healthy cluster")
    s = on_cluster(settings, cluster)
    client = redis_client(s.redis)
    store = RedisCatalogStore(client, CopyKeys(s.redis.key_prefix).catalog)
    a, b, c = Catalog.generate(3, seed=2).products
    store.apply({a.product_id: a, b.product_id: b}, [])
    store.apply({c.product_id: c}, [a.product_id])
    assert store.get(a.product_id) is None and store.get(b.product_id) == b and store.get(c.product_id) == c
    fb = RedisFeedbackStore(client, FeedbackSettings(shards=16), s.redis.key_prefix)
    nodes = {cluster.client().get_node_from_key(fb.shard_prefix(n) + "ctr").name for n in range(16)}
    assert len(nodes) == 3 and fb.stats().by == {}


def test_the_generator_caches_copies_on_the_cluster(settings: Settings, cluster: LocalCluster) -> None:
    """The generator worker's pregeneration (profile read, cache check, NX writes) with a cluster client."""
    from services.workers.generator import Pregenerator
    from stream.copy_store import CopyPublisher
    from tests.integration.test_generator_worker import CAT, Broker, StubEngine, a_view, cached, pregen_settings

    wait_until(cluster.healthy, 60, "a healthy cluster")
    s = pregen_settings(on_cluster(settings, cluster))
    ev = a_view("gen-on-cluster")
    broker = Broker(up=True)
    pg = Pregenerator(s, StubEngine(), redis_client(s.redis), CopyPublisher(broker, "copy"),  # type: ignore[arg-type]
                      lambda: CAT, threading.Event())
    try:
        assert pg.handle(ev) == 2 and pg.handle(ev) == 0  # the second delivery finds both cached
    finally:
        pg.publisher.close()
    assert len(cached(pg, ev)) == 2


def user_on(c: LocalCluster, prefix: str, users: list[str], node: Node) -> list[str]:
    keys = ProfileKeys(prefix)
    return [u for u in users if c.master_of(keys.of(u)[0]).port == node.port]


def replica_of(c: LocalCluster, master: Node) -> Node:
    mid = master.client().execute_command("CLUSTER MYID")
    mid = mid.decode() if isinstance(mid, bytes) else mid
    for n in c.nodes:
        if n is not master and n.proc is not None:
            info = n.client().info("replication")
            if info["role"] == "slave" and int(info["master_port"]) == master.port:
                return n
    raise AssertionError(f"no replica of {master.port} ({mid})")


def wait_promoted(c: LocalCluster, replica: Node, timeout: float = 30.0) -> float:
    started = time.monotonic()
    wait_until(lambda: c.roles()[replica.port] == "master" and
               replica.client().cluster("info")["cluster_state"] == "ok", timeout, "the replica promoted")
    return time.monotonic() - started


def test_master_killed_under_load_loses_and_doubles_nothing_with_wait(settings: Settings, cluster: LocalCluster,
                                                                     tmp_path: Path) -> None:
    """kill -9 of the master of a busy shopper's slot while events stream through a profile worker process
    (redis.wait_replicas=1): its replica is promoted, the node comes back as a replica, and every event's
    effect is there exactly once."""
    wait_until(cluster.healthy, 60, "a healthy cluster")
    s = on_cluster(settings, cluster, wait_replicas=1)
    events = session_events(8000, users=250, seed=41)
    expected = expected_profiles(s, (Event.model_validate(e) for e in events))
    busiest = max(expected, key=lambda u: expected[u].profile_version)
    victim = cluster.master_of(ProfileKeys(s.redis.key_prefix).of(busiest)[0])
    replica = replica_of(cluster, victim)
    on_victim = user_on(cluster, s.redis.key_prefix, list(expected), victim)
    log = tmp_path / "worker.log"
    worker = start_cli(s, "worker", "profile", log=log)
    sent = [0]

    def producer() -> None:  # ~8 s at 1,000 events/s
        with EventProducer(settings=s) as p:
            for i, e in enumerate(events):
                p.send(e)
                sent[0] = i + 1
                if i % 100 == 99:
                    time.sleep(0.1)

    t = threading.Thread(target=producer)
    try:
        t.start()
        wait_until(lambda: sent[0] >= 2500, 30, "the stream under way")
        killed_at = sent[0]
        cluster.kill(victim)
        failover_s = wait_promoted(cluster, replica)
        cluster.restart(victim)  # it rejoins as the replica of its former replica
        rejoin_started = time.monotonic()
        wait_until(cluster.healthy, 60, "the old master back as a replica")
        rejoin_s = time.monotonic() - rejoin_started
        assert killed_at < len(events) and cluster.roles()[victim.port] == "slave"
        t.join(60)
        try:
            wait_profiles(s, expected, 120, "every event applied after the failover")
        except AssertionError as exc:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise AssertionError(f"{exc}; {lost_and_doubled(s, expected)} lost/doubled; worker log:\n{tail}") from None
        wait_until(lambda: committed(s) == len(events), 30, "every offset committed")
        assert not mismatches(s, expected)
        lost, doubled = lost_and_doubled(s, expected)
        assert (lost, doubled) == (0, 0)
        refused = log.read_text(errors="replace").count("replicas acknowledged")
        print(f"\nredis cluster failover: master {victim.port} (slot of {len(on_victim)} of {len(expected)} shoppers) "
              f"kill -9 at event {killed_at} of {len(events)}; replica {replica.port} promoted in {failover_s:.1f} s, "
              f"old master resynced as replica {rejoin_s:.1f} s later; {lost} lost, {doubled} doubled; "
              f"{refused} batches held back by WAIT")
    finally:
        worker.kill()
        worker.wait(10)
        t.join(5)


@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_what_a_failover_costs_writes_the_replica_never_received(settings: Settings, cluster: LocalCluster,
                                                                  wait_replicas: int) -> None:
    """A master's replica dies (kill -9) while events stream on, then the master dies too and the replica comes
    back and is promoted (with the master's writes up to its own death): every write the master took after
    that is gone. Without WAIT (wait_replicas=0) the worker had committed their offsets: those events are lost
    for good, exactly the failed master's shoppers' events of that span, whose profiles read as if the events
    never happened. With wait_replicas=1 the worker held the offsets back (WAIT answered 0 replicas) and
    applies the batches again on the promoted replica: nothing lost."""
    wait_until(cluster.healthy, 60, "a healthy cluster")
    s = on_cluster(settings, cluster, wait_replicas=wait_replicas)
    events = session_events(6000, users=300, seed=50 + wait_replicas)
    expected = expected_profiles(s, (Event.model_validate(e) for e in events))
    first, second, third = events[:1500], events[1500:3500], events[3500:]
    skipped = expected_profiles(s, (Event.model_validate(e) for e in first + third))  # as if no `second`
    busiest = max(expected, key=lambda u: expected[u].profile_version)
    victim = cluster.master_of(ProfileKeys(s.redis.key_prefix).of(busiest)[0])
    replica = replica_of(cluster, victim)
    loop = build_profile_loop(s, max_batch=500)
    with ThreadWorker(loop):
        produce(s, first)
        wait_until(lambda: committed(s) == len(first), 60, "the first events applied and committed")
        cluster.kill(replica)
        produce(s, second)
        if wait_replicas:
            time.sleep(4.0)  # the worker retries; WAIT keeps answering 0 replicas for the victim's writes
            held = len(first) + len(second) - committed(s)
            assert held > 0, "offsets committed although no replica acknowledged"
        else:
            wait_until(lambda: committed(s) == len(first) + len(second), 60, "the second events committed")
            held = 0
        cluster.kill(victim)
        cluster.restart(replica)
        failover_s = wait_promoted(cluster, replica)
        cluster.restart(victim)  # back as the replica of its former replica
        wait_until(cluster.healthy, 60, "the old master back as a replica")
        produce(s, third)
        wait_until(lambda: committed(s) == len(events), 90, "every offset committed")
        time.sleep(1.0)
    lost, doubled = lost_and_doubled(s, expected)
    on_victim = user_on(cluster, s.redis.key_prefix, list(expected), replica)  # the slots moved with the promotion
    span = sum(expected[u].profile_version - (skipped[u].profile_version if u in skipped else 0) for u in on_victim)
    print(f"\nfailover after the replica died, wait_replicas={wait_replicas}: {len(second)} events after its death, "
          f"{span} of them for the {len(on_victim)} shoppers of the failed master; promoted in {failover_s:.1f} s; "
          f"offsets held back at the kill: {held}; {lost} lost, {doubled} doubled")
    assert doubled == 0 and span > 0
    others = {u: p for u, p in expected.items() if u not in set(on_victim)}
    assert not mismatches(s, others)
    if wait_replicas:
        assert lost == 0 and not mismatches(s, expected)
    else:
        assert lost == span, "the writes the replica never received are lost, and only those"
        assert not mismatches(s, {u: skipped[u] for u in on_victim if u in skipped})
