"""A token bucket per API key in Redis, taken atomically by one Lua call: ``rate`` tokens a second up
to ``burst``; a request that finds none is told how long to wait. Keys are ``<prefix>{rl:<id>}``."""

from __future__ import annotations

import math
from typing import Any

import redis.asyncio as aredis

# KEYS[1] bucket; ARGV rate/s, burst, now (ms), cost. Returns {allowed 0|1, wait in ms}.
_TAKE = """
local rate, burst, now, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 't', 'at')
local tokens, at = tonumber(b[1]), tonumber(b[2])
if tokens == nil then tokens, at = burst, now end
if now > at then tokens = math.min(burst, tokens + (now - at) * rate / 1000.0) end
local allowed, wait = 0, 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = math.ceil((cost - tokens) * 1000.0 / rate)
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'at', tostring(math.max(now, at)))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000.0 / rate) + 1000)
return {allowed, wait}
"""


class RateLimiter:
    def __init__(self, client: aredis.Redis, prefix: str, rate_per_s: float, burst: int) -> None:
        self.prefix = prefix
        self.rate = rate_per_s
        self.burst = burst
        self._take: Any = client.register_script(_TAKE)

    async def take(self, key_id: str, now_ms: int, cost: int = 1) -> float:
        """0 when allowed, else the seconds to wait before the bucket has ``cost`` tokens."""
        if self.rate <= 0:
            return 0.0
        allowed, wait_ms = await self._take(keys=[f"{self.prefix}{{rl:{key_id}}}"],
                                            args=[self.rate, self.burst, now_ms, cost])
        return 0.0 if int(allowed) else max(0.001, int(wait_ms) / 1000.0)


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
