"""The generator worker (``livecopy worker generator``): pre-generates copy on product views.

For every ``product_view`` on ``livecopy.events`` it generates, with the same
:class:`engine.serving.CopyEngine` and the same cache keys as ``GET /v1/copy``, the copies of the
user's likely next impressions -- the viewed product and ``generator.related`` same-category
products (``plan_products``) -- for the profile version that includes the view, writes them
to the Redis copy cache and publishes each once to ``livecopy.copy``. A later ``GET /v1/copy``
for one of them is then a cache hit.

The poll loop never waits for the model: it decodes records and hands product views to a thread
pool; tasks queue requests on the engine (which micro-batches them) and report back through a
queue. Offsets are committed per partition only up to the first record whose effects (broker
ack of the copies, then their cache write) are not done yet (``OffsetTracker``), so a crash
re-generates at most what was in flight (cache keys that exist are skipped). A copy is written to
the cache only after the broker acknowledged its record, with ``SET NX``: a cached copy is always
a published one (the feedback joiner needs every served copy on ``livecopy.copy``), so skipping an
existing key on re-delivery is safe, and a copy the API cached for the same key meanwhile (served
already) is kept. A crash between the ack and the cache write leaves a published copy nobody
serves (harmless: the joiner only joins impressions) and the re-delivered record makes a new one.
When more than ``generator.max_inflight`` copies are in flight the loop pauses its partitions
(still polling, so it keeps its group membership) and resumes below ``generator.resume_below``.
Only partitions this member owns are tracked and committed: a record that consume() returned after
the rebalance it served took its partition away is left to the new owner (committing it would
rewind the new owner's offset).

Invalid events are skipped and counted (the profile worker already sends them to the DLQ; a
second DLQ copy would double-count them), also when the decoder fails with something other than a
``Rejection`` (a bug must not crash-loop the worker on one record); so are views older than
``generator.max_event_age_s``.
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
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from core.catalog import Catalog, Product
from core.contracts import Event, EventType, GeneratedCopy
from core.metrics import WorkerMetrics
from core.settings import GeneratorSettings, Settings
from core.wire import Rejection, Topics, decode_event
from engine.batching import Overloaded
from engine.executor import CopyRequest, CopyResult
from engine.serving import CopyEngine
from models.text.context import context_from_profile
from stream.copy_store import CopyKeys, CopyPublisher, PublishBacklog, encode_copy, ensure_catalog, read_catalog
from stream.kafka_io import consumer_config, producer_config
from stream.model_updates import ModelUpdateFollower
from stream.profile.logic import render
from stream.profile.store import ProfileKeys, RedisProfileStore
from stream.redis_io import TRANSIENT_REDIS_ERRORS, redis_client
from stream.responses.store import RedisResponseStore

log = logging.getLogger(__name__)

GROUP = "generator"
TP = tuple[str, int]


class OffsetTracker:
    """Which offsets may be committed while records finish out of order (pure).

    ``add`` each consumed record, ``done`` when its effects are acknowledged; ``committable``
    gives, per partition, the offset after the longest finished prefix."""

    def __init__(self) -> None:
        self._inflight: dict[TP, set[int]] = {}
        self._next: dict[TP, int] = {}

    def add(self, tp: TP, offset: int) -> None:
        self._inflight.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def done(self, tp: TP, offset: int) -> None:
        s = self._inflight.get(tp)
        if s is not None:
            s.discard(offset)

    def drop(self, tps: Sequence[TP]) -> None:
        for tp in tps:
            self._inflight.pop(tp, None)
            self._next.pop(tp, None)

    def committable(self) -> dict[TP, int]:
        return {tp: (min(self._inflight[tp]) if self._inflight.get(tp) else nxt) for tp, nxt in self._next.items()}

    def pending(self) -> int:
        return sum(len(s) for s in self._inflight.values())


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
        self.keys = CopyKeys(settings.redis.key_prefix, settings.generation.catalog_key)
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
        pv = state.version if state is not None else 0
        profile = render(ev.user_id, state, self.settings.profile) if state is not None else None
        products = plan_products(viewed, cat, profile.recent_products if profile else [], self.cfg.related)
        version = self.engine.version
        slot = self.cfg.slot
        keys = [self.keys.copy(ev.user_id, p.product_id, slot, pv, version) for p in products]

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
                    if self.settings.generation.style_response_strength > 0 else None)
        futs = [self._submit(CopyRequest(ev.user_id, context_from_profile(p, profile, slot, lookup=cat.get), pv,
                                         style_response=response))
                for p in todo]
        results = [f.result() for f in futs]
        # keyed by the version that made it (a swap may have happened while it was queued)
        pending = [(c, self.keys.copy(r.user_id, r.product_id, slot, pv, r.model_version), encode_copy(c))
                   for r in results for c in (r.to_copy(),)]
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


class GeneratorWorker:
    def __init__(self, settings: Settings, engine: CopyEngine, *, consumer: Consumer | None = None,
                 producer: Producer | None = None, client: redis.Redis | None = None,
                 metrics: WorkerMetrics | None = None, threads: int = 16,
                 wall_ms: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        self.settings = settings
        self.cfg = settings.generator
        self.engine = engine
        self.topics = Topics.from_settings(settings.topics)
        self.consumer = consumer or Consumer(consumer_config(
            settings.kafka, settings.worker.group_prefix + GROUP))
        self.client = client or redis_client(settings.redis)
        self.publisher = CopyPublisher(producer or Producer(producer_config(settings.kafka)), self.topics.copy)
        self.metrics = metrics
        self.wall_ms = wall_ms
        self.keys = CopyKeys(settings.redis.key_prefix, settings.generation.catalog_key)
        self._catalog: Catalog | None = None
        self._catalog_at = 0.0
        self._catalog_lock = threading.Lock()
        self._stop = threading.Event()
        self.pregen = Pregenerator(settings, engine, self.client, self.publisher, self.catalog, self._stop, metrics)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pregen")
        self.tracker = OffsetTracker()
        self._owned: set[TP] = set()  # partitions assigned to this member (rebalance callbacks keep it)
        self._completed: queue.Queue[tuple[TP, int, int, int]] = queue.Queue()  # (tp, offset, weight, copies)
        self.inflight = 0  # copies (estimated) in flight
        self.paused = False
        self.records = 0
        self.copies = 0
        self._last_commit = 0.0

    # -- catalog ---------------------------------------------------------------------------------
    def catalog(self) -> Catalog:
        with self._catalog_lock:
            if self._catalog is None or time.monotonic() - self._catalog_at > 60.0:
                if self.settings.generation.load_catalog_if_empty:
                    ensure_catalog(self.client, self.keys)
                self._catalog = read_catalog(self.client, self.keys)
                self._catalog_at = time.monotonic()
            return self._catalog

    # -- lifecycle ---------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        self.consumer.subscribe([self.topics.events], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not self._stop.is_set():
                self.step()
        finally:
            self.close()

    def step(self) -> None:
        msgs = self.consumer.consume(self.settings.worker.max_batch, timeout=self.settings.worker.poll_timeout_s)
        for m in msgs:
            if m.error() is None:
                self._dispatch(m)
        self._drain()
        self._flow_control()
        if time.monotonic() - self._last_commit >= self.cfg.commit_interval_s:
            self._commit(sync=False)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._drain()
        self._commit(sync=True)
        left = self.publisher.close()
        if left:
            log.error("%d copies not acknowledged at shutdown", left)
        self.consumer.close()

    # -- the loop -------------------------------------------------------------------------------------
    def _dispatch(self, m: Message) -> None:
        tp, off = (m.topic() or "", m.partition() or 0), m.offset() or 0
        if tp not in self._owned:  # fetched before a rebalance that consume() served took it: its new owner's
            if self.metrics:
                self.metrics.count("not_owned")
            return
        self.tracker.add(tp, off)
        self.records += 1
        try:
            ev = decode_event(m.key(), m.value())
        except Rejection:
            self._skip(tp, off, "invalid")
            return
        except Exception:  # a decoder bug: never fatal (the uncommitted record would crash-loop the worker)
            log.warning("record %s[%d]@%d could not be decoded; skipped as invalid", tp[0], tp[1], off, exc_info=True)
            self._skip(tp, off, "invalid")
            return
        if ev.type != EventType.PRODUCT_VIEW:
            self._skip(tp, off, "not_a_view")
            return
        if self.wall_ms() - ev.ts > self.cfg.max_event_age_s * 1000:
            self._skip(tp, off, "stale")
            return
        weight = 1 + max(0, self.cfg.related)
        self.inflight += weight
        self.pool.submit(self._task, ev, tp, off, weight)

    def _skip(self, tp: TP, off: int, outcome: str) -> None:
        self.tracker.done(tp, off)
        if self.metrics:
            self.metrics.count(outcome)

    def _task(self, ev: Event, tp: TP, off: int, weight: int) -> None:
        made = 0
        try:
            made = self.pregen.handle(ev)
        except Stopping:
            return  # not done: not committed, re-read after restart
        except Exception:
            log.exception("pre-generation for %s failed; skipped", ev.event_id)
            if self.metrics:
                self.metrics.count("failed")
        self._completed.put((tp, off, weight, made))  # counted by the loop thread (pool threads would race)

    def _drain(self) -> None:
        while True:
            try:
                tp, off, weight, made = self._completed.get_nowait()
            except queue.Empty:
                return
            self.tracker.done(tp, off)
            self.inflight -= weight
            self.copies += made

    def _flow_control(self) -> None:
        if not self.paused and self.inflight >= self.cfg.max_inflight:
            self.consumer.pause(self.consumer.assignment())
            self.paused = True
        elif self.paused and self.inflight <= self.cfg.resume_below:
            self.consumer.resume(self.consumer.assignment())
            self.paused = False

    def _commit(self, sync: bool) -> None:
        self._last_commit = time.monotonic()
        # only partitions this member owns (the group protocol does not check: it would rewind a new owner's offset)
        offs = [TopicPartition(t, p, o) for (t, p), o in self.tracker.committable().items() if (t, p) in self._owned]
        if not offs:
            return
        try:
            if sync:
                self.consumer.commit(offsets=offs, asynchronous=False)
            else:
                self.consumer.commit(offsets=offs, asynchronous=True)
        except Exception as exc:  # not fatal: at worst records are re-read (cached keys are skipped)
            log.warning("offset commit failed: %s", exc)

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        tps = [(p.topic, p.partition) for p in parts]
        self.tracker.drop(tps)  # start clean: nothing from an earlier assignment of the same partition
        self._owned.update(tps)
        if self.paused:
            consumer.pause(parts)
        log.info("assigned %s", [(p.topic, p.partition) for p in parts])

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._drain()
        self._commit(sync=True)
        tps = [(p.topic, p.partition) for p in parts]
        self._owned.difference_update(tps)
        self.tracker.drop(tps)  # a task of theirs that finishes later marks nothing (see OffsetTracker.done)
        log.info("revoked %s", [(p.topic, p.partition) for p in parts])


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
