"""Each shopper's response to copy styles: `livecopy.feedback` -> per-user counters in Redis.

For every labelled impression the feedback topic carries the style the copy was written in and
the CTR its model predicted (``score``). Per shopper and style this worker adds the clicks
observed and the clicks expected (the sum of the predicted CTRs); the copy service reads them back
as a :class:`models.policy.StyleResponse` -- observed over expected, shrunk towards 1 by a Gamma
prior -- to tilt the styles it samples and to choose among the candidates (Thompson). So a
shopper who clicks social-proof copy far more often than the CTR head expects gets more of it,
and one who never clicks urgency gets less, without waiting for the next model version.

Idempotent like the profile worker: one Lua call per shopper per batch adds that shopper's
records atomically and remembers their impression ids (re-deliveries count once), offsets are
committed only after Redis acknowledged. Keys carry the user id as a hash tag (Cluster safe).
`ResponseProcessor` is transport-free and unit-tested with the in-memory store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis
import redis.asyncio as aredis
from confluent_kafka import Producer

from livecopy.metrics import WorkerMetrics
from livecopy.settings import ResponseSettings, Settings
from models.policy import StyleResponse
from models.styles import STYLES
from stream.contracts import FeedbackRecord, is_user_id
from stream.kafka_io import BatchLoop, Outcome, TransientError, group_consumer, loop_options, producer_config
from stream.profile_worker import install_stop_signals, wall_ms
from stream.redis_lua import TRANSIENT_REDIS_ERRORS, LuaScript, TransientStoreError, redis_client
from stream.wire import Record, Rejection, Topics, decode_feedback

log = logging.getLogger(__name__)

GROUP = "responses"


@dataclass(frozen=True, slots=True)
class ResponseUpdate:
    impression_id: str
    user_id: str
    style: str
    predicted: float  # the CTR the serving model predicted for the copy shown
    clicked: bool


def response_update(rec: FeedbackRecord) -> ResponseUpdate | None:
    """The update a feedback record makes, or None when it carries no style or no prediction
    (a valid record, just not evidence about styles: e.g. from a model without a CTR head).
    Raises `Rejection` for a user id outside the events' charset: it names the shopper's hash tag,
    and one with braces or none would spread their keys over Cluster slots."""
    if not is_user_id(rec.user_id):
        raise Rejection("bad_charset", f"user_id {rec.user_id[:80]!r} is not 1-128 chars of [A-Za-z0-9_.:@-]")
    if rec.style not in STYLES or rec.score is None or not 0.0 <= rec.score <= 1.0:
        return None
    return ResponseUpdate(rec.impression_id, rec.user_id, str(rec.style), float(rec.score), rec.clicked)


def apply_updates(resp: StyleResponse, seen: dict[str, int], updates: Sequence[ResponseUpdate], now_ms: int,
                  window_ms: int, half_life_ms: float = 0.0) -> list[bool]:
    """The pure merge (what responses.lua does for one shopper): age the counts to ``now_ms``,
    forget ids older than the window, count each impression id once."""
    resp.decay_to(now_ms, half_life_ms)
    for imp in [i for i, t in seen.items() if t < now_ms - window_ms]:
        del seen[imp]
    out = []
    for u in updates:
        fresh = u.impression_id not in seen
        if fresh:
            seen[u.impression_id] = now_ms
            resp.observe(u.style, u.predicted, u.clicked)
        out.append(fresh)
    return out


def response_from_hash(h: Mapping[bytes | str, bytes | str]) -> StyleResponse | None:
    """Parse the Redis hash (c:<style>, e:<style>, t) back into a StyleResponse (pure); None
    when it holds no evidence."""
    resp = StyleResponse.empty()
    for k, v in h.items():
        key = k.decode() if isinstance(k, bytes) else k
        kind, _, style = key.partition(":")
        if style in STYLES and kind in ("c", "e"):
            (resp.clicks if kind == "c" else resp.expected)[style] = float(v)
        elif key == "t":
            resp.as_of_ms = int(v)
    return resp if resp.expected else None


class ResponseStore(Protocol):
    def apply(self, updates: Sequence[ResponseUpdate], now_ms: int) -> list[bool]:
        """Add updates in order; True where one counted, False for a duplicate impression id."""
        ...

    def load(self, user_id: str) -> StyleResponse | None: ...

    def ping(self) -> bool: ...


class InMemoryResponseStore:
    """A real (not mocked) store for unit tests: the pure merge over dicts."""

    def __init__(self, cfg: ResponseSettings, *, now_ms: Callable[[], int] = wall_ms) -> None:
        self.cfg = cfg
        self.now_ms = now_ms
        self.responses: dict[str, StyleResponse] = {}
        self.seen: dict[str, dict[str, int]] = {}
        self.down = False  # tests flip this to simulate an outage

    def apply(self, updates: Sequence[ResponseUpdate], now_ms: int) -> list[bool]:
        if self.down:
            raise TransientStoreError("in-memory store is down")
        out: list[bool] = []
        for u in updates:
            out += apply_updates(self.responses.setdefault(u.user_id, StyleResponse.empty()),
                                 self.seen.setdefault(u.user_id, {}), [u], now_ms, self.cfg.dedupe_window_s * 1000,
                                 self.cfg.half_life_ms)
        return out

    def load(self, user_id: str) -> StyleResponse | None:
        r = self.responses.get(user_id)
        return r.aged(self.now_ms(), self.cfg.half_life_ms) if r is not None and r.expected else None

    def ping(self) -> bool:
        return not self.down


class ResponseKeys:
    def __init__(self, prefix: str = "lc:") -> None:
        self.prefix = prefix

    def of(self, user_id: str) -> tuple[str, str]:
        tag = f"{self.prefix}{{{user_id}}}"
        return f"{tag}:sr", f"{tag}:srd"


def _encode(u: ResponseUpdate) -> bytes:
    return orjson.dumps({"i": u.impression_id, "s": u.style, "e": u.predicted, "c": 1 if u.clicked else 0})


def _aged(resp: StyleResponse | None, now_ms: int, half_life_ms: float) -> StyleResponse | None:
    return resp.aged(now_ms, half_life_ms) if resp is not None else None


class RedisResponseStore:
    """Writes (the responses worker) and reads (the generator worker); ``load`` ages the counts to
    ``now_ms()`` as the Lua merge would."""

    def __init__(self, client: redis.Redis, cfg: ResponseSettings, key_prefix: str = "lc:", *,
                 now_ms: Callable[[], int] = wall_ms) -> None:
        self.client = client
        self.cfg = cfg
        self.now_ms = now_ms
        self.keys = ResponseKeys(key_prefix)
        self.script = LuaScript(client, "responses.lua")

    def apply(self, updates: Sequence[ResponseUpdate], now_ms: int) -> list[bool]:
        head = [now_ms, self.cfg.dedupe_window_s * 1000, self.cfg.ttl_s * 1000, self.cfg.half_life_ms]
        return self.script.run_grouped(updates, lambda u: u.user_id,
                                       lambda user, us: (self.keys.of(user), [*head, *map(_encode, us)]))

    def load(self, user_id: str) -> StyleResponse | None:
        return _aged(response_from_hash(self.client.hgetall(self.keys.of(user_id)[0])), self.now_ms(),
                     self.cfg.half_life_ms)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except TRANSIENT_REDIS_ERRORS:
            return False


class AsyncResponseReader:
    """Read side for the copy service (redis.asyncio); ages the counts to ``now_ms()``."""

    def __init__(self, client: aredis.Redis, key_prefix: str = "lc:", half_life_ms: float = 0.0, *,
                 now_ms: Callable[[], int] = wall_ms) -> None:
        self.client = client
        self.keys = ResponseKeys(key_prefix)
        self.half_life_ms = half_life_ms
        self.now_ms = now_ms

    async def load(self, user_id: str) -> StyleResponse | None:
        return _aged(response_from_hash(await self.client.hgetall(self.keys.of(user_id)[0])), self.now_ms(),
                     self.half_life_ms)


class ResponseProcessor:
    """Feedback records in, style-response counters out (``BatchLoop`` processor)."""

    def __init__(self, store: ResponseStore, *, now_ms: Callable[[], int] = wall_ms,
                 metrics: WorkerMetrics | None = None) -> None:
        self.store = store
        self.now_ms = now_ms
        self.metrics = metrics
        self.applied = self.duplicates = self.skipped = 0

    def process(self, records: Sequence[Record]) -> Outcome:
        updates: list[ResponseUpdate] = []
        rejected: list[tuple[Record, Rejection]] = []
        skipped = 0
        for r in records:
            try:
                u = response_update(decode_feedback(r.value))
            except Rejection as rej:
                rejected.append((r, rej))
                continue
            if u is None:
                skipped += 1
            else:
                updates.append(u)
        try:
            flags = self.store.apply(updates, self.now_ms())
        except TransientStoreError as exc:
            raise TransientError(str(exc)) from exc
        applied = sum(flags)
        self.applied += applied
        self.duplicates += len(flags) - applied
        self.skipped += skipped
        if self.metrics:
            self.metrics.count("applied", applied)
            self.metrics.count("duplicate", len(flags) - applied)
            self.metrics.count("skipped", skipped)
        return Outcome(rejected)

    def healthy(self) -> bool:
        return self.store.ping()


def build_responses_loop(settings: Settings, *, group_suffix: str = "", metrics: WorkerMetrics | None = None,
                         **consumer_overrides: Any) -> BatchLoop:
    topics = Topics.from_settings(settings.topics)
    store = RedisResponseStore(redis_client(settings.redis), settings.responses, settings.redis.key_prefix)
    return BatchLoop(
        group_consumer(settings, GROUP, group_suffix, **consumer_overrides), Producer(producer_config(settings.kafka)),
        ResponseProcessor(store, metrics=metrics), topics=[topics.feedback], dlq_topic=topics.dlq,
        max_batch=settings.worker.max_batch, metrics=metrics, **loop_options(settings.worker),
    )


def run_responses_worker(settings: Settings, *, metrics_port: int | None = None) -> None:
    metrics = WorkerMetrics("responses")
    metrics.serve(metrics_port if metrics_port is not None else settings.worker.metrics_port)
    loop = build_responses_loop(settings, metrics=metrics)
    install_stop_signals(loop.stop)
    log.info("responses worker consuming %s", loop.topics)
    loop.run()
    log.info("responses worker stopped after %d records in %d batches", loop.records, loop.batches)
