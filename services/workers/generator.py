"""The generator worker (``livecopy worker generator``): pre-generates copy on product views.

Each ``product_view`` on ``livecopy.events`` makes the copies of the shopper's likely next
impressions (the viewed product and ``generator.related`` same-category ones) through the same copy
flow as ``GET /v1/copy``; each copy is published once to ``livecopy.copy``, then cached (``SET NX``).
It runs on the one consume loop (``stream.kafka_io.BatchLoop``) as an ``AsyncProcessor``: views go to
a thread pool and an offset is committed only once every copy of its record is acknowledged and
cached. Why each step is ordered as it is: docs/generation.md.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import redis
from confluent_kafka import Consumer, Producer

from core.catalog import Catalog, Product
from core.contracts import Event, EventType, GeneratedCopy
from core.metrics import WorkerMetrics
from core.settings import GeneratorSettings, Settings
from core.wire import Record, Rejection, Topics, decode_event
from engine.batching import Overloaded
from engine.executor import CopyRequest, CopyResult
from engine.serving import CopyEngine
from services.copyflow import CopyFlow
from stream.copy_store import CopyKeys, CopyPublisher, PublishBacklog, ensure_catalog, read_catalog
from stream.kafka_io import (
    TP,
    BatchLoop,
    NullMetrics,
    OffsetTracker,
    Outcome,
    consumer_config,
    producer_config,
)
from stream.model_updates import ModelUpdateFollower
from stream.profile.store import ProfileKeys, RedisProfileStore
from stream.redis_io import TRANSIENT_REDIS_ERRORS, redis_client
from stream.responses.store import RedisResponseStore

log = logging.getLogger(__name__)

GROUP = "generator"


def plan_products(viewed: Product, catalog: Catalog, recent: Sequence[str], related: int) -> list[Product]:
    """The viewed product, then up to ``related`` same-category products the user has not seen
    recently, best reviewed first (what a PDP's "you may also like" would show next)."""
    skip = {viewed.product_id, *recent}
    same = [p for p in catalog.in_category(viewed.category) if p.product_id not in skip]
    same.sort(key=lambda p: (-(p.reviews * p.rating), p.product_id))
    return [viewed, *same[:max(0, related)]]


class Stopping(Exception):
    pass


class Pregenerator:
    """One product view -> cached and published copies (runs on a pool thread; blocking is fine)."""

    def __init__(self, settings: Settings, engine: CopyEngine, client: redis.Redis, publisher: CopyPublisher,
                 catalog: Callable[[], Catalog], stop: threading.Event, metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.cfg: GeneratorSettings = settings.generator
        self.engine = engine
        self.client = client
        self.publisher = publisher
        self.catalog = catalog
        self.stop = stop
        self.metrics = metrics
        self.flow = CopyFlow(settings)
        self.pkeys = ProfileKeys(settings.redis.key_prefix)
        self.profiles = RedisProfileStore(client, settings.profile, settings.redis.key_prefix)
        self.responses = RedisResponseStore(client, settings.responses, settings.redis.key_prefix)

    def _count(self, outcome: str, n: int = 1) -> None:
        if self.metrics:
            self.metrics.count(outcome, n)

    def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        delay = 0.05
        while True:
            try:
                return fn()
            except TRANSIENT_REDIS_ERRORS as exc:
                if self.stop.is_set():
                    raise Stopping from exc
                log.warning("%s failed (%s); retrying in %.2f s", what, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _publish(self, copy: GeneratedCopy, body: bytes) -> Future[None] | None:
        """The ack's Future, or None when the producer's local queue is full (retried by the caller)."""
        try:
            return self.publisher.publish(copy, body)
        except PublishBacklog:
            return None

    @staticmethod
    def _acked(fut: Future[None] | None) -> bool:
        try:
            if fut is not None:
                fut.result(60)
                return True
        except Exception:  # not delivered (logged and counted by the publisher): published again
            pass
        return False

    def _wait_profile(self, ev: Event) -> None:
        seen_key = self.pkeys.of(ev.user_id)[2]
        deadline = time.monotonic() + self.cfg.profile_wait_ms / 1000.0
        while self._retry("profile check", lambda: self.client.zscore(seen_key, ev.event_id)) is None:
            if time.monotonic() >= deadline or self.stop.is_set():
                return
            time.sleep(0.02)

    def _submit(self, req: CopyRequest) -> Future[CopyResult]:
        delay = 0.02
        while True:
            try:
                return self.engine.submit(req, timeout_ms=120_000.0)
            except Overloaded:  # the API has priority over pre-generation: wait for room
                if self.stop.is_set():
                    raise Stopping from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def handle(self, ev: Event) -> int:
        """Pre-generate for one product view; returns the number of copies made."""
        cat = self.catalog()
        viewed = cat.get(ev.product_id or "")
        if viewed is None:
            self._count("unknown_product")
            return 0
        self._wait_profile(ev)
        state = self._retry("profile load", lambda: self.profiles.load(ev.user_id))
        profile = self.flow.profile(ev.user_id, state)
        products = plan_products(viewed, cat, profile.recent_products if profile else [], self.cfg.related)
        version = self.engine.version
        slot = self.cfg.slot
        keys = [self.flow.key(ev.user_id, p.product_id, slot, state, version) for p in products]

        def exists() -> list[Any]:
            with self.client.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.exists(k)
                return pipe.execute()

        have = self._retry("cache check", exists)
        todo = [p for p, e in zip(products, have, strict=True) if not e]
        self._count("already_cached", len(products) - len(todo))
        if not todo:
            return 0
        response = (self._retry("style response load", lambda: self.responses.load(ev.user_id))
                    if self.flow.uses_style_response else None)
        reqs = [self.flow.request(ev.user_id, p, state, profile, slot, response, cat.get) for p in todo]
        futs = [self._submit(r) for r in reqs]
        copies = [self.flow.made(r, f.result(), slot) for r, f in zip(reqs, futs, strict=True)]
        pending = [(m.copy, m.key, m.body) for m in copies]
        made = len(pending)
        while pending:  # every copy acknowledged by the broker, then cached, before the record counts as done
            sent = [(item, self._publish(item[0], item[2])) for item in pending]  # all queued, then awaited
            acked = [(item, self._acked(f)) for item, f in sent]
            done = [(k, b) for (_c, k, b), ok in acked if ok]
            if done:
                self._retry("cache write", partial(self._cache, done))
            pending = [item for item, ok in acked if not ok]
            if pending:
                if self.stop.is_set():
                    raise Stopping  # not done: re-read after restart; only acknowledged copies were cached
                time.sleep(0.5)
        self._count("pregenerated", made)
        return made

    def _cache(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Cache acknowledged copies. ``NX``: a key written meanwhile (the API's copy for a miss, served
        already; or an earlier delivery of this record) is kept, so a served ``copy_id`` stays cached."""
        with self.client.pipeline(transaction=False) as pipe:
            for key, body in items:
                pipe.set(key, body, ex=self.settings.generation.cache_ttl_s, nx=True)
            written = pipe.execute()
        self._count("cache_kept_other", sum(1 for w in written if not w))


class PregenProcessor:
    """The generator's ``AsyncProcessor`` for the batch loop: product views go to a thread pool (the poll
    loop never waits for the model); everything else is skipped and counted, never sent to the DLQ (the
    profile worker does that already)."""

    def __init__(self, cfg: GeneratorSettings, pregen: Pregenerator, stop: threading.Event, *, threads: int,
                 metrics: WorkerMetrics | None, wall_ms: Callable[[], int]) -> None:
        self.cfg = cfg
        self.pregen = pregen
        self.stop = stop
        self.metrics = metrics
        self.wall_ms = wall_ms
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pregen")
        self._completed: queue.Queue[tuple[TP, int, int, int]] = queue.Queue()  # (tp, offset, weight, copies)
        self.inflight = 0  # copies (estimated) in flight
        self.records = 0
        self.copies = 0

    def process(self, records: Sequence[Record]) -> Outcome:
        pending = [r for r in records if self._dispatch(r)]
        self.records += len(records)
        return Outcome([], pending)

    def healthy(self) -> bool:
        return True

    def finished(self) -> list[tuple[TP, int]]:
        done: list[tuple[TP, int]] = []
        while True:
            try:
                tp, off, weight, made = self._completed.get_nowait()
            except queue.Empty:
                return done
            done.append((tp, off))
            self.inflight -= weight
            self.copies += made

    def in_flight(self) -> int:
        return self.inflight

    def drain(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _count(self, outcome: str) -> None:
        if self.metrics:
            self.metrics.count(outcome)

    def _dispatch(self, r: Record) -> bool:
        """Whether ``r`` went to the pool (its effects still under way)."""
        try:
            ev = decode_event(r.key, r.value)
        except Rejection:
            self._count("invalid")
            return False
        except Exception:  # a decoder bug: never fatal (the uncommitted record would crash-loop the worker)
            log.warning("record %s[%d]@%d could not be decoded; skipped as invalid", r.topic, r.partition, r.offset,
                        exc_info=True)
            self._count("invalid")
            return False
        if ev.type != EventType.PRODUCT_VIEW:
            self._count("not_a_view")
            return False
        if self.wall_ms() - ev.ts > self.cfg.max_event_age_s * 1000:
            self._count("stale")
            return False
        weight = 1 + max(0, self.cfg.related)
        self.inflight += weight
        self.pool.submit(self._task, ev, (r.topic, r.partition), r.offset, weight)
        return True

    def _task(self, ev: Event, tp: TP, off: int, weight: int) -> None:
        made = 0
        try:
            made = self.pregen.handle(ev)
        except Stopping:
            return  # not done: not committed, re-read after restart
        except Exception:
            log.exception("pre-generation for %s failed; skipped", ev.event_id)
            self._count("failed")
        self._completed.put((tp, off, weight, made))  # counted by the loop thread (pool threads would race)


class _NotOwnedOnly(NullMetrics):
    """The loop's own counts the generator reports: records left to a partition's new owner."""

    def __init__(self, metrics: WorkerMetrics | None) -> None:
        self.metrics = metrics

    def count(self, outcome: str, n: int = 1) -> None:
        if self.metrics:
            self.metrics.count(outcome, n)


class GeneratorWorker:
    """The generator worker: a ``BatchLoop`` over ``livecopy.events`` with a ``PregenProcessor``."""

    def __init__(self, settings: Settings, engine: CopyEngine, *, consumer: Consumer | None = None,
                 producer: Producer | None = None, client: redis.Redis | None = None,
                 metrics: WorkerMetrics | None = None, threads: int = 16,
                 wall_ms: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        self.settings = settings
        self.cfg = settings.generator
        self.engine = engine
        self.topics = Topics.from_settings(settings.topics)
        consumer = consumer or Consumer(consumer_config(settings.kafka, settings.worker.group_prefix + GROUP))
        producer = producer or Producer(producer_config(settings.kafka))
        self.client = client or redis_client(settings.redis)
        self.publisher = CopyPublisher(producer, self.topics.copy)
        self.keys = CopyKeys(settings.redis.key_prefix, settings.generation.catalog_key)
        self._catalog: Catalog | None = None
        self._catalog_at = 0.0
        self._catalog_lock = threading.Lock()
        self._stop = threading.Event()
        self.pregen = Pregenerator(settings, engine, self.client, self.publisher, self.catalog, self._stop, metrics)
        self.processor = PregenProcessor(self.cfg, self.pregen, self._stop, threads=threads, metrics=metrics,
                                         wall_ms=wall_ms)
        w = settings.worker
        self.loop = BatchLoop(
            consumer, producer, self.processor, topics=[self.topics.events], dlq_topic=self.topics.dlq,
            max_batch=w.max_batch, poll_timeout_s=w.poll_timeout_s, backoff_initial_s=w.retry_backoff_initial_s,
            backoff_max_s=w.retry_backoff_max_s, commit_interval_s=self.cfg.commit_interval_s,
            max_inflight=self.cfg.max_inflight, resume_below=self.cfg.resume_below, metrics=_NotOwnedOnly(metrics))
        self._publisher_closed = False
        self._on_assign = self.loop._on_assign
        self._on_revoke = self.loop._on_revoke

    # -- catalog ---------------------------------------------------------------------------------
    def catalog(self) -> Catalog:
        with self._catalog_lock:
            if self._catalog is None or time.monotonic() - self._catalog_at > 60.0:
                if self.settings.generation.load_catalog_if_empty:
                    ensure_catalog(self.client, self.keys)
                self._catalog = read_catalog(self.client, self.keys)
                self._catalog_at = time.monotonic()
            return self._catalog

    # -- the loop (BatchLoop's) -------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        self.loop.stop()

    def run(self) -> None:
        try:
            self.loop.run()
        finally:
            self._close_publisher()

    def step(self) -> None:
        self.loop.step()

    def close(self) -> None:
        try:
            self.loop.close()
        finally:
            self._close_publisher()

    def _close_publisher(self) -> None:
        if self._publisher_closed:
            return
        self._publisher_closed = True
        left = self.publisher.close()  # after the loop's close: it flushed the shared producer, then committed
        if left:
            log.error("%d copies not acknowledged at shutdown", left)

    @property
    def tracker(self) -> OffsetTracker:
        return self.loop.tracker

    @property
    def records(self) -> int:
        return self.processor.records

    @property
    def copies(self) -> int:
        return self.processor.copies


def run_generator_worker(settings: Settings, *, metrics_port: int | None = None,
                         engine: CopyEngine | None = None) -> None:
    from core.process import install_stop_signals, tune_gc_for_latency

    metrics = WorkerMetrics("generator")
    metrics.serve(metrics_port if metrics_port is not None else settings.worker.metrics_port)
    own = engine is None
    engine = (engine or CopyEngine.from_settings(settings)).start()
    follower = ModelUpdateFollower(settings, engine.model, engine.apply_update).start() \
        if settings.generation.hot_reload else None
    worker = GeneratorWorker(settings, engine, metrics=metrics)
    install_stop_signals(worker.stop)
    tune_gc_for_latency()
    log.info("generator worker consuming %s, model %s %s", worker.topics.events, engine.model, engine.version)
    try:
        worker.run()
    finally:
        if follower is not None:
            follower.stop()
        if own:
            engine.stop()
    log.info("generator worker stopped after %d records, %d copies", worker.records, worker.copies)
