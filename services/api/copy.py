"""The copy service: ``GET /v1/copy`` on the API app (``services.api.app.create_app`` extension).

    app = create_app(settings, extensions=[copy_extension(settings)])       # livecopy serve

Per request: validate ids (422) -> product from the Redis catalog (404 when unknown) -> the
user's profile (none: cold-start, non-personalized copy, still 200) -> the Redis copy cache,
keyed by user, product, slot, profile version and model version (``stream.copy_store.CopyKeys``)
-> on a miss, the shopper's style response (``stream.responses.logic``) and the micro-batching
:class:`engine.serving.CopyEngine` (K candidates, CTR head, Thompson/greedy/epsilon policy with
propensity) -> cache the copy, publish it once to
``livecopy.copy`` -> 200 with the contract JSON. A full engine queue or a request whose deadline
passed answers 503 at once (``Retry-After: 1``); Redis unreachable answers 503.

A cache hit returns the copy that was generated (and published) for that key before, same
``copy_id``: every copy on ``livecopy.copy`` was published exactly once, when it was made. Its
slots are filled again from the product as Redis holds it now (``CopyFlow.refill``), so a price
change shows in the next response; a copy whose slots no longer fit (the discount ended) is made
anew.

On start-up (lifespan) the extension loads the engine (unless one is passed in), loads the
synthetic catalog into Redis when the catalog hash is empty (``generation.load_catalog_if_empty``),
and follows ``livecopy.model-updates`` for hot reload (``generation.hot_reload``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import orjson
from confluent_kafka import Producer
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from core.contracts import ID_PATTERN, USER_PATTERN, is_id, is_user_id
from core.metrics import LATENCY_BUCKETS
from core.settings import Settings
from core.wire import Topics
from engine.batching import DeadlineExceeded, EngineStopped, Overloaded
from engine.serving import CopyEngine, ReloadEvent
from services.api.app import error
from services.api.auth import DENIALS, OPEN, need
from services.api.state import state_of
from services.copyflow import CopyFlow
from stream.access.keys import ApiKey
from stream.access.ratelimit import RateLimiter, retry_after
from stream.collector.store import CollectorStore
from stream.copy_store import AsyncCatalog, CopyKeys, CopyPublisher, PublishBacklog, ensure_catalog
from stream.kafka_io import producer_config
from stream.model_updates import ModelUpdateFollower
from stream.redis_io import TRANSIENT_REDIS_ERRORS, pool_exhausted, redis_client
from stream.responses.store import AsyncResponseReader

log = logging.getLogger(__name__)

JSON = "application/json"


class CopyMetrics:
    """What the copy service exports on /metrics (its own registry)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.served = Counter("livecopy_copy_served", "Copies served, by source (cache|generated) and policy",
                              ["source", "policy"], registry=r)
        self.refused = Counter("livecopy_copy_refused", "Copy requests refused, by reason", ["reason"], registry=r)
        self.generate_seconds = Histogram("livecopy_copy_generate_seconds", "Queue + generation time of a miss",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("livecopy_copy_batch_size",
                                    "Requests per engine batch (static) or decode step (continuous)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.batch_seconds = Histogram("livecopy_copy_batch_seconds",
                                       "Engine time per batch (static) or decode step (continuous)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.reloads = Counter("livecopy_model_reloads", "Model updates handled, by outcome", ["outcome"], registry=r)
        self.uncached = Counter("livecopy_copy_uncached", "Cached copies dropped: the broker did not acknowledge them",
                                registry=r)
        self.stale = Counter("livecopy_copy_cache_stale", "Cached copies whose slots no longer fit the product "
                             "(e.g. its discount ended): made anew", registry=r)
        self.service: CopyService | None = None
        r.register(self)  # model info, queue depth and publish failures, read at scrape time

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        if svc is None:
            return
        info = GaugeMetricFamily("livecopy_model_info", "1 for the model version serving", labels=["model", "version"])
        info.add_metric([svc.engine.model, svc.engine.version], 1.0)
        yield info
        yield GaugeMetricFamily("livecopy_copy_queue_depth", "Requests waiting for a batch",
                                value=svc.engine.queue_depth())
        yield CounterMetricFamily("livecopy_copy_publish_failed", "Copies the broker did not acknowledge",
                                  value=svc.publisher.failed)
        yield GaugeMetricFamily("livecopy_copy_publish_queue", "Copies in the producer's local queue (not yet acked)",
                                value=svc.publisher.queued())
        yield GaugeMetricFamily("livecopy_copy_publish_congested", "1 while misses are refused: the queue is full",
                                value=float(svc.publisher.congested()))
        stats = svc.engine.executor.filter_stats
        yield CounterMetricFamily("livecopy_copy_candidates_checked", "Sampled candidates checked by the filter",
                                  value=stats.checked)
        rejected = CounterMetricFamily("livecopy_copy_candidates_rejected", "Candidates the filter rejected, by reason",
                                       labels=["reason"])
        for reason, n in sorted(stats.reasons.items()):
            rejected.add_metric([reason], n)
        yield rejected
        fallbacks = CounterMetricFamily("livecopy_copy_fallbacks", "Requests served the fallback copy (no candidate "
                                        "passed), by the commonest rejection among their candidates", labels=["reason"])
        for reason, n in sorted(stats.fallback_reasons.items()):
            fallbacks.add_metric([reason], n)
        yield fallbacks
        drafts = svc.engine.executor.drafts
        if drafts is not None:
            guesses = CounterMetricFamily("livecopy_copy_draft_tokens", "Guessed tokens fed by speculative decode "
                                          "steps, by outcome (kept: the row's own sampling accepted them)",
                                          labels=["outcome"])
            guesses.add_metric(["kept"], drafts.accepted)
            guesses.add_metric(["refused"], drafts.proposed - drafts.accepted)
            yield guesses
        prompts = svc.engine.executor.prompt_cache
        if prompts is not None:  # the executor's: starts again at a hot swap (its keys/values are the old weights')
            tokens = CounterMetricFamily("livecopy_copy_prompt_tokens", "Prompt tokens of the continuous engine's "
                                         "admissions, by source (cached: a shared prefix's keys/values reused)",
                                         labels=["source"])
            tokens.add_metric(["cached"], prompts.reused)
            tokens.add_metric(["prefilled"], prompts.computed)
            yield tokens

    def on_batch(self, n: int, seconds: float, version: str) -> None:
        self.batch_size.observe(n)
        self.batch_seconds.observe(seconds)

    def on_reload(self, ev: ReloadEvent) -> None:
        self.reloads.labels(ev.outcome).inc()


class CopyService:
    """Everything ``GET /v1/copy`` needs, built in the app's lifespan (see ``copy_extension``)."""

    def __init__(self, settings: Settings, engine: CopyEngine, redis_client: Any, publisher: CopyPublisher,
                 metrics: CopyMetrics) -> None:
        self.settings = settings
        self.cfg = settings.generation
        self.engine = engine
        self.redis = redis_client
        self.flow = CopyFlow(settings)
        self.limiter = RateLimiter(redis_client, settings.redis.key_prefix, settings.api.generate_rate_per_s,
                                   settings.api.generate_burst)
        self.catalog = AsyncCatalog(redis_client, self.flow.keys)
        self.responses = AsyncResponseReader(redis_client, settings.redis.key_prefix, settings.responses.half_life_ms)
        self.publisher = publisher
        self.metrics = metrics
        metrics.service = self
        self._drop_if_same = redis_client.register_script(_DEL_IF_SAME)
        self._watching: set[asyncio.Task[None]] = set()  # cached copies whose delivery is not yet known
        # every copy served, per shopper: POST /v1/events takes impressions and clicks of these alone
        self.served = CollectorStore(redis_client, settings.redis.key_prefix, settings.collector)

    async def get_copy(self, request: Request, user_id: str, product_id: str, slot: str | None) -> Response:
        if not is_user_id(user_id):
            return error(422, "invalid_user_id", "user_id must be 1-128 chars of [A-Za-z0-9_.:@-]")
        if not is_id(product_id):
            return error(422, "invalid_product_id", "product_id must be 1-128 chars of [A-Za-z0-9_.:-]")
        if slot is not None and slot not in self.settings.api.slots:  # it reaches the prompt and the topics
            return error(422, "invalid_slot", f"slot must be one of {', '.join(self.settings.api.slots)}")
        caller: ApiKey = getattr(request.state, "api_key", OPEN)
        try:
            product = await self.catalog.get(product_id)
            if product is None:
                return error(404, "unknown_product", f"no product {product_id!r} in the catalog")
            state = await state_of(request).require_profiles().load(user_id)
            key = self.flow.key(user_id, product_id, slot, state, self.engine.version)
            cached = await self.redis.get(key)
            if cached is not None:
                fresh = self.flow.refill(cached, product)
                if fresh is not None:
                    await self.served.record_served(user_id, orjson.loads(fresh)["copy_id"], int(time.time() * 1000))
                    self.metrics.served.labels("cache", "cached").inc()
                    return Response(self._for(caller, fresh), media_type=JSON, headers={"X-Livecopy-Cache": "hit"})
                self.metrics.stale.inc()  # its slots no longer fit the product: a new copy
            wait = 0.0 if caller is OPEN else await self.limiter.take(caller.key_id, int(time.time() * 1000))
            if wait:  # uncached generation costs the engine: bounded per key (open mode has no keys to bound)
                self.metrics.refused.labels("rate_limited").inc()
                resp = error(429, "rate_limited", f"over {self.settings.api.generate_rate_per_s:g} uncached copies/s "
                                                  "for this key")
                resp.headers["Retry-After"] = retry_after(wait)
                return resp
            if self.publisher.congested():  # its record could not be queued: refuse before reading or generating
                self.metrics.refused.labels("publish_backlog").inc()
                return _unavailable("publish_backlog", str(PublishBacklog()))
            profile = self.flow.profile(user_id, state)
            recent = await self.catalog.get_many(profile.recent_products) if profile is not None else {}
            response = await self.responses.load(user_id) if self.flow.uses_style_response else None
        except TRANSIENT_REDIS_ERRORS as exc:
            if pool_exhausted(exc):  # every connection of this process busy: backpressure, not an outage
                self.metrics.refused.labels("redis_pool").inc()
                return _unavailable("busy", "all Redis connections of this server are in use")
            self.metrics.refused.labels("redis").inc()
            return error(503, "unavailable", f"redis: {str(exc)[:200]}")
        req = self.flow.request(user_id, product, state, profile, slot, response, recent.get)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            fut = self.engine.submit(req)
        except Overloaded as exc:
            self.metrics.refused.labels("overloaded").inc()
            return _unavailable("overloaded", str(exc))
        except EngineStopped as exc:
            self.metrics.refused.labels("stopping").inc()
            return _unavailable("stopping", str(exc))
        try:
            res = await asyncio.wrap_future(fut)
        except DeadlineExceeded as exc:
            self.metrics.refused.labels("deadline").inc()
            return _unavailable("deadline", str(exc))
        except Exception as exc:
            log.exception("copy generation failed")
            self.metrics.refused.labels("error").inc()
            return error(500, "generation_failed", f"{type(exc).__name__}: {str(exc)[:200]}")
        self.metrics.generate_seconds.observe(loop.time() - started)
        made = self.flow.made(req, res, slot)
        copy, body, key = made.copy, made.body, made.key
        try:  # not served unless queued for livecopy.copy: the feedback joiner needs every served copy
            delivered = self.publisher.publish(copy, body)
        except PublishBacklog as exc:
            self.metrics.refused.labels("publish_backlog").inc()
            return _unavailable("publish_backlog", str(exc))
        try:
            await self.redis.set(key, body, ex=self.cfg.cache_ttl_s)
        except TRANSIENT_REDIS_ERRORS as exc:  # served anyway; only the cache misses it
            log.warning("copy cache write failed: %s", exc)
        else:
            task = asyncio.ensure_future(self._uncache_if_undelivered(key, body, delivered))
            self._watching.add(task)
            task.add_done_callback(self._watching.discard)
        await self.served.record_served(user_id, copy.copy_id, int(time.time() * 1000))
        self.metrics.served.labels("generated", res.policy).inc()
        return Response(self._for(caller, body), media_type=JSON, headers={"X-Livecopy-Cache": "miss"})

    @staticmethod
    def _for(caller: ApiKey, body: bytes) -> bytes:
        """What the caller may see: a page needs the copy, not the shopper's features (``debug`` scope); the
        trunk's embedding kept for the trainer is never shown."""
        doc = orjson.loads(body)
        doc.pop("embedding", None)
        if not caller.allows("debug"):
            doc.pop("features", None)
        return orjson.dumps(doc)

    async def _uncache_if_undelivered(self, key: str, body: bytes, delivered: Future[None]) -> None:
        """A copy the broker did not acknowledge is not on ``livecopy.copy``: it was served once
        (the API does not wait for the ack), but must not be served again from the cache."""
        try:
            await asyncio.wrap_future(delivered)
            return
        except Exception:  # the failure itself is logged and counted by the publisher
            pass
        try:
            if await self._drop_if_same(keys=[key], args=[body]):
                self.metrics.uncached.inc()
        except TRANSIENT_REDIS_ERRORS as exc:
            log.warning("could not drop the unpublished copy from the cache (it expires in %d s): %s",
                        self.cfg.cache_ttl_s, exc)

    def health(self) -> dict[str, Any]:
        return {"model": self.engine.model, "model_version": self.engine.version,
                "queue_depth": self.engine.queue_depth(), "publish_backlog": self.publisher.congested()}


# Delete the cached copy only if it is still the one written (a newer copy under the key stays).
_DEL_IF_SAME = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _unavailable(code: str, message: str) -> Response:
    resp = error(503, code, message)
    resp.headers["Retry-After"] = "1"
    return resp


def copy_extension(
    settings: Settings,
    *,
    engine: CopyEngine | None = None,
    producer: Producer | None = None,
    follow_updates: bool | None = None,
) -> Callable[[FastAPI], None]:
    """The ``create_app`` extension adding ``GET /v1/copy``.

    ``engine``: an engine to use (started here if not running; not stopped at shutdown when
    passed in); None loads ``CopyEngine.from_settings(settings)``. ``follow_updates`` (default
    ``generation.hot_reload``) follows ``livecopy.model-updates``.
    """
    metrics = CopyMetrics()
    slot_pattern = "^(" + "|".join(re.escape(x) for x in settings.api.slots) + ")$"
    follow = settings.generation.hot_reload if follow_updates is None else follow_updates

    def install(app: FastAPI) -> None:
        state_of(app).registries.append(metrics.registry)

        async def startup(app: FastAPI) -> None:
            own = engine is None
            eng: CopyEngine = engine if engine is not None else await asyncio.to_thread(
                CopyEngine.from_settings, settings, on_batch=metrics.on_batch, on_reload=metrics.on_reload
            )
            eng.start()
            if settings.generation.load_catalog_if_empty:
                keys = CopyKeys(settings.redis.key_prefix, settings.generation.catalog_key)
                client = redis_client(settings.redis)
                try:
                    await asyncio.to_thread(ensure_catalog, client, keys)
                finally:
                    client.close()
            topics = Topics.from_settings(settings.topics)
            pub = CopyPublisher(producer or Producer(producer_config(settings.kafka)), topics.copy)
            st = state_of(app)
            svc = CopyService(settings, eng, st.require_redis(), pub, metrics)
            st.copy = svc
            st.health_checks.append(svc.health)
            follower = None
            if follow:
                follower = ModelUpdateFollower(settings, eng.model, eng.apply_update).start()
            st.copy_follower = follower
            st.copy_owns_engine = own

        async def shutdown(app: FastAPI) -> None:
            st = state_of(app)
            svc = st.copy
            if svc is None:
                return
            if st.copy_follower is not None:
                await asyncio.to_thread(st.copy_follower.stop)
            if st.copy_owns_engine:
                await asyncio.to_thread(svc.engine.stop)
            left = await asyncio.to_thread(svc.publisher.close)
            if left:
                log.error("%d copies not acknowledged by the broker at shutdown", left)

        state_of(app).startup.append(startup)
        state_of(app).shutdown.append(shutdown)

        @app.get("/v1/copy", dependencies=[Depends(need("copy"))], responses={
            **DENIALS, 404: {"description": "unknown product"},
            422: {"description": "invalid user_id, product_id or slot"},
            429: {"description": "over the key's rate of uncached copies (Retry-After)"}})
        async def get_copy(
            request: Request,
            user_id: str = Query(pattern=USER_PATTERN, description="the shopper: 1-128 chars of [A-Za-z0-9_.:@-]"),
            product_id: str = Query(pattern=ID_PATTERN, description="1-128 chars of [A-Za-z0-9_.:-]"),
            slot: str | None = Query(None, pattern=slot_pattern, description="one of api.slots"),
        ) -> Any:
            """Generated copy JSON (CONTRACTS.md); 422 invalid ids, 404 unknown product, 503 overloaded."""
            svc = state_of(request).copy
            if svc is None:
                return _unavailable("starting", "the copy service is starting")
            return await svc.get_copy(request, user_id, product_id, slot)

    return install
