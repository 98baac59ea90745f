"""The micro-batching scheduler (pure, fake clock) and engine (threads, fake executor)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

import pytest

from engine.batching import (
    BatchConfig,
    BatchingEngine,
    BatchScheduler,
    DeadlineExceeded,
    EngineStopped,
    Job,
    Overloaded,
)


def job(req: int, now: float, timeout: float = 1.0) -> Job[int, int]:
    return Job(req, now, now + timeout)


def test_dispatch_waits_for_company_up_to_max_wait() -> None:
    s: BatchScheduler[int, int] = BatchScheduler(BatchConfig(max_batch_size=4, max_wait_ms=10))
    assert s.wait_time(0.0) is None
    s.submit(job(1, now=0.0))
    assert s.wait_time(0.0) == pytest.approx(0.010)
    assert s.wait_time(0.004) == pytest.approx(0.006)
    assert s.wait_time(0.050) == 0.0  # the oldest has waited long enough
    s.submit(job(2, 0.001))
    s.submit(job(3, 0.002))
    s.submit(job(4, 0.003))
    assert s.wait_time(0.003) == 0.0  # a full batch goes at once


def test_take_returns_at_most_a_batch_oldest_first_and_separates_expired() -> None:
    s: BatchScheduler[int, int] = BatchScheduler(BatchConfig(max_batch_size=2, max_wait_ms=10))
    s.submit(job(1, 0.0, timeout=0.005))
    s.submit(job(2, 0.0))
    s.submit(job(3, 0.0))
    batch, expired = s.take(now=0.006)
    assert [j.request for j in batch] == [2, 3] and [j.request for j in expired] == [1]
    assert not s.queue


def test_a_near_deadline_brings_dispatch_forward() -> None:
    s: BatchScheduler[int, int] = BatchScheduler(BatchConfig(max_batch_size=8, max_wait_ms=50))
    s.submit(job(1, 0.0, timeout=0.020))
    assert s.wait_time(0.0) == pytest.approx(0.020)


def test_bounded_queue_refuses_with_overloaded() -> None:
    s: BatchScheduler[int, int] = BatchScheduler(BatchConfig(max_queue=2))
    s.submit(job(1, 0.0))
    s.submit(job(2, 0.0))
    with pytest.raises(Overloaded):
        s.submit(job(3, 0.0))


def test_cancelled_jobs_are_skipped() -> None:
    s: BatchScheduler[int, int] = BatchScheduler(BatchConfig())
    j = job(1, 0.0)
    j.future.cancel()
    s.submit(j)
    s.submit(job(2, 0.0))
    assert [x.request for x in s.take(0.0)[0]] == [2]


class Doubler:
    """A fake executor: doubles each request, records the batches it saw, can be slowed down."""

    def __init__(self, version: str = "v1", delay: float = 0.0) -> None:
        self.version = version
        self.delay = delay
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def run(self, requests: Sequence[int]) -> list[int]:
        self.gate.wait()
        time.sleep(self.delay)
        self.batches.append(list(requests))
        return [r * 2 for r in requests]


def test_engine_answers_one_to_one_in_batches() -> None:
    ex = Doubler(delay=0.01)
    eng = BatchingEngine(ex, BatchConfig(max_batch_size=8, max_wait_ms=20)).start()
    futs = [eng.submit(i) for i in range(20)]
    assert [f.result(5) for f in futs] == [2 * i for i in range(20)]
    eng.stop()
    assert max(len(b) for b in ex.batches) == 8 and len(ex.batches) < 20
    assert sorted(x for b in ex.batches for x in b) == list(range(20))


def test_engine_overload_is_immediate_and_it_recovers() -> None:
    ex = Doubler()
    ex.gate.clear()  # the model is stuck: the queue fills up
    eng = BatchingEngine(ex, BatchConfig(max_batch_size=2, max_wait_ms=1, max_queue=4)).start()
    futs: list[Future[int]] = []
    t0 = time.monotonic()
    with pytest.raises(Overloaded):
        for i in range(20):
            futs.append(eng.submit(i, timeout_ms=10_000))
    assert time.monotonic() - t0 < 0.5
    assert eng.stats.rejected == 1
    ex.gate.set()
    assert [f.result(5) for f in futs] == [2 * i for i in range(len(futs))]
    assert eng.submit(100).result(5) == 200  # recovered
    eng.stop()


def test_requests_whose_deadline_passed_in_the_queue_fail_fast() -> None:
    ex = Doubler()
    ex.gate.clear()
    eng = BatchingEngine(ex, BatchConfig(max_batch_size=1, max_wait_ms=0)).start()
    first = eng.submit(1, timeout_ms=10_000)
    time.sleep(0.05)  # `first` is running (blocked); the next one waits in the queue
    late = eng.submit(2, timeout_ms=20)
    time.sleep(0.1)
    ex.gate.set()
    assert first.result(5) == 2
    with pytest.raises(DeadlineExceeded):
        late.result(5)
    assert eng.stats.expired == 1
    eng.stop()


def test_executor_failure_fails_that_batch_only() -> None:
    class Flaky(Doubler):
        def run(self, requests: Sequence[int]) -> list[int]:
            if 13 in requests:
                raise ValueError("bad batch")
            return super().run(requests)

    eng = BatchingEngine(Flaky(), BatchConfig(max_batch_size=1, max_wait_ms=0)).start()
    bad = eng.submit(13)
    with pytest.raises(ValueError):
        bad.result(5)
    assert eng.submit(4).result(5) == 8
    eng.stop()


def test_swap_executor_between_batches_drops_nothing() -> None:
    old, new = Doubler("v1", delay=0.002), Doubler("v2", delay=0.002)
    eng = BatchingEngine(old, BatchConfig(max_batch_size=4, max_wait_ms=1)).start()
    futs = []
    for i in range(200):
        futs.append(eng.submit(i, timeout_ms=10_000))
        if i == 100:
            eng.swap_executor(new)
        time.sleep(0.0005)
    assert [f.result(10) for f in futs] == [2 * i for i in range(200)]
    assert old.batches and new.batches
    seen_old = {x for b in old.batches for x in b}
    seen_new = {x for b in new.batches for x in b}
    assert seen_old.isdisjoint(seen_new) and seen_old | seen_new == set(range(200))
    assert eng.version == "v2"
    eng.stop()


def test_stop_answers_what_was_accepted_then_refuses() -> None:
    eng = BatchingEngine(Doubler(delay=0.01), BatchConfig(max_batch_size=2, max_wait_ms=50)).start()
    futs = [eng.submit(i) for i in range(5)]
    eng.stop()
    assert [f.result(1) for f in futs] == [0, 2, 4, 6, 8]
    with pytest.raises(EngineStopped):
        eng.submit(1)
