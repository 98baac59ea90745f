"""Micro-batching: requests queue, a scheduler forms batches, an executor runs them.

The knobs are Triton's / Ray Serve's: `max_batch_size` and `max_wait_ms` (how long the oldest
request may wait for company). The queue is bounded (`max_queue`): a full queue refuses at once
with `Overloaded` (the API turns it into 503), so memory stays bounded and callers learn quickly.
Each request has a deadline; one that expired while queued is failed with `DeadlineExceeded`
instead of wasting a batch slot.

`BatchScheduler` is the pure part (queue, dispatch decision, expiry) driven by an injected clock,
so it is tested without threads or a model. `BatchingEngine` runs it on one thread that owns
the executor (the model), hands results back through `concurrent.futures.Future`s (await them
from asyncio with `asyncio.wrap_future`), and swaps executors between batches for hot reload.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Req_contra = TypeVar("Req_contra", contravariant=True)
Res = TypeVar("Res")


class Overloaded(Exception):
    """The queue is full; retry later (HTTP 503)."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before it could run."""


class EngineStopped(Exception):
    pass


class Executor(Protocol[Req_contra, Res]):
    """Runs one batch; returns one result per request, in order."""

    version: str

    def run(self, requests: Sequence[Req_contra]) -> list[Res]: ...


@dataclass
class Job(Generic[Req, Res]):
    request: Req
    enqueued: float
    deadline: float
    future: Future[Res] = field(default_factory=Future)


@dataclass
class BatchConfig:
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 512
    default_timeout_ms: float = 1000.0


class BatchScheduler(Generic[Req, Res]):
    """Queue + dispatch policy, no threads: everything is a function of the queue and `now`."""

    def __init__(self, cfg: BatchConfig) -> None:
        self.cfg = cfg
        self.queue: deque[Job[Req, Res]] = deque()

    def submit(self, job: Job[Req, Res]) -> None:
        if len(self.queue) >= self.cfg.max_queue:
            raise Overloaded(f"queue full ({self.cfg.max_queue} waiting)")
        self.queue.append(job)

    def wait_time(self, now: float) -> float | None:
        """Seconds until a batch should be dispatched (0: now); None when the queue is empty."""
        if not self.queue:
            return None
        if len(self.queue) >= self.cfg.max_batch_size:
            return 0.0
        due = self.queue[0].enqueued + self.cfg.max_wait_ms / 1000.0
        earliest_deadline = min(j.deadline for j in self.queue)
        return max(0.0, min(due, earliest_deadline) - now)

    def take(self, now: float) -> tuple[list[Job[Req, Res]], list[Job[Req, Res]]]:
        """(batch to run, expired jobs to fail): up to max_batch_size live jobs, oldest first."""
        batch: list[Job[Req, Res]] = []
        expired: list[Job[Req, Res]] = []
        while self.queue and len(batch) < self.cfg.max_batch_size:
            job = self.queue.popleft()
            if job.future.cancelled():
                continue
            (expired if job.deadline <= now else batch).append(job)
        return batch, expired


@dataclass
class EngineStats:
    batches: int = 0
    requests: int = 0
    expired: int = 0
    rejected: int = 0
    shed: int = 0  # continuous: refused at admission, could not finish before its deadline (also in expired)
    failed_batches: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))


class BatchingEngine(Generic[Req, Res]):
    def __init__(
        self,
        executor: Executor[Req, Res],
        cfg: BatchConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_batch: Callable[[int, float, str], None] | None = None,
    ) -> None:
        self.cfg = cfg or BatchConfig()
        self.scheduler: BatchScheduler[Req, Res] = BatchScheduler(self.cfg)
        self.executor = executor
        self._next_executor: Executor[Req, Res] | None = None
        self.clock = clock
        self.on_batch = on_batch
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def version(self) -> str:
        return self.executor.version

    def start(self) -> BatchingEngine[Req, Res]:
        self._thread = threading.Thread(target=self._loop, name="batching-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the queue drains (requests already accepted are still answered)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout)

    def submit(self, request: Req, timeout_ms: float | None = None) -> Future[Res]:
        now = self.clock()
        t = self.cfg.default_timeout_ms if timeout_ms is None else timeout_ms
        job: Job[Req, Res] = Job(request, now, now + t / 1000.0)
        with self._cond:
            if self._stopping:
                raise EngineStopped("engine is stopping")
            try:
                self.scheduler.submit(job)
            except Overloaded:
                self.stats.rejected += 1
                raise
            self._cond.notify()
        return job.future

    def queue_depth(self) -> int:
        return len(self.scheduler.queue)

    def swap_executor(self, executor: Executor[Req, Res]) -> None:
        """Use `executor` from the next batch on; the batch in flight finishes on the old one."""
        with self._cond:
            self._next_executor = executor
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._next_executor is not None:
                        old, self.executor, self._next_executor = self.executor, self._next_executor, None
                        log.info("now serving %s (was %s)", self.executor.version, old.version)
                    wait = self.scheduler.wait_time(self.clock())
                    if wait is None and self._stopping:
                        return
                    if wait == 0.0:
                        break
                    self._cond.wait(timeout=wait)
                batch, expired = self.scheduler.take(self.clock())
                executor = self.executor
            for job in expired:
                self.stats.expired += 1
                job.future.set_exception(DeadlineExceeded("deadline passed while queued"))
            if batch:
                self._run(executor, batch)

    def _run(self, executor: Executor[Req, Res], batch: list[Job[Req, Res]]) -> None:
        started = self.clock()
        try:
            results = executor.run([j.request for j in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"executor returned {len(results)} results for {len(batch)} requests")
        except Exception as exc:
            self.stats.failed_batches += 1
            if len(batch) == 1:
                log.exception("request failed on %s", executor.version)
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
                return
            # Isolation: one request's input must not fail the others of its batch. Each runs again alone
            # (a request that fails alone is answered with its own error; the others get their copies).
            log.warning("batch of %d failed on %s (%s: %s); running its requests one by one", len(batch),
                        executor.version, type(exc).__name__, exc)
            for job in batch:
                if not job.future.done():
                    self._run(executor, [job])
            return
        for job, res in zip(batch, results, strict=True):
            if not job.future.done():  # a caller may have cancelled
                job.future.set_result(res)
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.batch_sizes.append(len(batch))
        if self.on_batch:
            self.on_batch(len(batch), self.clock() - started, executor.version)
