"""Each shopper's style-response counters in Redis: responses.lua applies a shopper's batch atomically
(deduped by impression id), the async reader serves the copy API. Keys carry the user id as a hash tag."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import orjson
import redis
import redis.asyncio as aredis

from core.process import wall_ms
from core.settings import ResponseSettings
from core.styles import StyleResponse
from stream.redis_io import TRANSIENT_REDIS_ERRORS, LuaScript
from stream.responses.logic import ResponseUpdate, response_from_hash


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
        self.script = LuaScript(client, "responses/responses.lua")

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
