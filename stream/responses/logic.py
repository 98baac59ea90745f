"""Each shopper's response to copy styles: `livecopy.feedback` -> per-user counters in Redis.

For every labelled impression the feedback topic carries the style the copy was written in and
the CTR its model predicted (``score``). Per shopper and style this worker adds the clicks
observed and the clicks expected (the sum of the predicted CTRs); the copy service reads them back
as a :class:`engine.policy.StyleResponse` -- observed over expected, shrunk towards 1 by a Gamma
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
from typing import Protocol

from core.contracts import FeedbackRecord, is_user_id
from core.process import wall_ms
from core.settings import ResponseSettings
from core.styles import STYLES, StyleResponse
from core.wire import Rejection
from stream.redis_io import TransientStoreError

log = logging.getLogger(__name__)


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
