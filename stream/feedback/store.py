"""The feedback joiner's state in Redis (production); see stream/feedback/logic.py for the logic.

State is split into ``shards`` Redis hash slots by ``crc32(copy_id)``: a copy record and all
impressions and clicks of that copy live under ``<prefix>fb:{N}:``, so one EVALSHA of
feedback.lua per shard applies a batch atomically and the keys are Redis Cluster safe. A batch
is one pipeline: one call per shard that has items. Sweeps claim due impressions of every shard
in one pipeline as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import orjson
import redis

from core.settings import FeedbackSettings
from stream.feedback.logic import Claimed, CtrStats, Decision, ImpressionState, Item, shard_of
from stream.redis_io import TRANSIENT_REDIS_ERRORS, LuaScript, TransientStoreError


class FeedbackStore(Protocol):
    def apply(self, items: Sequence[Item], now_ms: int) -> list[bool]:
        """Merge items; True where an item changed the state, False for a duplicate."""
        ...

    def claim(self, now_ms: int, token: str, limit: int | None = None) -> list[Claimed]:
        """Claim the impressions due at ``now_ms`` for emission (emit or orphan)."""
        ...

    def ack(self, done: Sequence[tuple[Claimed, list[str]]], now_ms: int) -> int:
        """Mark emitted impressions done and count them in the CTR aggregates."""
        ...

    def stats(self) -> CtrStats: ...

    def ping(self) -> bool: ...


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def state_from_json(imp: str, raw: bytes | str) -> ImpressionState:
    h: dict[str, str] = orjson.loads(raw) if raw not in (b"{}", "{}", b"[]", "[]") else {}
    return ImpressionState(
        impression_id=imp, copy_id=h.get("c", ""), user_id=h.get("u", ""), product_id=h.get("p", ""),
        slot=h.get("sl"), imp_ts=int(h["it"]) if "it" in h else None, imp_seen=int(h["is"]) if "is" in h else None,
        click_ts=int(h["ct"]) if "ct" in h else None, click_seen=int(h["cs"]) if "cs" in h else None,
        source=h.get("src", ""),
    )


class RedisFeedbackStore:
    def __init__(self, client: redis.Redis, cfg: FeedbackSettings, key_prefix: str = "lc:") -> None:
        self.client = client
        self.cfg = cfg
        self.key_prefix = key_prefix
        self.script = LuaScript(client, "feedback/feedback.lua")

    def shard_prefix(self, shard: int) -> str:
        return f"{self.key_prefix}fb:{{{shard}}}:"

    def _keys(self, shard: int) -> tuple[str, str]:
        p = self.shard_prefix(shard)
        return p + "due", p + "ctr"

    def _timing(self) -> list[Any]:
        c = self.cfg
        return [int(c.window_s * 1000), int(c.lateness_s * 1000), int(c.copy_wait_s * 1000),
                int(c.orphan_wait_s * 1000)]

    def _run(self, calls: list[tuple[int, list[Any]]]) -> list[Any]:
        """One pipeline of EVALSHA calls (shard, args after the prefix)."""
        return self.script.run([(self._keys(shard), [args[0], self.shard_prefix(shard), *args[1:]])
                                for shard, args in calls])

    def apply(self, items: Sequence[Item], now_ms: int) -> list[bool]:
        head = ["apply", now_ms, *self._timing(), int(self.cfg.state_ttl_s * 1000)]
        return self.script.run_grouped(
            items, lambda it: shard_of(it.copy_id, self.cfg.shards),
            lambda shard, its: (self._keys(shard), [head[0], self.shard_prefix(shard), *head[1:],
                                                    *(a for it in its for a in it.to_args())]))

    def claim(self, now_ms: int, token: str, limit: int | None = None) -> list[Claimed]:
        args = ["claim", now_ms, *self._timing(), token, limit or self.cfg.sweep_limit,
                int(self.cfg.reclaim_s * 1000), int(self.cfg.state_ttl_s * 1000)]
        out: list[Claimed] = []
        for res in self._run([(s, args) for s in range(self.cfg.shards)]):
            for imp, hjson, copy, kind, clicked, reason, rval, rkey in res:
                st = state_from_json(_s(imp), hjson)
                if rval is not None:
                    st.raw_key, st.raw_value = (bytes(rkey) if rkey is not None else None), bytes(rval)
                out.append(Claimed(
                    st, Decision(_s(kind), clicked=bool(clicked), reason=_s(reason)),  # type: ignore[arg-type]
                    token, bytes(copy) if copy else None,
                ))
        return out

    def ack(self, done: Sequence[tuple[Claimed, list[str]]], now_ms: int) -> int:
        by_shard: dict[int, list[bytes]] = {}
        for c, dims in done:
            a = orjson.dumps({"i": c.state.impression_id, "t": c.token, "k": int(c.decision.clicked), "d": dims})
            by_shard.setdefault(shard_of(c.state.copy_id, self.cfg.shards), []).append(a)
        head = ["ack", now_ms, int(self.cfg.done_ttl_s * 1000)]
        return sum(int(r) for r in self._run([(s, head + acks) for s, acks in by_shard.items()]))

    def stats(self) -> CtrStats:
        try:
            pipe = self.client.pipeline(transaction=False)
            for s in range(self.cfg.shards):
                pipe.hgetall(self._keys(s)[1])
            fields: dict[str, int] = {}
            for h in pipe.execute():
                for k, v in h.items():
                    fields[_s(k)] = fields.get(_s(k), 0) + int(v)
        except TRANSIENT_REDIS_ERRORS as exc:
            raise TransientStoreError(f"redis unavailable: {exc}") from exc
        return CtrStats.from_fields(fields)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except TRANSIENT_REDIS_ERRORS:
            return False
