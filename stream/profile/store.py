"""Where profiles live: Redis (production) and an in-memory fake (unit tests).

Both implement `ProfileStore`. The Redis store applies a batch as one pipeline of EVALSHA
calls, each for up to ``profile.users_per_call`` users (all of a user's updates in the batch, in
order), each user's atomic thanks to Lua. Keys carry the user id as a hash tag, so they are Redis Cluster safe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import orjson
import redis
import redis.asyncio as aredis
from redis.crc import key_slot

from core.settings import ProfileSettings
from stream.profile.logic import ProfileState, ProfileUpdate, apply_update, cap_seen
from stream.redis_io import TRANSIENT_REDIS_ERRORS, LuaScript, TransientStoreError, is_cluster


class ProfileStore(Protocol):
    def apply(self, updates: Sequence[ProfileUpdate], now_ms: int) -> list[bool]:
        """Apply updates in order; True where an update took effect, False for a duplicate."""
        ...

    def load(self, user_id: str) -> ProfileState | None: ...

    def ping(self) -> bool: ...


class InMemoryProfileStore:
    """A real (not mocked) store for unit tests: the pure merge over a dict."""

    def __init__(self, cfg: ProfileSettings) -> None:
        self.cfg = cfg
        self.states: dict[str, ProfileState] = {}
        self.forgotten: dict[str, int] = {}  # user -> forget time: events dated before it take no effect
        self.down = False  # tests flip this to simulate an outage

    def apply(self, updates: Sequence[ProfileUpdate], now_ms: int) -> list[bool]:
        if self.down:
            raise TransientStoreError("in-memory store is down")
        out = []
        for u in updates:
            if u.ts <= self.forgotten.get(u.user_id, -1):
                out.append(False)
                continue
            st, applied = apply_update(self.states.get(u.user_id, ProfileState()), u, now_ms, self.cfg)
            self.states[u.user_id] = st
            out.append(applied)
        for user in {u.user_id for u in updates}:  # marks are capped once per user per batch, as profile.lua does
            if user in self.states:
                self.states[user].seen = cap_seen(self.states[user].seen, self.cfg.max_seen)
        return out

    def load(self, user_id: str) -> ProfileState | None:
        return self.states.get(user_id)

    def ping(self) -> bool:
        return not self.down


class ProfileKeys:
    def __init__(self, prefix: str = "lc:") -> None:
        self.prefix = prefix

    def of(self, user_id: str) -> tuple[str, str, str]:
        tag = f"{self.prefix}{{{user_id}}}"
        return f"{tag}:p", f"{tag}:r", f"{tag}:s"

    def tombstone(self, user_id: str) -> str:
        """Set when a shopper is forgotten (value: the time, ms): events dated before it take no effect."""
        return f"{self.prefix}{{{user_id}}}:gone"


def encode_update(u: ProfileUpdate) -> bytes:
    d: dict[str, Any] = {"i": u.event_id, "y": u.type, "t": u.ts}
    if u.product_id is not None:
        d["p"] = u.product_id
    if u.cart_add:
        d["c"] = u.cart_add
    if u.purchase_add:
        d["u"] = u.purchase_add
    if u.affinity:
        d["a"] = u.affinity
    return orjson.dumps(d)


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def state_from_redis(
    h: Mapping[bytes | str, bytes | str],
    recent: Sequence[tuple[bytes | str, float]],
    seen: Sequence[tuple[bytes | str, float]] = (),
) -> ProfileState | None:
    """Parse the raw hash / sorted sets back into a ProfileState (pure)."""
    if not h:
        return None
    f = {_s(k): _s(v) for k, v in h.items()}
    st = ProfileState(
        version=int(f.get("v", 0)),
        first_ms=int(float(f["f"])) if "f" in f else None,
        last_ms=int(float(f["l"])) if "l" in f else None,
        cart_value=float(f.get("cv", 0.0)),
        purchase_value=float(f.get("pv", 0.0)),
    )
    for k, v in f.items():
        if k.startswith("n:"):
            st.counts[k[2:]] = int(v)
        elif k.startswith("a:"):
            cat = k[2:]
            st.affinity[cat] = (float(v), int(float(f["t:" + cat])))
    st.recent = {_s(m): int(sc) for m, sc in recent}
    st.seen = {_s(m): int(sc) for m, sc in seen}
    return st


class RedisProfileStore:
    def __init__(self, client: redis.Redis, cfg: ProfileSettings, key_prefix: str = "lc:") -> None:
        self.client = client
        self.cfg = cfg
        self.keys = ProfileKeys(key_prefix)
        self.script = LuaScript(client, "profile/profile.lua")
        self.cluster = is_cluster(client)

    def _args(self, now_ms: int) -> list[Any]:
        return [
            now_ms,
            self.cfg.dedupe_window_s * 1000,
            self.cfg.recent_products,
            self.cfg.half_life_s * 1000.0,
            self.cfg.ttl_s * 1000,
            self.cfg.max_categories,
            self.cfg.max_seen,
        ]

    def call(self, users: Sequence[tuple[str, Sequence[ProfileUpdate]]], now_ms: int) -> tuple[list[str], list[Any]]:
        """(keys, args) of one profile.lua call applying each user's updates, in order."""
        keys: list[str] = []
        args: list[Any] = self._args(now_ms)
        for user, us in users:
            keys += (*self.keys.of(user), self.keys.tombstone(user))
            args.append(len(us))
            args += map(encode_update, us)
        return keys, args

    def apply(self, updates: Sequence[ProfileUpdate], now_ms: int) -> list[bool]:
        """One profile.lua call per ``users_per_call`` users (on a cluster: users of one slot), pipelined."""
        by_user: dict[str, list[int]] = {}
        for i, u in enumerate(updates):
            by_user.setdefault(u.user_id, []).append(i)
        groups: dict[int, list[str]] = {}
        if self.cluster:  # a call's keys must be in one slot: users group by the slot of their hash tag
            for user in by_user:
                groups.setdefault(key_slot(self.keys.of(user)[0].encode()), []).append(user)
        else:
            groups[0] = list(by_user)
        n = self.cfg.users_per_call
        chunks = [users[i:i + n] for users in groups.values() for i in range(0, len(users), n)]
        results = self.script.run([self.call([(user, [updates[i] for i in by_user[user]]) for user in chunk], now_ms)
                                   for chunk in chunks])
        out = [False] * len(updates)
        for chunk, flags in zip(chunks, results, strict=True):
            idxs = [i for user in chunk for i in by_user[user]]
            for i, flag in zip(idxs, flags, strict=True):
                out[i] = bool(flag)
        return out

    def load(self, user_id: str) -> ProfileState | None:
        p, r, s = self.keys.of(user_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(p)
        pipe.zrange(r, 0, -1, withscores=True)
        pipe.zrange(s, 0, -1, withscores=True)
        h, recent, seen = pipe.execute()
        return state_from_redis(h, recent, seen)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except TRANSIENT_REDIS_ERRORS:
            return False


class AsyncProfileReader:
    """Read side for the HTTP API (redis.asyncio)."""

    def __init__(self, client: aredis.Redis, key_prefix: str = "lc:") -> None:
        self.client = client
        self.keys = ProfileKeys(key_prefix)

    async def load(self, user_id: str) -> ProfileState | None:
        p, r, _s_key = self.keys.of(user_id)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(p)
            pipe.zrange(r, 0, -1, withscores=True)
            h, recent = await pipe.execute()
        return state_from_redis(h, recent)
