"""Continuous (iteration-level) batching: requests join the running decode at the next step.

The static engine (:mod:`engine.batching`) runs a batch from prefill to its last EOS; a request
that arrives a step later waits for the whole batch, then for its own. :class:`ContinuousEngine`
runs vLLM's engine loop on one thread that owns the model. Each iteration:

1. **swap**: a new executor (hot reload) takes the admissions from now on; the rows already
   decoding finish on the old one, stepped beside the new batch (nothing dropped, no pause).
2. **admit**: queued requests whose deadline passed are answered ``DeadlineExceeded`` (even while
   the batch is full); then up to ``max_batch_size`` minus the running requests (at most
   ``admit_chunk`` per iteration, so that a burst's prefill does not stall the running rows for
   long) are taken, oldest first, prepared (prompt, bans, style tilt), prefilled and added to the
   running batch (``models.continuous.ContinuousDecoder``). While a CPU batch decodes, arrivals are
   prepared and prefilled on a prefill thread (the other core) and join at the first step after:
   the running rows do not wait for an arrival's prefill (a CUDA decoder prefills on the loop).
3. **step**: one token for every row of every running batch; a request whose ``K`` candidates all
   ended is finished (CTR head, filter, policy) on a second thread and answered at once.
   **Admission control**: a request is admitted only when :class:`StepCost` (a step's time as
   ``a + b * n`` over the ``n`` requests decoding, and the steps a request takes, both learned from
   the loop) says it finishes before its deadline in the batch it joins, without making a running
   request that would have finished in time miss; one that could not finish even alone is
   answered ``DeadlineExceeded`` at once; the others wait in the queue for the batch to shrink.
   Oldest first while the oldest fits; under overload, the request with the most time left first.
   Under overload on a CPU, admitting whatever had room made every decode slow and most miss
   their deadline (docs/generation.md).
4. **deadlines**: a running request past its deadline leaves the batch (a cancelled one too). Its
   ``DeadlineExceeded`` (503) was already sent by the deadline watchdog, a thread that answers
   every request at its deadline (polling the clock every 5 ms), whatever the loop is doing.

The queue is bounded (``max_queue``: ``Overloaded`` at once). Isolation as in the static engine:
a request that fails to prepare, to prefill or to finish fails alone; a step that fails (the whole
running batch) reruns its requests one by one on the executor's static path, so one request's
input cannot fail the others. ``timeout_ms`` is the deadline of the whole request (queue and
decode), not only of its start.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch

from engine.batching import (
    BatchConfig,
    BatchScheduler,
    DeadlineExceeded,
    EngineStats,
    EngineStopped,
    Job,
    Overloaded,
)

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")
Req_contra = TypeVar("Req_contra", contravariant=True)


class Decoder(Protocol):
    """A running batch (``models.continuous.ContinuousDecoder``)."""

    def admit(self, gids: Sequence[int], prompt_rows: Sequence[Sequence[int]], first_bias: torch.Tensor,
              ban: torch.Tensor) -> None: ...

    def step(self) -> list[Any]: ...  # FinishedGroup (gid, ...)

    def drop(self, gids: Sequence[int]) -> None: ...


class ContinuousExecutor(Protocol[Req_contra, Res]):
    """What the continuous engine needs of an executor (``engine.executor.StudentExecutor``)."""

    version: str

    def run(self, requests: Sequence[Req_contra]) -> list[Res]: ...

    def decoder(self, max_prompts: int) -> Decoder: ...

    def prepare(self, requests: Sequence[Req_contra]) -> tuple[list[Any], torch.Tensor, torch.Tensor]: ...

    def finish(self, items: Sequence[tuple[Req_contra, Any, Any]]) -> list[Res]: ...


@dataclass
class _Admission(Generic[Req, Res]):
    """A batch taken from the queue, prepared and prefilled on the prefill thread (installed when done):
    ``prefill`` gives (prepared, first-token bias, bans, the decoder's prefill)."""

    session: _Session[Req, Res]
    batch: list[Job[Req, Res]]
    prefill: Future[tuple[list[Any], torch.Tensor, torch.Tensor, Any]]


@dataclass
class _Running(Generic[Req, Res]):
    job: Job[Req, Res]
    prepared: Any
    steps: int = 0  # decode steps taken so far
    batch_sum: int = 0  # the requests decoding at each of those steps, summed


class StepCost:
    """What the loop has learned: a step's seconds as ``a + b * n`` over the ``n`` requests decoding
    (least squares with exponential forgetting) and the steps a request takes by the batch it
    decoded in (a moving average per power-of-two bucket of its mean batch: at small batches the
    steps are speculative and take a request through in about a third as many, so one average
    over both made the engine admit too many under overload after a calm spell). Pure: fed by the
    loop, asked at admission; ``None`` until it has seen enough."""

    def __init__(self, decay: float = 0.98, min_steps: int = 8) -> None:
        self.decay, self.min_steps = decay, min_steps
        self._w = self._n = self._t = self._nn = self._nt = 0.0
        self._seen = 0
        self._per: dict[int, tuple[float, float]] = {}  # batch bucket -> steps a request takes: mean, mean square

    def observe_step(self, n: int, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1.0
        self._n = d * self._n + n
        self._t = d * self._t + seconds
        self._nn = d * self._nn + n * n
        self._nt = d * self._nt + n * seconds
        self._seen += 1

    @staticmethod
    def _bucket(n: float) -> int:
        return max(0, math.ceil(math.log2(max(n, 1.0)) - 1e-9))

    def observe_request(self, steps: int, batch: float = 1.0) -> None:
        """A request finished after ``steps`` steps, ``batch`` requests decoding on average."""
        b = self._bucket(batch)
        m = self._per.get(b)
        x = float(steps)
        self._per[b] = (x, x * x) if m is None else (0.9 * m[0] + 0.1 * x, 0.9 * m[1] + 0.1 * x * x)

    def steps(self, n: int) -> float | None:
        """The steps a request takes with ``n`` decoding, its 90th percentile (mean + 1.28 sd): a
        request ends when its last candidate does, and admitting on the mean made half of them
        miss under overload. From the nearest batch bucket seen, the larger on a tie."""
        if not self._per:
            return None
        b = self._bucket(n)
        mean, sq = self._per[min(self._per, key=lambda k: (abs(k - b), -k))]
        return mean + 1.28 * math.sqrt(max(sq - mean * mean, 0.0))

    def step_s(self, n: int) -> float | None:
        """Expected seconds of a step with ``n`` requests decoding."""
        if self._seen < self.min_steps or self._n <= 0:
            return None
        mn, mt = self._n / self._w, self._t / self._w
        var = self._nn / self._w - mn * mn
        b = (self._nt / self._w - mn * mt) / var if var > 0.25 else -1.0
        a = mt - b * mn
        if b < 0 or a < 0:  # too little spread in n to separate the two: cost proportional to n
            a, b = 0.0, mt / mn
        return a + b * n

    def decode_s(self, n: int, done_steps: int = 0) -> float | None:
        """Expected seconds left for a request that took ``done_steps`` of its decode, ``n`` decoding."""
        per, step = self.steps(n), self.step_s(n)
        if per is None or step is None:
            return None
        return max(per - done_steps, 1.0) * step


@dataclass
class _Session(Generic[Req, Res]):
    """One running batch on one executor."""

    executor: ContinuousExecutor[Req, Res]
    decoder: Decoder
    jobs: dict[int, _Running[Req, Res]] = field(default_factory=dict)


class ContinuousEngine(Generic[Req, Res]):
    """Same interface as :class:`engine.batching.BatchingEngine` (submit, stop, swap_executor, stats)."""

    def __init__(
        self,
        executor: ContinuousExecutor[Req, Res],
        cfg: BatchConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_batch: Callable[[int, float, str], None] | None = None,
        on_step: Callable[[], None] | None = None,
        admit_chunk: int = 8,
        finish_in_thread: bool = True,
        prefill_in_thread: bool = True,
    ) -> None:
        self.cfg = cfg or BatchConfig()
        self.scheduler: BatchScheduler[Req, Res] = BatchScheduler(self.cfg)
        self.executor = executor
        self._next_executor: ContinuousExecutor[Req, Res] | None = None
        self._next_decoder: Decoder | None = None
        self.clock = clock
        self.on_batch = on_batch
        self.on_step = on_step  # after every step (tests: a fake clock)
        # prompts prefilled per iteration at most: a burst is admitted over a few steps, so one
        # iteration (prefill + step) stays short and deadlines are checked often (vLLM's prefill budget)
        self.admit_chunk = admit_chunk
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sessions: list[_Session[Req, Res]] = []  # the last one takes admissions when on self.executor
        # the deadline watchdog: answers DeadlineExceeded at the deadline itself, even in the middle of a step
        # (the loop then drops the request's rows at the next step); polls the clock every watch_interval_s
        self.watch_interval_s = 0.005
        self._deadline_heap: list[tuple[float, int, Job[Req, Res]]] = []
        self._heap_lock = threading.Lock()
        self._seq = itertools.count()
        self._running_ids: set[int] = set()
        self._watcher: threading.Thread | None = None
        # finishing a request (candidates' text, CTR head, filter, policy: ~10 ms of mostly Python) runs on
        # a second thread, so the decode loop does not stall for it (the other core of a CPU host)
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="continuous-finish") if finish_in_thread else None
        # prompts that arrive while a batch decodes are prepared and prefilled on a third thread (a decoder whose
        # ``prefill_concurrent``: a CPU one), and join at the first step after: the decode does not stop for them
        self._prefiller = ThreadPoolExecutor(1, thread_name_prefix="continuous-prefill") if prefill_in_thread else None
        self._admitting: list[_Admission[Req, Res]] = []
        self._gid = 0
        # admission control: a request is admitted only when it can finish before its deadline at the step
        # time the batch would then have, without making a running request miss its own; one that cannot
        # finish even alone is answered DeadlineExceeded at once (a doomed decode would slow the others)
        self.cost = StepCost()

    @property
    def version(self) -> str:
        return self.executor.version

    def _new_decoder(self, executor: ContinuousExecutor[Req, Res]) -> Decoder | None:
        """The running batch of ``executor``, made on the caller's thread (a compiled decode compiles its
        shapes here, not on a request's time); None when it cannot decode continuously or failed."""
        if not getattr(executor, "supports_continuous", True):
            return None
        try:
            return executor.decoder(self.cfg.max_batch_size)
        except Exception:
            log.exception("no decoder on %s (made at its first request)", executor.version)
            return None

    def start(self) -> ContinuousEngine[Req, Res]:
        if not self._sessions:
            decoder = self._new_decoder(self.executor)
            if decoder is not None:
                self._sessions.append(_Session(self.executor, decoder))
        self._thread = threading.Thread(target=self._loop, name="continuous-engine", daemon=True)
        self._thread.start()
        self._watcher = threading.Thread(target=self._watch, name="continuous-engine-deadlines", daemon=True)
        self._watcher.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the queue drains and the running requests finish (accepted ones are answered)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout)
        if self._watcher:
            self._watcher.join(timeout)

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
        with self._heap_lock:
            heapq.heappush(self._deadline_heap, (job.deadline, next(self._seq), job))
            if len(self._deadline_heap) > 4 * self.cfg.max_queue + 4 * self.cfg.max_batch_size + 64:
                self._deadline_heap = [e for e in self._deadline_heap if not e[2].future.done()]
                heapq.heapify(self._deadline_heap)
        return job.future

    def _watch(self) -> None:
        while True:
            time.sleep(self.watch_interval_s)
            stopped = self._stopping and (self._thread is None or not self._thread.is_alive())
            now = self.clock()
            late: list[Job[Req, Res]] = []
            with self._heap_lock:
                while self._deadline_heap and self._deadline_heap[0][0] <= now:
                    late.append(heapq.heappop(self._deadline_heap)[2])
            for job in late:
                where = "during generation" if id(job) in self._running_ids else "while queued"
                if self._reject(job, DeadlineExceeded(f"deadline passed {where}")):
                    self.stats.expired += 1
            if stopped:
                return

    def queue_depth(self) -> int:
        return len(self.scheduler.queue)

    def running(self) -> int:
        """Requests decoding now."""
        return sum(len(s.jobs) for s in self._sessions)

    def swap_executor(self, executor: ContinuousExecutor[Req, Res]) -> None:
        """Admit on ``executor`` from the next step on; rows already decoding finish on the old one."""
        decoder = self._new_decoder(executor)
        with self._cond:
            self._next_executor, self._next_decoder = executor, decoder
            self._cond.notify()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                now = self.clock()
                expired: list[Job[Req, Res]] = []
                while True:
                    if self._next_executor is not None:
                        old, self.executor, self._next_executor = self.executor, self._next_executor, None
                        if self._next_decoder is not None:
                            self._sessions.append(_Session(self.executor, self._next_decoder))
                            self._next_decoder = None
                        log.info("now admitting on %s (was %s)", self.executor.version, old.version)
                    running = self.running()
                    admitting = sum(len(a.batch) for a in self._admitting)
                    room = min(self.cfg.max_batch_size - running - admitting, self.admit_chunk - admitting)
                    batch: list[Job[Req, Res]] = []
                    shed: list[Job[Req, Res]] = []
                    if self.scheduler.queue:
                        expired += self._expire_queued(now)
                    if room > 0 and self.scheduler.queue:
                        batch, gone, shed = self._take(room, now)
                        expired += gone
                    if batch or expired or shed or running or admitting:
                        break
                    if self._stopping and not self.scheduler.queue:
                        if self._finisher is not None:
                            self._finisher.shutdown(wait=True)  # every finished request answered
                        if self._prefiller is not None:
                            self._prefiller.shutdown(wait=False)
                        return
                    wait = self.scheduler.wait_time(now)
                    self._cond.wait(timeout=None if wait is None else max(wait, 0.001))
                    now = self.clock()
                executor = self.executor
            for job in expired:
                if self._reject(job, DeadlineExceeded("deadline passed while queued")):
                    self.stats.expired += 1
            for job in shed:
                if self._reject(job, DeadlineExceeded("cannot finish before its deadline")):
                    self.stats.expired += 1
                    self.stats.shed += 1
            began = self.clock()
            if batch:
                self._admit(executor, batch)
                self._deadlines(self.clock())
            if self._admitting:  # nothing decoding: wait for the prefill (else take what is ready)
                self._install(wait=not self.running())
            stepping = self.running()
            for session in list(self._sessions):
                self._step(session)
            if stepping:  # the iteration's time, prefills included, over the requests it stepped
                self.cost.observe_step(stepping, self.clock() - began)
            self._deadlines(self.clock())
            self._sessions = [s for s in self._sessions if s.jobs or any(a.session is s for a in self._admitting)
                              or (s is self._sessions[-1] and s.executor is self.executor)]
            if self.on_step:
                self.on_step()

    def _expire_queued(self, now: float) -> list[Job[Req, Res]]:
        """Queued jobs past their deadline (or cancelled) leave the queue, even while the batch is full."""
        q = self.scheduler.queue
        if not any(j.deadline <= now or j.future.done() for j in q):
            return []
        gone = [j for j in q if j.deadline <= now and not j.future.done()]
        live = [j for j in q if j.deadline > now and not j.future.done()]
        q.clear()
        q.extend(live)
        return gone

    def _take(self, room: int, now: float) -> tuple[list[Job[Req, Res]], list[Job[Req, Res]], list[Job[Req, Res]]]:
        """Split the queue into (admit now, expired, shed); the rest stay queued, in order. A job is
        admitted (up to ``room``) when its decode fits before its deadline at the step time of the
        batch it would join and no request decoding (or admitted just before it) that would have
        finished in time would then miss; a job that would not finish even decoding alone is shed.
        Oldest first while the oldest fits; when it does not (overload), the job with the most time
        left goes first and the oldest waits for the batch to shrink. Admitting the oldest that
        still fit kept the batch small and its requests short of slack: most of them missed."""
        q = self.scheduler.queue
        alone = self.cost.decode_s(1)
        live: list[Job[Req, Res]] = []
        expired: list[Job[Req, Res]] = []
        shed: list[Job[Req, Res]] = []
        for job in q:
            if job.future.done():  # cancelled, or answered by the deadline watchdog
                continue
            if job.deadline <= now:
                expired.append(job)
            elif alone is not None and now + alone > job.deadline:
                shed.append(job)
            else:
                live.append(job)
        q.clear()
        if alone is None:  # nothing learned yet: oldest first, as many as there is room for
            q.extend(live[room:])
            return live[:room], expired, shed
        running = [(r.job.deadline, r.steps) for s in self._sessions for r in s.jobs.values()]
        running += [(j.deadline, 0) for a in self._admitting for j in a.batch]
        admit: list[Job[Req, Res]] = []
        while live and len(admit) < room:
            m = len(running) + 1
            if self._would_miss(running, m - 1, m, now):
                break  # no job can join before the batch shrinks
            mine = self.cost.decode_s(m)
            fits_by = now if mine is None else now + mine
            i = 0 if live[0].deadline >= fits_by else max(range(len(live)), key=lambda j: live[j].deadline)
            if live[i].deadline < fits_by:
                break  # none fits this batch
            job = live.pop(i)
            admit.append(job)
            running.append((job.deadline, 0))
        q.extend(live)
        return admit, expired, shed

    def _would_miss(self, running: list[tuple[float, int]], n: int, m: int, now: float) -> bool:
        """Whether a request decoding (deadline, steps taken) that finishes in time at ``n`` decoding
        would miss at ``m``."""
        for deadline, steps in running:
            before, after = self.cost.decode_s(n, steps), self.cost.decode_s(m, steps)
            if before is not None and after is not None and now + before <= deadline < now + after:
                return True
        return False

    def _session(self, executor: ContinuousExecutor[Req, Res]) -> _Session[Req, Res]:
        if not self._sessions or self._sessions[-1].executor is not executor:
            self._sessions.append(_Session(executor, executor.decoder(self.cfg.max_batch_size)))
        return self._sessions[-1]

    def _admit(self, executor: ContinuousExecutor[Req, Res], batch: list[Job[Req, Res]]) -> None:
        if not getattr(executor, "supports_continuous", True):  # e.g. a non-GPT-2 model hot-swapped in
            try:
                results = executor.run([j.request for j in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"executor returned {len(results)} results for {len(batch)} requests")
            except Exception:
                for job in batch:
                    self._run_alone(executor, job)
                return
            for job, res in zip(batch, results, strict=True):
                if self._resolve(job, res):
                    self.stats.requests += 1
            return
        try:
            session = self._session(executor)
        except Exception as exc:
            log.exception("no decoder on %s", executor.version)
            for job in batch:
                self._fail(job, exc)
            return
        try:
            self._admit_into(session, batch)
        except Exception as exc:
            self._start_alone(session, batch, exc)

    def _start_alone(self, session: _Session[Req, Res], batch: list[Job[Req, Res]], exc: Exception) -> None:
        """``batch`` failed to start (prepare, prefill or join) with ``exc``: its requests start again one
        at a time on this thread, so a request that fails, fails alone."""
        version = session.executor.version
        if len(batch) == 1:
            log.error("request failed to start on %s", version, exc_info=exc)
            self._fail(batch[0], exc)
            return
        log.warning("admitting %d requests failed on %s (%s: %s); admitting them one by one", len(batch),
                    version, type(exc).__name__, exc)
        self.stats.failed_batches += 1
        for job in batch:
            try:
                self._join(session, [job], *session.executor.prepare([job.request]))
            except Exception as one:
                log.error("request failed to start on %s", version, exc_info=one)
                self._fail(job, one)

    def _admit_into(self, session: _Session[Req, Res], batch: list[Job[Req, Res]]) -> None:
        concurrent = getattr(session.decoder, "prefill_concurrent", False)  # prefill() safe beside step()
        if self._prefiller is not None and concurrent and (self.running() or self._admitting):
            fut = self._prefiller.submit(self._prepare_prefill, session, [j.request for j in batch])
            self._admitting.append(_Admission(session, batch, fut))
            return
        self._join(session, batch, *session.executor.prepare([j.request for j in batch]))

    @staticmethod
    def _prepare_prefill(session: _Session[Req, Res], requests: list[Req]
                         ) -> tuple[list[Any], torch.Tensor, torch.Tensor, Any]:
        """(On the prefill thread) what :meth:`_join` needs, the decoder's prefill included."""
        prepared, first, ban = session.executor.prepare(requests)
        prefill: Any = getattr(session.decoder, "prefill")  # noqa: B009 (not in the Decoder protocol)
        return prepared, first, ban, prefill([p.ids for p in prepared])

    def _join(self, session: _Session[Req, Res], batch: list[Job[Req, Res]], prepared: list[Any],
              first: torch.Tensor, ban: torch.Tensor, prefilled: Any = None) -> None:
        gids = list(range(self._gid, self._gid + len(batch)))
        if prefilled is None:
            session.decoder.admit(gids, [p.ids for p in prepared], first, ban)
        else:  # a decoder with prefill() (models.continuous.ContinuousDecoder) admits what it prefilled
            admit: Any = session.decoder.admit
            admit(gids, [p.ids for p in prepared], first, ban, prefilled=prefilled)
        self._gid += len(batch)
        for gid, job, p in zip(gids, batch, prepared, strict=True):
            session.jobs[gid] = _Running(job, p)
            self._running_ids.add(id(job))

    def _install(self, wait: bool) -> None:
        """Batches whose prefill is done join their decoder, in the order they were taken (``wait``: for
        the first one, up to 50 ms). A batch that fails to prepare, to prefill or to join is admitted
        again one request at a time, on this thread: a request that fails, fails alone."""
        if wait:
            wait_futures([a.prefill for a in self._admitting], timeout=0.05, return_when=FIRST_COMPLETED)
        joined = False
        while self._admitting and self._admitting[0].prefill.done():
            a = self._admitting.pop(0)
            joined = True
            try:
                prepared, first, ban, prefilled = a.prefill.result()
                self._join(a.session, a.batch, prepared, first, ban, prefilled=prefilled)
            except Exception as exc:
                self._start_alone(a.session, a.batch, exc)
        if joined:  # a newcomer past its deadline leaves before its first step
            self._deadlines(self.clock())

    def _step(self, session: _Session[Req, Res]) -> None:
        if not session.jobs:
            return
        started = self.clock()
        n = len(session.jobs)
        try:
            finished = session.decoder.step()
        except Exception as exc:
            # the running batch is lost: its requests run again one by one on the static path
            self.stats.failed_batches += 1
            log.warning("a step of %d requests failed on %s (%s: %s); running them one by one", n,
                        session.executor.version, type(exc).__name__, exc)
            jobs = [r.job for r in session.jobs.values()]
            session.jobs.clear()
            self._running_ids.difference_update(id(j) for j in jobs)
            if session in self._sessions:
                self._sessions.remove(session)
            for job in jobs:
                self._run_alone(session.executor, job)
            return
        self.stats.batches += 1
        self.stats.batch_sizes.append(n)
        for r in session.jobs.values():
            r.steps += 1
            r.batch_sum += n
        done = [(session.jobs.pop(g.gid), g) for g in finished if g.gid in session.jobs]
        for r, _ in done:
            self._running_ids.discard(id(r.job))
            self.cost.observe_request(r.steps, r.batch_sum / r.steps)
        if done and self._finisher is not None:
            self._finisher.submit(self._finish, session.executor, done)
        elif done:
            self._finish(session.executor, done)
        if self.on_batch:
            self.on_batch(n, self.clock() - started, session.executor.version)

    def _finish(self, executor: ContinuousExecutor[Req, Res], done: list[tuple[_Running[Req, Res], Any]]) -> None:
        try:
            results = executor.finish([(r.job.request, r.prepared, g) for r, g in done])
            if len(results) != len(done):
                raise RuntimeError(f"executor finished {len(results)} of {len(done)} requests")
        except Exception as exc:
            if len(done) == 1:
                log.exception("request failed on %s", executor.version)
                self._fail(done[0][0].job, exc)
                return
            for item in done:
                self._finish(executor, [item])
            return
        for (r, _), res in zip(done, results, strict=True):
            if self._resolve(r.job, res):
                self.stats.requests += 1

    def _run_alone(self, executor: ContinuousExecutor[Req, Res], job: Job[Req, Res]) -> None:
        if job.future.done():
            return
        try:
            res = executor.run([job.request])
            if len(res) != 1:
                raise RuntimeError(f"executor returned {len(res)} results for 1 request")
        except Exception as exc:
            log.exception("request failed on %s", executor.version)
            self._fail(job, exc)
            return
        if self._resolve(job, res[0]):
            self.stats.requests += 1

    def _deadlines(self, now: float) -> None:
        for session in self._sessions:
            late = [g for g, r in session.jobs.items() if r.job.deadline <= now or r.job.future.done()]
            if not late:
                continue
            session.decoder.drop(late)
            for g in late:
                job = session.jobs.pop(g).job
                self._running_ids.discard(id(job))
                if self._reject(job, DeadlineExceeded("deadline passed during generation")):
                    self.stats.expired += 1

    @staticmethod
    def _resolve(job: Job[Req, Res], result: Res) -> bool:
        """Answer ``job`` (False when it was answered already: cancelled, or its deadline passed)."""
        try:
            job.future.set_result(result)
        except InvalidStateError:
            return False
        return True

    @staticmethod
    def _reject(job: Job[Req, Res], exc: BaseException) -> bool:
        try:
            job.future.set_exception(exc)
        except InvalidStateError:
            return False
        return True

    def _fail(self, job: Job[Req, Res], exc: BaseException) -> None:
        self._reject(job, exc)
