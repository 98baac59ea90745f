"""The HTTP collector: ``POST /v1/events`` on the API app (a ``create_app`` extension, like
``services.api.copy.copy_extension``), its CORS preflight, and the browser tracker at
``GET /v1/tracker.js``.

    app = create_app(settings, extensions=[copy_extension(settings), events_extension(settings)])  # livecopy serve

Who may write what (``collector`` settings, core/settings.py):

* a page: a publishable key (``?key=`` or ``X-Livecopy-Key``; sendBeacon cannot set headers) from one
  of the key's origins (else 403), with a shopper token (``?token=`` or ``X-Livecopy-Token``) that the
  site's secret signed (none, forged or expired: 401); only events of the token's shopper are
  written (another user_id: that event refused, 403); rates per key and per client IP (429 with
  ``Retry-After``);
* a site's server: an API key with the ``events`` scope (``Authorization: Bearer``, as every API
  key, services.api.auth): any shopper; ``api.auth=open`` (dev) lets a request without key in alike.

Per request: body (<= ``collector.max_body_bytes``, else 413) -> events (<= ``collector.max_batch``,
else 413), each validated by the workers' decoder -> the shopper's Redis state in one round trip
(event ids written before: ``duplicate``; copies served: an impression or click of a copy never
served to that shopper goes to the DLQ, ``unknown_copy``) -> produced (key ``user_id``, idempotent,
``acks=all``) -> answered once the broker acknowledged every record; one it did not: 503 with
``Retry-After`` and the status of every event. The answer's shape: stream/collector/logic.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram

from core.contracts import EventType
from core.metrics import LATENCY_BUCKETS
from core.settings import PublishableKey, Settings
from core.wire import Rejection, Topics, dlq_headers
from services.api.app import error
from services.api.auth import DENIALS, authorize
from services.api.state import state_of
from stream.access.buckets import Limit, TokenBuckets
from stream.access.ratelimit import retry_after
from stream.access.shopper_token import BadToken, verify_shopper_token
from stream.collector.logic import (
    ACCEPTED,
    BodyError,
    Item,
    answer,
    needs_copy,
    settle_repeats,
    split_body,
    status_of,
    validate,
)
from stream.collector.sink import EventSink, OutRecord, sink_config
from stream.collector.store import CollectorStore
from stream.redis_io import TRANSIENT_REDIS_ERRORS

log = logging.getLogger(__name__)

TRACKER = Path(__file__).resolve().parent / "static" / "livecopy-tracker.js"
ALLOW_HEADERS = "content-type, x-livecopy-key, x-livecopy-token, authorization, x-api-key"


class CollectorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.events = Counter("livecopy_collector_events", "Events posted to /v1/events, by outcome and reason",
                              ["outcome", "reason"], registry=r)
        self.refused = Counter("livecopy_collector_refused", "Requests to /v1/events refused whole, by reason",
                               ["reason"], registry=r)
        self.write_seconds = Histogram("livecopy_collector_write_seconds", "Produce -> every record acknowledged",
                                       buckets=LATENCY_BUCKETS, registry=r)


@dataclass(frozen=True)
class Caller:
    shopper: str | None  # the one user a page may report (None: a server, any user)
    key: str | None = None  # the publishable key
    config: PublishableKey | None = None
    origin: str | None = None  # the page's origin, when allowed (answers carry it for CORS)


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str, origin: str | None = None,
                 retry_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.origin, self.retry_s = status, code, message, origin, retry_s


def origin_allowed(origin: str | None, origins: list[str]) -> bool:
    return origin is not None and ("*" in origins or origin.rstrip("/") in (o.rstrip("/") for o in origins))


def cors_headers(origin: str | None) -> dict[str, str]:
    if origin is None:
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Expose-Headers": "Retry-After"}


def client_ip(request: Request, hops: int) -> str:
    """The peer's address, or with ``hops`` trusted proxies in front, the address the outermost of them saw."""
    peer = request.client.host if request.client else "unknown"
    if hops <= 0:
        return peer
    chain = [p.strip() for p in request.headers.get("x-forwarded-for", "").split(",") if p.strip()]
    return chain[-hops] if len(chain) >= hops else (chain[0] if chain else peer)


class EventCollector:
    """Everything ``POST /v1/events`` needs, built in the app's lifespan (see ``events_extension``)."""

    def __init__(self, settings: Settings, store: CollectorStore, sink: EventSink, metrics: CollectorMetrics,
                 clock: Callable[[], float] = time.time, buckets: TokenBuckets | None = None) -> None:
        self.settings = settings
        self.cfg = settings.collector
        self.topics = Topics.from_settings(settings.topics)
        self.store = store
        self.sink = sink
        self.metrics = metrics
        self.clock = clock
        self.buckets = buckets or TokenBuckets(self.cfg.max_buckets)

    # -- who is asking ---------------------------------------------------------------------------
    async def caller(self, request: Request) -> Caller:
        q = request.query_params
        pk = q.get("key") or request.headers.get("x-livecopy-key")
        origin = request.headers.get("origin")
        if pk is None:
            if request.headers.get("authorization") or request.headers.get("x-api-key") or \
                    self.settings.api.auth == "open":
                await authorize(request, "events")  # a server's API key (Denied: 401/403, the app answers)
                return Caller(None)
            raise Refused(401, "unauthorized", "a publishable key (?key=) and a shopper token (?token=), or an API "
                                               "key with the events scope, are required")
        cfg = self.cfg.publishable_keys.get(pk)
        if cfg is None:
            raise Refused(401, "unknown_key", "unknown publishable key")
        if not origin_allowed(origin, cfg.origins):
            raise Refused(403, "foreign_origin", f"origin {origin!r} may not use this key" if origin else
                          "a publishable key is used from a page: the Origin header is required")
        token = q.get("token") or request.headers.get("x-livecopy-token")
        if not token:
            raise Refused(401, "token_required", "a shopper token (?token=) is required with a publishable key", origin)
        secret = self.cfg.site_secrets[cfg.site]  # every key's site has one (CollectorSettings checks at start)
        try:
            shopper = verify_shopper_token(secret, token, self.clock(), self.cfg.max_token_ttl_s)
        except BadToken as exc:
            raise Refused(401, "bad_token" if exc.reason != "expired" else "token_expired", str(exc), origin) from None
        return Caller(shopper.user_id, pk, cfg, origin)

    # -- the request -----------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        try:
            caller = await self.caller(request)
            body = await self._body(request, caller.origin)
            try:
                raws = split_body(body, request.headers.get("content-type"), self.cfg.max_batch)
            except BodyError as exc:
                raise Refused(exc.status, exc.code, exc.message, caller.origin) from None
            self._rate(request, caller, len(raws))
        except Refused as exc:
            self.metrics.refused.labels(exc.code).inc()
            resp = error(exc.status, exc.code, exc.message)
            resp.headers.update(cors_headers(exc.origin))
            if exc.retry_s is not None:
                resp.headers["Retry-After"] = retry_after(exc.retry_s)
            return resp
        items = validate(raws, caller.shopper)
        try:
            await self._write(items, caller)
        except TRANSIENT_REDIS_ERRORS as exc:
            self.metrics.refused.labels("redis").inc()
            resp = error(503, "unavailable", f"redis: {str(exc)[:200]}")
            resp.headers.update(cors_headers(caller.origin))
            return resp
        settle_repeats(items)
        for it in items:
            self.metrics.events.labels("duplicate" if it.duplicate and it.status == ACCEPTED else it.status,
                                       it.reason or "").inc()
        status = status_of(items)
        headers = cors_headers(caller.origin)
        if status == 503:
            headers["Retry-After"] = "1"
        return Response(orjson.dumps(answer(items)), status_code=status, media_type="application/json",
                        headers=headers)

    async def _body(self, request: Request, origin: str | None) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise Refused(413, "body_too_large", f"the body is over {limit} bytes", origin)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise Refused(413, "body_too_large", f"the body is over {limit} bytes", origin)
        return bytes(body)

    def _rate(self, request: Request, caller: Caller, n: int) -> None:
        if caller.config is None:
            return
        c = caller.config
        ip = client_ip(request, self.cfg.forwarded_hops)
        wait = self.buckets.take([Limit(f"k\0{caller.key}", c.rate_per_s, c.burst),
                                  Limit(f"i\0{caller.key}\0{ip}", c.ip_rate_per_s, c.ip_burst)], max(1, n))
        if wait:
            raise Refused(429, "rate_limited", f"over this key's events per second (from {ip} or in all)",
                          caller.origin, wait)

    async def _write(self, items: list[Item], caller: Caller) -> None:
        now_ms = int(self.clock() * 1000)
        wanted: dict[str, tuple[list[str], list[str]]] = {}
        for it in items:
            if it.pending and it.event is not None:
                eids, cids = wanted.setdefault(it.event.user_id, ([], []))
                eids.append(it.event.event_id)
                if self.store.checks_served and needs_copy(it.event):
                    cids.append(it.event.copy_id or "")
        known = await self.store.lookup(wanted, now_ms)
        out: list[tuple[Item, OutRecord]] = []
        for it in items:
            if not it.pending or it.event is None:
                continue
            ev = it.event
            written, served = known.get(ev.user_id, (set(), set()))
            if ev.event_id in written:
                it.duplicate = True
                continue
            key = ev.user_id.encode()
            if self.store.checks_served and needs_copy(ev) and ev.copy_id not in served:
                kind = "click" if ev.type == EventType.CLICK else "impression"
                rej = Rejection("unknown_copy", f"copy {ev.copy_id} of this {kind} was not served to {ev.user_id}")
                it.reject(rej.reason, rej.detail)
                it.dlq = True
                headers = [*dlq_headers(rej, self.topics.events, -1, -1), ("source", b"collector")]
                if caller.config is not None:
                    headers.append(("collector.site", caller.config.site.encode()))
                out.append((it, OutRecord(self.topics.dlq, key, it.raw, headers)))
            else:
                out.append((it, OutRecord(self.topics.events, key, it.raw)))
        started = time.perf_counter()
        outcomes = await self.sink.write([rec for _, rec in out])
        if out:
            self.metrics.write_seconds.observe(time.perf_counter() - started)
        written_now: dict[str, list[str]] = {}
        for (it, rec), problem in zip(out, outcomes, strict=True):
            if problem is not None:
                it.dlq = False
                it.fail(problem)
            elif rec.topic == self.topics.events and it.event is not None:
                written_now.setdefault(it.event.user_id, []).append(it.event.event_id)
        try:
            await self.store.remember_written(written_now, now_ms)
        except TRANSIENT_REDIS_ERRORS as exc:  # written anyway; only a retry would be written again
            log.warning("could not remember %d written event ids: %s", sum(map(len, written_now.values())), exc)

    def preflight(self, request: Request) -> Response:
        origin = request.headers.get("origin")
        pk = request.query_params.get("key")
        if pk is not None:
            cfg = self.cfg.publishable_keys.get(pk)
            allowed = cfg is not None and origin_allowed(origin, cfg.origins)
        else:
            allowed = any(origin_allowed(origin, c.origins) for c in self.cfg.publishable_keys.values())
        if not allowed:
            self.metrics.refused.labels("foreign_origin").inc()
            return error(403, "foreign_origin", f"origin {origin!r} may not post events here")
        return Response(status_code=204, headers={
            **cors_headers(origin), "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": ALLOW_HEADERS, "Access-Control-Max-Age": "600"})

    def health(self) -> dict[str, Any]:
        return {"collector_queue": self.sink.queued()}


def events_extension(
    settings: Settings,
    *,
    producer: Producer | None = None,
    clock: Callable[[], float] = time.time,
) -> Callable[[FastAPI], None]:
    """The ``create_app`` extension adding ``POST /v1/events``, its preflight and ``GET /v1/tracker.js``.
    ``producer``: a confluent-kafka producer to write with (closed at shutdown); None makes one."""
    metrics = CollectorMetrics()
    tracker = TRACKER.read_bytes()

    def install(app: FastAPI) -> None:
        state_of(app).registries.append(metrics.registry)

        async def startup(app: FastAPI) -> None:
            st = state_of(app)
            cfg = settings.collector
            prod = producer or Producer(sink_config(settings.kafka, cfg.ack_timeout_s))
            store = CollectorStore(st.require_redis(), settings.redis.key_prefix, cfg)
            st.events = EventCollector(settings, store, EventSink(prod, cfg.ack_timeout_s), metrics, clock)
            st.health_checks.append(st.events.health)

        async def shutdown(app: FastAPI) -> None:
            svc = state_of(app).events
            if svc is None:
                return
            left = await asyncio.to_thread(svc.sink.close)
            if left:
                log.error("%d collected events not acknowledged by the broker at shutdown", left)

        state_of(app).startup.append(startup)
        state_of(app).shutdown.append(shutdown)

        @app.post("/v1/events", responses={
            **DENIALS, 207: {"description": "some events accepted, others rejected (per event in `results`)"},
            400: {"description": "the body is not a batch of events"},
            403: {"description": "a foreign origin, a key without the events scope, or only another shopper's "
                                 "events"},
            413: {"description": "body or batch over the limit"}, 415: {"description": "unsupported content type"},
            422: {"description": "every event invalid (per event in `results`)"},
            429: {"description": "over the publishable key's rate (Retry-After)"}})
        async def post_events(request: Request) -> Any:
            """A batch of events (JSON array, JSON lines or sendBeacon's text/plain); per event accepted or
            rejected with the reason, answered once the broker acknowledged what was written."""
            svc = state_of(request).events
            if svc is None:
                return error(503, "starting", "the collector is starting")
            return await svc.handle(request)

        @app.options("/v1/events", include_in_schema=False)
        async def preflight(request: Request) -> Any:
            svc = state_of(request).events
            if svc is None:
                return error(503, "starting", "the collector is starting")
            return svc.preflight(request)

        @app.get("/v1/tracker.js", include_in_schema=False)
        async def tracker_js() -> Response:
            return Response(tracker, media_type="text/javascript; charset=utf-8",
                            headers={"Cache-Control": "public, max-age=300"})

    return install
