"""Real Apache Kafka 4.x (KRaft) from Maven Central jars, no Docker: livecopy.kafka_kraft.

Without Java 17+ (or Maven and no cached jars) these tests skip locally and fail under CI.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from livecopy import kafka_kraft as kk

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".livecopy" / "kafka-cache"  # .livecopy/ is gitignored
TOPIC = "kraft-smoke"
RECORDS = [(f"k{i}".encode(), f"v{i}".encode()) for i in range(5)]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"real Kafka needed under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kafka_libs() -> Path:
    if not kk.java_available():
        _unavailable("Java 17+ not found (apt-get install openjdk-17-jre-headless)")
    if not kk.kafka_available(CACHE):
        _unavailable(f"Kafka {kk.version()} jars not cached in {CACHE} and Maven (mvn) not found")
    try:
        return kk.fetch_jars(CACHE)
    except kk.KafkaUnavailable as e:
        _unavailable(str(e))
        raise


def _read_all(bootstrap: str, group: str, *, commit: bool = False) -> list[tuple[bytes | None, bytes | None]]:
    """Every record of TOPIC from the beginning (manual assignment: no group join wait)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False, "log_level": 3})
    try:
        tp = TopicPartition(TOPIC, 0, 0)  # OFFSET 0 = the beginning of the log
        c.assign([tp])
        got: list[tuple[bytes | None, bytes | None]] = []
        for _ in range(40):
            msg = c.poll(0.5)
            if msg is None:
                if len(got) >= len(RECORDS):
                    break
                continue
            if msg.error():
                raise KafkaException(msg.error())
            got.append((msg.key(), msg.value()))
        if commit and got:
            c.commit(asynchronous=False)
        return got
    finally:
        c.close()


def _committed(bootstrap: str, group: str) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "log_level": 3})
    try:
        return c.committed([TopicPartition(TOPIC, 0)], timeout=10)[0].offset
    finally:
        c.close()


def _replicas(admin: AdminClient) -> int:
    """Replica count of TOPIC's partition 0, once the broker asked has the new topic's metadata."""
    deadline = time.monotonic() + 15
    while True:
        partitions = admin.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions
        if 0 in partitions or time.monotonic() > deadline:
            return len(partitions[0].replicas)
        time.sleep(0.1)


def test_server_properties_single_node(tmp_path: Path) -> None:
    node = kk.KafkaKraft(tmp_path / "n", cache_dir=CACHE, node_id=1)
    props = node.properties()
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == f"1@127.0.0.1:{node.controller_port}"
    assert props["listeners"] == f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}"
    assert props["auto.create.topics.enable"] == "false"
    assert props["offsets.topic.replication.factor"] == 1
    assert node.bootstrap_servers == f"127.0.0.1:{node.port}"
    assert node.pid is None and not node.is_formatted()
    assert kk.version() == kk.KAFKA_VERSION and kk.version().startswith("4.")


def test_cluster_of_three_shares_voters_and_replicates(tmp_path: Path) -> None:
    cluster = kk.KafkaCluster(tmp_path / "c", n=3, cache_dir=CACHE)
    voters = {str(n.properties()["controller.quorum.voters"]) for n in cluster}
    assert len(voters) == 1 and voters.pop().count("@") == 3
    assert len({n.cluster_id for n in cluster}) == 1
    assert len({p for n in cluster for p in (n.port, n.controller_port)}) == 6
    for node in cluster:
        assert node.properties()["default.replication.factor"] == 3
        assert node.properties()["min.insync.replicas"] == 2
    assert cluster.bootstrap_servers.count(",") == 2


def test_fetch_jars_reports_maven_failure(tmp_path: Path) -> None:
    with pytest.raises(kk.KafkaUnavailable, match=r"Maven could not fetch Kafka .* \(exit 1\)"):
        kk.fetch_jars(tmp_path / "cache", mvn="/bin/false")


def test_records_and_offsets_survive_stop_and_kill(kafka_libs: Path, tmp_path: Path) -> None:
    node = kk.KafkaKraft(tmp_path / "kafka", libs_dir=kafka_libs, die_with_parent=True)
    with node:
        assert node.pid is not None and node.is_formatted()
        bootstrap, port, first_pid = node.bootstrap_servers, node.port, node.pid

        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
        for fut in admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=1)]).values():
            fut.result(timeout=30)
        producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "log_level": 3})
        for key, value in RECORDS:
            producer.produce(TOPIC, key=key, value=value)
        assert producer.flush(30) == 0
        del producer, admin

        assert _read_all(bootstrap, "g1", commit=True) == RECORDS
        assert _committed(bootstrap, "g1") == len(RECORDS)

        node.restart()  # clean shutdown, same ports and data dir
        assert node.pid not in (None, first_pid) and node.port == port
        assert _read_all(bootstrap, "g2") == RECORDS
        assert _committed(bootstrap, "g1") == len(RECORDS)

        node.kill()  # unclean: the log is recovered on the next start
        assert node.pid is None
        node.start()
        assert node.bootstrap_servers == bootstrap
        assert _read_all(bootstrap, "g3") == RECORDS
    assert node.pid is None


@pytest.mark.slow
def test_three_node_cluster_keeps_writing_with_one_node_down(kafka_libs: Path, tmp_path: Path) -> None:
    cluster = kk.KafkaCluster(tmp_path / "cluster", n=3, cache_dir=CACHE, die_with_parent=True)
    with cluster:
        bootstrap = cluster.bootstrap_servers
        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
        for fut in admin.create_topics([NewTopic(TOPIC, num_partitions=1)]).values():  # cluster default RF 3
            fut.result(timeout=30)
        assert _replicas(admin) == 3
        producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "log_level": 3})
        for key, value in RECORDS[:2]:
            producer.produce(TOPIC, key=key, value=value)
        assert producer.flush(30) == 0

        cluster.kill(2)  # 2 of 3 replicas left = min.insync.replicas: acks=all writes still succeed
        for key, value in RECORDS[2:]:
            producer.produce(TOPIC, key=key, value=value)
        assert producer.flush(60) == 0
        del producer, admin
        cluster.node(2).start()
        assert _read_all(bootstrap, "g1") == RECORDS
    assert all(node.pid is None for node in cluster)
