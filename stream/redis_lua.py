"""Running livecopy's Lua scripts in Redis: pipelined EVALSHA calls, transient errors named.

Every Redis-side merge (profile.lua, feedback.lua, responses.lua) is idempotent, so a batch can
be redone: when Redis lost its script cache (restart, SCRIPT FLUSH) the script is loaded again
and the whole pipeline re-run; an unreachable Redis surfaces as :class:`TransientStoreError`
(the worker's batch loop then pauses, backs off and rewinds).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from importlib import resources
from typing import Any, TypeVar

import redis
from redis.exceptions import NoScriptError

from livecopy.settings import RedisSettings

TRANSIENT_REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    OSError,
)


def redis_client(r: RedisSettings) -> redis.Redis:
    """A worker's Redis client: bounded connect and socket timeouts, so an outage is noticed."""
    return redis.Redis.from_url(r.url, socket_timeout=r.socket_timeout_s, socket_connect_timeout=r.socket_timeout_s)


class TransientStoreError(Exception):
    """The store cannot be reached right now; retry the batch later (nothing was lost)."""


T = TypeVar("T")
G = TypeVar("G", bound=Hashable)


class LuaScript:
    """One of ``stream/*.lua``, run as a pipeline of EVALSHA calls."""

    def __init__(self, client: redis.Redis, filename: str) -> None:
        self.client = client
        self.filename = filename
        self.source = resources.files("stream").joinpath(filename).read_text()
        self.sha: str | None = None

    def run(self, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Results of ``EVALSHA sha len(keys) *keys *args`` per call, in order, in one pipeline."""
        if not calls:
            return []
        try:
            if self.sha is None:
                self.sha = self.client.script_load(self.source)
            for _attempt in range(2):
                pipe = self.client.pipeline(transaction=False)
                for keys, args in calls:
                    pipe.evalsha(self.sha, len(keys), *keys, *args)
                results = pipe.execute(raise_on_error=False)
                if any(isinstance(r, NoScriptError) for r in results):
                    # Redis restarted or flushed its scripts: load again and redo the batch
                    # (calls that did apply are duplicates now and take no second effect).
                    self.sha = self.client.script_load(self.source)
                    continue
                break
            else:  # pragma: no cover - the script vanished twice in a row
                raise TransientStoreError(f"{self.filename} keeps disappearing from Redis")
        except TRANSIENT_REDIS_ERRORS as exc:
            raise TransientStoreError(f"redis unavailable: {exc}") from exc
        for r in results:
            if isinstance(r, TRANSIENT_REDIS_ERRORS):
                raise TransientStoreError(f"redis unavailable: {r}")
            if isinstance(r, Exception):
                raise r
        return list(results)

    def run_grouped(self, items: Sequence[T], group_of: Callable[[T], G],
                    call_of: Callable[[G, list[T]], tuple[Sequence[str], Sequence[Any]]]) -> list[bool]:
        """One call per group of ``items`` (a user, a shard: one Cluster slot), the groups'
        items in order; the script answers one flag per item, handed back in the items' order."""
        groups: dict[G, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(group_of(it), []).append(i)
        results = self.run([call_of(g, [items[i] for i in idxs]) for g, idxs in groups.items()])
        out = [False] * len(items)
        for idxs, res in zip(groups.values(), results, strict=True):
            for i, flag in zip(idxs, res, strict=True):
                out[i] = bool(flag)
        return out
