"""The at-least-once loop against an in-memory Kafka: commits, DLQ, outages, poison records."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest
from confluent_kafka import TopicPartition

from core.settings import ProfileSettings
from core.wire import Record, decode_event
from services.workers.profile import ProfileProcessor
from stream.kafka_io import BatchLoop, Outcome
from stream.profile.logic import ProfileUpdate, render, replay
from stream.profile.store import InMemoryProfileStore
from stream.redis_io import TransientStoreError
from tests.fakes import FakeCluster, FakeConsumer, FakeMessage, FakeProducer, RebalancingConsumer

CFG = ProfileSettings()
T0 = 1_795_341_600_000


def event(i: int, user: str = "u1", **kw: object) -> dict[str, object]:
    return {"event_id": f"e{i}", "type": "add_to_cart", "user_id": user, "ts": T0 + i,
            "product_id": f"p{i % 5}", "category": "a/b", "price": 1.5, **kw}


class RecoveringStore(InMemoryProfileStore):
    """Down until it has been probed `outage_pings` times, then up again."""

    def __init__(self, cfg: ProfileSettings, outage_pings: int) -> None:
        super().__init__(cfg)
        self.down = True
        self.outage_pings = outage_pings
        self.pings = 0

    def ping(self) -> bool:
        self.pings += 1
        if self.pings >= self.outage_pings:
            self.down = False
        return not self.down


def make(store: InMemoryProfileStore, partitions: int = 3, max_batch: int = 50,
         cluster: FakeCluster | None = None):
    if cluster is None:
        cluster = FakeCluster()
        cluster.create("ev", partitions)
        cluster.create("dlq", 1)
    consumer = FakeConsumer(cluster, "g")
    producer = FakeProducer(cluster)
    loop = BatchLoop(consumer, producer, ProfileProcessor(store, CFG, now_ms=lambda: T0),  # type: ignore[arg-type]
                     topics=["ev"], dlq_topic="dlq", max_batch=max_batch,
                     backoff_initial_s=0.001, backoff_max_s=0.004)
    return cluster, consumer, producer, loop


def publish(cluster: FakeCluster, values: Sequence[bytes | dict[str, object]], key: bytes | None = b"u1") -> None:
    for v in values:
        data = v if isinstance(v, bytes) else orjson.dumps(v)
        k = key if isinstance(v, bytes) else str(v["user_id"]).encode()
        cluster.append("ev", k, data)


def drain(loop: BatchLoop, max_steps: int = 1000) -> None:
    loop.start()
    for _ in range(max_steps):
        if loop.step() == 0:
            break
    loop.close()


def end_offsets(cluster: FakeCluster, topic: str = "ev") -> dict[int, int]:
    return {p: len(log) for (t, p), log in cluster.logs.items() if t == topic and log}


def committed(cluster: FakeCluster, topic: str = "ev") -> dict[int, int]:
    return {p: off for (g, t, p), off in cluster.committed.items() if t == topic}


def expected_profiles(cluster: FakeCluster) -> dict[str, object]:
    events = []
    for m in cluster.records("ev"):
        try:
            events.append(decode_event(m.key(), m.value()))
        except Exception:
            continue
    return {u: render(u, s, CFG) for u, s in replay(events, CFG, T0).items()}


def actual_profiles(store: InMemoryProfileStore) -> dict[str, object]:
    return {u: render(u, s, CFG) for u, s in store.states.items()}


def test_good_records_apply_bad_ones_go_to_the_dlq_and_offsets_are_committed() -> None:
    store = InMemoryProfileStore(CFG)
    cluster, consumer, _producer, loop = make(store)
    publish(cluster, [event(i, user=f"u{i % 4}") for i in range(40)])
    publish(cluster, [b"{broken", orjson.dumps(event(99, price="1"))], key=b"u1")
    publish(cluster, [orjson.dumps(event(100, user="u2"))], key=b"someone-else")
    drain(loop)
    assert actual_profiles(store) == expected_profiles(cluster)
    dlq = cluster.records("dlq")
    reasons = sorted(dict(m.headers() or [])["error"].decode() for m in dlq)
    assert reasons == ["key_mismatch", "not_json", "wrong_type"]
    h = dict(dlq[0].headers() or [])
    assert set(h) == {"error", "error.detail", "source.topic", "source.partition", "source.offset"}
    assert h["source.topic"] == b"ev"
    src = cluster.logs[("ev", int(h["source.partition"]))][int(h["source.offset"])]
    assert dlq[0].value() == src.value() and dlq[0].key() == src.key()  # original bytes, unchanged
    assert committed(cluster) == end_offsets(cluster)
    assert consumer.closed


def test_redelivered_batches_take_effect_once() -> None:
    store = InMemoryProfileStore(CFG)
    cluster, _c, _p, loop = make(store)
    publish(cluster, [event(i) for i in range(10)])
    drain(loop)
    first = actual_profiles(store)
    cluster.committed.clear()  # as if the commits were lost: everything is delivered again
    drain(make(store, cluster=cluster)[3])
    assert actual_profiles(store) == first
    assert store.states["u1"].version == 10


def test_store_outage_commits_nothing_and_loses_nothing() -> None:
    store = RecoveringStore(CFG, outage_pings=4)
    cluster, consumer, _producer, loop = make(store, max_batch=7)
    publish(cluster, [event(i, user=f"u{i % 3}") for i in range(30)])
    loop.start()
    loop.step()  # the first batch meets the outage: backoff until the store answers, then rewind
    assert store.pings == 4
    assert committed(cluster) == {}  # nothing committed while the effect was not acknowledged
    for _ in range(100):
        if loop.step() == 0:
            break
    loop.close()
    assert actual_profiles(store) == expected_profiles(cluster)
    assert committed(cluster) == end_offsets(cluster)
    assert not consumer.paused


def test_a_message_that_raced_the_pause_is_read_again() -> None:
    store = RecoveringStore(CFG, outage_pings=2)
    cluster, consumer, _producer, loop = make(store, partitions=2, max_batch=3)
    for i in range(6):
        cluster.append("ev", b"u1", orjson.dumps(event(i)), partition=i // 3)
    loop.start()
    # the first batch (partition 0) meets the outage; while paused, a prefetched message of
    # partition 1 is handed out anyway: it must not be skipped.
    consumer.racing_pause.append(cluster.logs[("ev", 1)][0])
    for _ in range(10):
        loop.step()
    loop.close()
    assert store.states["u1"].version == 6
    assert committed(cluster) == {0: 3, 1: 3}


def test_dlq_not_acknowledged_means_retry_not_commit() -> None:
    store = InMemoryProfileStore(CFG)
    cluster, _consumer, producer, loop = make(store, partitions=1)
    publish(cluster, [b"nope"])
    producer.fail_deliveries = True
    loop.start()
    loop.step()
    assert committed(cluster) == {} and cluster.records("dlq") == []
    producer.fail_deliveries = False
    loop.step()
    loop.close()
    assert [dict(m.headers() or [])["error"] for m in cluster.records("dlq")] == [b"not_json"]
    assert committed(cluster) == {0: 1}


class ExplodingProcessor(ProfileProcessor):
    """A processor with a bug that one record triggers."""

    def process(self, records: Sequence[Record]) -> Outcome:
        if any(r.value and b"boom" in r.value for r in records):
            raise RuntimeError("bug triggered by this record")
        return super().process(records)


def test_a_poison_record_goes_to_the_dlq_and_the_rest_applies() -> None:
    store = InMemoryProfileStore(CFG)
    cluster, _consumer, _producer, loop = make(store, partitions=1)
    loop.processor = ExplodingProcessor(store, CFG, now_ms=lambda: T0)
    publish(cluster, [event(1), event(2, props={"x": "boom"}), event(3)])
    drain(loop)
    assert store.states["u1"].version == 2
    (rec,) = cluster.records("dlq")
    assert dict(rec.headers() or [])["error"] == b"processing_error"
    assert b"RuntimeError" in dict(rec.headers() or [])["error.detail"]
    assert committed(cluster) == {0: 3}


def test_commits_are_rate_limited_but_never_ahead_of_effects() -> None:
    store = InMemoryProfileStore(CFG)
    cluster, consumer, _producer, loop = make(store, partitions=1, max_batch=2)
    t = [0.0]
    loop.clock = lambda: t[0]
    loop.commit_interval_s = 10.0
    publish(cluster, [event(i) for i in range(8)])
    loop.start()
    for _ in range(4):
        loop.step()
        t[0] += 1.0
    assert consumer.commits == 1 and committed(cluster) == {0: 2}  # only the first batch's commit so far
    t[0] += 10.0
    loop.step()  # nothing new to read: the pending offsets are committed anyway
    assert committed(cluster) == {0: 8} and consumer.commits == 2
    loop.step()
    assert consumer.commits == 2  # nothing pending: no commit
    loop.close()


def test_revocation_commits_what_took_effect() -> None:
    store = InMemoryProfileStore(CFG)
    cluster, consumer, _producer, loop = make(store, partitions=1)
    publish(cluster, [event(i) for i in range(5)])
    loop.start()
    loop.step()
    consumer.revoke_all()
    assert committed(cluster) == {0: 5}


class RefusingStore(InMemoryProfileStore):
    """Answers its probe but refuses `refusals` batches (a full Redis: PING works, writes get OOM); its
    probe raises `probe_errors` times (a Redis BUSY with a script answers PING with an error)."""

    def __init__(self, cfg: ProfileSettings, refusals: int, probe_errors: int = 0) -> None:
        super().__init__(cfg)
        self.refusals = refusals
        self.probe_errors = probe_errors

    def apply(self, updates: Sequence[ProfileUpdate], now_ms: int) -> list[bool]:
        if self.refusals:
            self.refusals -= 1
            raise TransientStoreError("redis unavailable: OutOfMemoryError: command not allowed")
        return super().apply(updates, now_ms)

    def ping(self) -> bool:
        if self.probe_errors:
            self.probe_errors -= 1
            raise RuntimeError("BUSY Redis is busy running a script")
        return True


class ClockedConsumer(FakeConsumer):
    """Time passes only in poll(); `waited` adds up the time spent polling while paused (backing off)."""

    def __init__(self, cluster: FakeCluster, group: str) -> None:
        super().__init__(cluster, group)
        self.now = 0.0
        self.waited = 0.0

    def poll(self, timeout: float | None = None) -> FakeMessage | None:
        self.now += timeout or 0.0
        if self.paused:
            self.waited += timeout or 0.0
        return super().poll(timeout)


def clocked_loop(store: InMemoryProfileStore) -> tuple[FakeCluster, ClockedConsumer, BatchLoop]:
    cluster = FakeCluster()
    cluster.create("ev", 1)
    cluster.create("dlq", 1)
    consumer = ClockedConsumer(cluster, "g")
    loop = BatchLoop(consumer, FakeProducer(cluster), ProfileProcessor(store, CFG, now_ms=lambda: T0),  # type: ignore[arg-type]
                     topics=["ev"], dlq_topic="dlq", backoff_initial_s=1.0, backoff_max_s=8.0,
                     clock=lambda: consumer.now)
    return cluster, consumer, loop


def test_a_store_that_keeps_refusing_is_retried_with_growing_backoff() -> None:
    store = RefusingStore(CFG, refusals=5)
    cluster, consumer, loop = clocked_loop(store)
    publish(cluster, [event(i) for i in range(3)])
    loop.start()
    waits = []
    for _ in range(6):
        before = consumer.waited
        assert loop.step() == 3
        waits.append(round(consumer.waited - before, 6))
    # its probe says "up" each time, yet the waits grow over the refusals (not 1 s each), then it applies
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 0.0]
    assert store.states["u1"].version == 3 and cluster.records("dlq") == []
    publish(cluster, [event(i) for i in range(3, 5)])
    store.refusals = 1
    loop.step()
    assert consumer.waited - sum(waits) == pytest.approx(1.0)  # after a success: from backoff_initial_s again
    loop.step()
    loop.close()
    assert committed(cluster) == {0: 5} and store.states["u1"].version == 5


def test_a_health_probe_that_raises_means_unhealthy_not_a_dead_worker() -> None:
    store = RefusingStore(CFG, refusals=1, probe_errors=2)
    cluster, consumer, loop = clocked_loop(store)
    publish(cluster, [event(i) for i in range(3)])
    loop.start()
    assert loop.step() == 3  # refused; the probe raises twice (backing off 1 + 2 s), then answers (4 s)
    assert consumer.waited == pytest.approx(7.0) and committed(cluster) == {}
    drain(loop)
    assert committed(cluster) == {0: 3} and store.states["u1"].version == 3 and cluster.records("dlq") == []



def test_offsets_of_a_partition_lost_in_a_rebalance_are_never_committed_again() -> None:
    cluster = FakeCluster()
    cluster.create("ev", 2)
    cluster.create("dlq", 1)
    for i in range(10):
        cluster.append("ev", f"u{i // 5}".encode(), orjson.dumps(event(i, user=f"u{i // 5}")), partition=i // 5)
    store_a = InMemoryProfileStore(CFG)
    a = BatchLoop(RebalancingConsumer(cluster, "g", "ev"), FakeProducer(cluster),  # type: ignore[arg-type]
                  ProfileProcessor(store_a, CFG, now_ms=lambda: T0), topics=["ev"], dlq_topic="dlq",
                  commit_interval_s=0)
    a.start()
    assert a.step() == 10  # the batch had both partitions' records; partition 0 was revoked meanwhile
    assert committed(cluster) == {1: 5}  # partition 0: not A's to commit any more (its new owner re-reads it)
    # B owns partition 0 now and gets ahead
    for i in range(10, 20):
        cluster.append("ev", b"u0", orjson.dumps(event(i, user="u0")), partition=0)
    b_consumer = FakeConsumer(cluster, "g")
    b = BatchLoop(b_consumer, FakeProducer(cluster), ProfileProcessor(InMemoryProfileStore(CFG), CFG,  # type: ignore[arg-type]
                  now_ms=lambda: T0), topics=["ev"], dlq_topic="dlq", commit_interval_s=0)
    b_consumer.position = {("ev", 0): 0}
    b._on_assign(b_consumer, [TopicPartition("ev", 0)])  # type: ignore[arg-type]
    assert b.step() == 15
    assert committed(cluster) == {0: 15, 1: 5}
    cluster.append("ev", b"u1", orjson.dumps(event(99, user="u1")), partition=1)
    assert a.step() == 6  # A goes on with its own partition (from its committed offset); B's is left alone
    a.close()
    assert committed(cluster) == {0: 15, 1: 6}
    assert store_a.states["u1"].version == 6


def test_stop_is_honoured_between_batches() -> None:
    store = InMemoryProfileStore(CFG)
    cluster, consumer, _producer, loop = make(store, partitions=1, max_batch=2)
    publish(cluster, [event(i) for i in range(6)])

    class StopAfterFirst(ProfileProcessor):
        def process(self, records: Sequence[Record]) -> Outcome:
            out = super().process(records)
            loop.stop()
            return out

    loop.processor = StopAfterFirst(store, CFG, now_ms=lambda: T0)
    loop.run()
    assert committed(cluster) == {0: 2} and consumer.closed
    assert store.states["u1"].version == 2


def oversize_event() -> bytes:
    return orjson.dumps(event(2, query="x" * 1_100_000))  # rejected as oversize; 1.1 MB: over message.max.bytes


@pytest.mark.parametrize("limit", ["producer", "broker"])
def test_a_record_too_large_for_the_dlq_goes_there_cut_down_and_the_loop_goes_on(limit: str) -> None:
    store = InMemoryProfileStore(CFG)
    cluster, _consumer, producer, loop = make(store, partitions=1)
    setattr(producer, "max_message_bytes" if limit == "producer" else "broker_max_bytes", 1_000_000)
    big = oversize_event()
    publish(cluster, [event(1), big, b"{broken", event(3)])
    loop.start()
    assert loop.step() == 4  # returns: no exception out of the loop
    loop.close()
    assert store.states["u1"].version == 2
    assert committed(cluster) == {0: 4}
    cut, broken = sorted(cluster.records("dlq"), key=lambda m: dict(m.headers() or [])["source.offset"])
    h = dict(cut.headers() or [])
    assert h["error"] == b"oversize" and b"over the 64 KiB limit" in h["error.detail"]
    assert h["error.truncated"] == b"true" and h["source.size"] == str(len(big)).encode()
    assert (h["source.topic"], h["source.partition"], h["source.offset"]) == (b"ev", b"0", b"1")
    assert cut.key() == b"u1" and cut.value() == big[:64 * 1024]
    assert cluster.logs[("ev", 0)][1].value() == big  # the original, where source.* says
    # a record that fits goes as it is: original key, original bytes, the contract's headers only
    hb = dict(broken.headers() or [])
    assert broken.value() == b"{broken" and set(hb) == {"error", "error.detail", "source.topic", "source.partition",
                                                        "source.offset"}


def test_a_dlq_record_whose_key_alone_is_too_large_still_lands_there() -> None:
    store = InMemoryProfileStore(CFG)
    cluster, _consumer, producer, loop = make(store, partitions=1)
    producer.max_message_bytes = 1_000_000
    publish(cluster, [b"k" * 1_000_001], key=b"u" * 1_000_001)  # oversize; the key alone is over 1 MB too
    drain(loop)
    (rec,) = cluster.records("dlq")
    h = dict(rec.headers() or [])
    assert h["error.truncated"] == b"true" and h["source.size"] == b"1000001"
    assert h["source.key_size"] == b"1000001" and rec.key() == b"u" * 64 * 1024 and rec.value() == b"k" * 64 * 1024
    assert committed(cluster) == {0: 1}


def test_under_a_limit_below_64_kib_the_dlq_record_is_its_headers_alone() -> None:
    store = InMemoryProfileStore(CFG)
    cluster, _consumer, producer, loop = make(store, partitions=1)
    producer.max_message_bytes = 2000
    publish(cluster, [oversize_event()])
    drain(loop)
    (rec,) = cluster.records("dlq")
    h = dict(rec.headers() or [])
    assert rec.key() is None and rec.value() == b""
    assert h["error"] == b"oversize" and h["error.truncated"] == b"true" and h["source.offset"] == b"0"
    assert h["source.key_size"] == b"2" and committed(cluster) == {0: 1}


@pytest.mark.parametrize("max_batch", [1, 1000])
def test_batch_size_does_not_change_the_result(max_batch: int) -> None:
    store = InMemoryProfileStore(CFG)
    cluster, _c, _p, loop = make(store, max_batch=max_batch)
    publish(cluster, [event(i, user=f"u{i % 7}") for i in range(50)])
    drain(loop)
    assert actual_profiles(store) == expected_profiles(cluster)



class SlowEffects:
    """An AsyncProcessor: every record's effect is under way until the test finishes it, in any order."""

    def __init__(self) -> None:
        self.under_way: list[Record] = []
        self.done: list[tuple[tuple[str, int], int]] = []
        self.drained = False

    def process(self, records: Sequence[Record]) -> Outcome:
        self.under_way += records
        return Outcome([], records)

    def healthy(self) -> bool:
        return True

    def finish(self, offset: int, partition: int = 0) -> None:
        r = next(r for r in self.under_way if r.offset == offset and r.partition == partition)
        self.under_way.remove(r)
        self.done.append(((r.topic, r.partition), r.offset))

    def finished(self) -> list[tuple[tuple[str, int], int]]:
        out, self.done = self.done, []
        return out

    def in_flight(self) -> int:
        return len(self.under_way)

    def drain(self) -> None:
        self.drained = True


def test_an_async_processor_commits_only_the_finished_prefix_of_each_partition() -> None:
    cluster = FakeCluster()
    cluster.create("ev", 1)
    for i in range(5):
        cluster.append("ev", b"u", b"x%d" % i, partition=0)
    proc = SlowEffects()
    loop = BatchLoop(FakeConsumer(cluster, "g"), FakeProducer(cluster), proc, topics=["ev"], dlq_topic="dlq",
                     commit_interval_s=0.0)
    loop.start()
    loop.step()
    assert cluster.committed.get(("g", "ev", 0), 0) == 0  # nothing finished yet
    proc.finish(1)
    proc.finish(2)
    loop.step()
    assert cluster.committed.get(("g", "ev", 0), 0) == 0  # offset 0 is still under way
    proc.finish(0)
    loop.step()
    assert cluster.committed[("g", "ev", 0)] == 3
    proc.finish(4)
    loop.close()  # drains, then commits what finished: 3 is still under way
    assert proc.drained and cluster.committed[("g", "ev", 0)] == 3


def test_an_async_processor_with_too_much_in_flight_pauses_the_partitions_until_below_resume() -> None:
    cluster = FakeCluster()
    cluster.create("ev", 2)
    for i in range(10):
        cluster.append("ev", b"u", b"x%d" % i, partition=i % 2)
    proc = SlowEffects()
    consumer = FakeConsumer(cluster, "g")
    loop = BatchLoop(consumer, FakeProducer(cluster), proc, topics=["ev"], dlq_topic="dlq", max_batch=4,
                     max_inflight=4, resume_below=1, commit_interval_s=0.0)
    loop.start()
    loop.step()
    assert len(proc.under_way) == 4 and consumer.paused == {("ev", 0), ("ev", 1)}
    loop.step()
    assert len(proc.under_way) == 4  # paused: nothing more read
    for r in list(proc.under_way)[:2]:
        proc.finish(r.offset, r.partition)
    loop.step()
    assert consumer.paused  # 2 in flight, not yet <= 1
    for r in list(proc.under_way):
        proc.finish(r.offset, r.partition)
    loop.step()
    assert not consumer.paused
    loop.step()
    assert len(proc.under_way) == 4  # reading again
    loop.close()


def test_an_event_dated_far_ahead_goes_to_the_dlq_and_cannot_freeze_the_profile() -> None:
    """One event dated years ahead would become the reference time of the shopper's affinities (later
    events, decayed to it, would add next to nothing): it goes to the DLQ as future_timestamp instead;
    an event a few minutes ahead (clock skew) still applies, and so does an empty record's neighbour."""
    store = InMemoryProfileStore(CFG)
    cluster, _consumer, _producer, loop = make(store, partitions=1)
    year = 365 * 24 * 3600 * 1000
    publish(cluster, [event(1), event(2, ts=T0 + 5 * year), event(3, ts=T0 + 120_000), b""])
    drain(loop)
    reasons = [dict(m.headers() or [])["error"] for m in cluster.records("dlq")]
    assert reasons == [b"future_timestamp", b"empty"]
    assert b"ahead of the worker's clock" in dict(cluster.records("dlq")[0].headers() or [])["error.detail"]
    state = store.load("u1")
    assert state is not None and state.version == 2  # events 1 and 3
    assert committed(cluster) == end_offsets(cluster)


def test_produce_raw_finds_a_key_in_any_line() -> None:
    from livecopy.cli.stream import raw_key

    assert raw_key(b'{"user_id": "u-9", "x": 1}') == "u-9"
    assert raw_key(b"[" * 100_000 + b"]" * 100_000) is None  # nested past any parser's depth: no crash
    assert raw_key(b'{"user_id": 5}') is None and raw_key(b"not json") is None and raw_key(b"[1]") is None
