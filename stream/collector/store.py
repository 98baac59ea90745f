"""The collector's Redis state, per shopper (the user id is the hash tag: one Redis Cluster slot, and
``livecopy profile forget`` deletes it with the rest of the shopper's keys):

* ``P{<user_id>}:served``: the copy ids ``GET /v1/copy`` served the shopper (sorted set, member copy
  id, score the time served in ms), the newest ``collector.served_max``, for
  ``collector.served_ttl_s``: an impression or click naming a copy not in it goes to the DLQ
  (``unknown_copy``), not to ``livecopy.events``.
* ``P{<user_id>}:collected``: the event ids the collector wrote to ``livecopy.events`` (same form,
  ``collector.dedupe_max`` / ``dedupe_ttl_s``): a batch sent again (a beacon whose answer the page
  never saw, a retry after a lost answer) is answered ``duplicate`` and not written twice.

Both are remembered by one Lua script (add, drop the expired and the oldest beyond the cap, expire
the key), so a shopper's sets stay bounded whatever a page sends.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import NoScriptError

from core.settings import CollectorSettings
from stream.redis_io import TRANSIENT_REDIS_ERRORS

log = logging.getLogger(__name__)

# KEYS[1] the sorted set; ARGV now (ms), ttl (ms), cap, members...
_REMEMBER = """
local now, ttl, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4, #ARGV do redis.call('ZADD', KEYS[1], now, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
local n = redis.call('ZCARD', KEYS[1])
if n > cap then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - cap - 1) end
redis.call('PEXPIRE', KEYS[1], ttl)
return n
"""


class CollectorKeys:
    def __init__(self, prefix: str = "lc:") -> None:
        self.prefix = prefix

    def served(self, user_id: str) -> str:
        return f"{self.prefix}{{{user_id}}}:served"

    def collected(self, user_id: str) -> str:
        return f"{self.prefix}{{{user_id}}}:collected"


class CollectorStore:
    """Async (the API's client). ``lookup`` answers, for each shopper of a batch in one round trip,
    which of its event ids were written before and which of its copy ids were served to it."""

    def __init__(self, client: aredis.Redis, prefix: str, cfg: CollectorSettings) -> None:
        self.client = client
        self.keys = CollectorKeys(prefix)
        self.cfg = cfg
        self._remember: Any = client.register_script(_REMEMBER)

    @property
    def checks_served(self) -> bool:
        return self.cfg.served_ttl_s > 0

    async def record_served(self, user_id: str, copy_id: str, now_ms: int) -> None:
        """Remember that ``copy_id`` was served to ``user_id`` (GET /v1/copy). A Redis failure is
        logged, not raised: the copy is served anyway (an impression of it would go to the DLQ)."""
        if not self.checks_served:
            return
        try:
            await self._remember(keys=[self.keys.served(user_id)],
                                 args=[now_ms, self.cfg.served_ttl_s * 1000, self.cfg.served_max, copy_id])
        except TRANSIENT_REDIS_ERRORS as exc:
            log.warning("could not record served copy %s of %s: %s", copy_id, user_id, exc)

    async def lookup(self, wanted: Mapping[str, tuple[Sequence[str], Sequence[str]]],
                     now_ms: int) -> dict[str, tuple[set[str], set[str]]]:
        """``{user: (event ids, copy ids)}`` -> ``{user: (event ids written before, copy ids served)}``."""
        users = [u for u, (eids, cids) in wanted.items() if eids or cids]
        if not users:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for u in users:
            eids, cids = wanted[u]
            pipe.zmscore(self.keys.collected(u), list(eids) or ["-"])
            pipe.zmscore(self.keys.served(u), list(cids) or ["-"])
        got = await pipe.execute()
        written_after = now_ms - self.cfg.dedupe_ttl_s * 1000
        served_after = now_ms - self.cfg.served_ttl_s * 1000
        out: dict[str, tuple[set[str], set[str]]] = {}
        for n, u in enumerate(users):
            eids, cids = wanted[u]
            w, s = got[2 * n], got[2 * n + 1]
            out[u] = ({e for e, sc in zip(eids, w, strict=False) if sc is not None and sc > written_after},
                      {c for c, sc in zip(cids, s, strict=False) if sc is not None and sc > served_after})
        return out

    async def remember_written(self, written: Mapping[str, Sequence[str]], now_ms: int) -> None:
        """Remember the event ids acknowledged on ``livecopy.events``, per shopper (one round trip)."""
        users = [u for u, ids in written.items() if ids]
        if not users:
            return
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for u in users:
                await self._remember(keys=[self.keys.collected(u)],
                                     args=[now_ms, self.cfg.dedupe_ttl_s * 1000, self.cfg.dedupe_max, *written[u]],
                                     client=pipe)
            try:
                await pipe.execute()
                return
            except NoScriptError:  # a Redis Cluster pipeline does not load scripts: load it (every master), redo
                if attempt:
                    raise
                await self.client.script_load(_REMEMBER)
