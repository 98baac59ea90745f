"""Token buckets in process memory, bounded: the collector's rates per publishable key and per client
(``POST /v1/events``). Unlike ``stream.access.ratelimit`` (one Redis bucket per API key, shared by
every API process) these cost no round trip, which matters for a browser-facing endpoint taking
every shopper's beacons; the price is that each API process counts alone (N processes behind a load
balancer allow up to N times the rate). At most ``max_entries`` buckets are kept: the least recently
used goes first (a bucket dropped starts full again when its client returns). Pure, clock injected."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    key: str
    rate_per_s: float  # tokens added per second (<= 0: unlimited)
    burst: float  # the bucket's size


class TokenBuckets:
    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max(1, max_entries)
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, as of)

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, limit: Limit, now: float) -> float:
        tokens, at = self._buckets.get(limit.key, (limit.burst, now))
        return min(limit.burst, tokens + max(0.0, now - at) * limit.rate_per_s)

    def take(self, limits: Sequence[Limit], cost: float = 1.0) -> float:
        """Take ``cost`` tokens from every bucket of ``limits``, or from none: 0.0 when taken, else the
        seconds until all of them hold enough. A cost above a bucket's size costs the whole bucket (a
        batch larger than the burst passes once the bucket is full)."""
        now = self.clock()
        active = [lim for lim in limits if lim.rate_per_s > 0]
        levels = [self._level(lim, now) for lim in active]
        wait = 0.0
        for lim, level in zip(active, levels, strict=True):
            need = min(cost, lim.burst)
            if level < need:
                wait = max(wait, (need - level) / lim.rate_per_s)
        for lim, level in zip(active, levels, strict=True):
            left = level if wait else level - min(cost, lim.burst)
            self._buckets[lim.key] = (left, now)
            self._buckets.move_to_end(lim.key)
        while len(self._buckets) > self.max_entries:
            self._buckets.popitem(last=False)
        return wait
