"""Per-user profile logic: pure functions of (state, event, now).

An event is first turned into a `ProfileUpdate` (what it contributes: which counter, which
categories with which weight, which product, which money). `apply_update` merges an update
into a `ProfileState`; the Redis store runs the very same merge in Lua (profile.lua), so the
in-memory store, the unit tests and the integration tests all check one definition.

Merges are order-independent, so late events are safe:
- counters add, first/last seen take min/max of event time;
- a category affinity is kept as (value, ref_ms): the decayed sum of credits as of ref_ms,
  the newest event time seen for that category. A newer credit decays the value forward,
  an older one is added already decayed: value = Σ w_i · 2^(-(ref - t_i)/half_life);
- recent products keep each product's newest event time and the top N of those.
Duplicates (same event_id within the dedupe window) take effect once.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

from core.contracts import Event, EventType, Profile, format_ts
from core.settings import ProfileSettings


@dataclass(frozen=True, slots=True)
class ProfileUpdate:
    """What one event contributes to its user's profile."""

    event_id: str
    user_id: str
    type: str
    ts: int
    product_id: str | None = None  # set when the product enters recent_products
    cart_add: float = 0.0
    purchase_add: float = 0.0
    affinity: tuple[tuple[str, float], ...] = ()


@dataclass
class ProfileState:
    """Storage-level profile of one user (what the Redis hash and sorted sets hold)."""

    version: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    cart_value: float = 0.0
    purchase_value: float = 0.0
    affinity: dict[str, tuple[float, int]] = field(default_factory=dict)  # cat -> (value, ref_ms)
    recent: dict[str, int] = field(default_factory=dict)  # product -> newest event ms
    seen: dict[str, int] = field(default_factory=dict)  # event_id -> applied-at ms (dedupe)


@functools.lru_cache(maxsize=4096)
def category_credits(category: str | None, weight: float, depth: int) -> tuple[tuple[str, float], ...]:
    """electronics/audio/headphones -> electronics, electronics/audio, ... (up to depth) and the full path."""
    if not category or weight == 0.0:
        return ()
    parts = category.split("/")
    cats = ["/".join(parts[: i + 1]) for i in range(min(len(parts), depth))]
    if category not in cats:
        cats.append(category)
    return tuple((c, weight) for c in cats)


def event_update(event: Event, cfg: ProfileSettings) -> ProfileUpdate:
    """The contribution of one valid event (pure)."""
    etype = event.type.value
    money = (event.price or 0.0) * (event.quantity or 1) if event.price is not None else 0.0
    return ProfileUpdate(
        event_id=event.event_id,
        user_id=event.user_id,
        type=etype,
        ts=event.ts,
        product_id=event.product_id if etype in cfg.recent_types else None,
        cart_add=money if event.type == EventType.ADD_TO_CART else 0.0,
        purchase_add=money if event.type == EventType.PURCHASE else 0.0,
        affinity=category_credits(event.category, cfg.type_weights.get(etype, 0.0), cfg.category_depth),
    )


def decay(value: float, from_ms: int, to_ms: int, half_life_ms: float) -> float:
    return value * 2.0 ** (-(to_ms - from_ms) / half_life_ms)


def apply_update(
    state: ProfileState, upd: ProfileUpdate, now_ms: int, cfg: ProfileSettings
) -> tuple[ProfileState, bool]:
    """Merge one update; returns (new state, applied?). The input state is not modified.

    Mirrors profile.lua line by line; keep the two in step.
    """
    s = copy.deepcopy(state)
    window_ms = cfg.dedupe_window_s * 1000
    s.seen = {k: t for k, t in s.seen.items() if t >= now_ms - window_ms}
    if upd.event_id in s.seen:
        return s, False
    s.seen[upd.event_id] = now_ms
    s.version += 1
    s.counts[upd.type] = s.counts.get(upd.type, 0) + 1
    if s.first_ms is None or upd.ts < s.first_ms:
        s.first_ms = upd.ts
    if s.last_ms is None or upd.ts > s.last_ms:
        s.last_ms = upd.ts
    if upd.cart_add:
        s.cart_value = s.cart_value + upd.cart_add
    if upd.purchase_add:
        s.purchase_value = s.purchase_value + upd.purchase_add
    hl = cfg.half_life_s * 1000.0
    for cat, w in upd.affinity:
        cur = s.affinity.get(cat)
        if cur is None:
            s.affinity[cat] = (w, upd.ts)
        else:
            value, ref = cur
            if upd.ts >= ref:
                s.affinity[cat] = (value * 2.0 ** (-(upd.ts - ref) / hl) + w, upd.ts)
            else:
                s.affinity[cat] = (value + w * 2.0 ** (-(ref - upd.ts) / hl), ref)
    if cfg.max_categories and len(s.affinity) > cfg.max_categories:
        s.affinity = top_categories(s.affinity, s.last_ms or upd.ts, hl, cfg.max_categories)
    if upd.product_id is not None:
        if upd.ts > s.recent.get(upd.product_id, -1):
            s.recent[upd.product_id] = upd.ts
        if len(s.recent) > cfg.recent_products:
            keep = sorted(s.recent.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
            s.recent = dict(keep[: cfg.recent_products])
    return s, True


def top_categories(affinity: dict[str, tuple[float, int]], at_ms: int, half_life_ms: float,
                   n: int) -> dict[str, tuple[float, int]]:
    """The ``n`` categories with the highest affinity decayed to ``at_ms``; ties by name, byte order
    (profile.lua ranks the same way)."""
    ranked = sorted(affinity.items(),
                    key=lambda kv: (-(kv[1][0] * 2.0 ** (-(at_ms - kv[1][1]) / half_life_ms)), kv[0].encode()))
    return dict(ranked[:n])


def cap_seen(seen: dict[str, int], n: int) -> dict[str, int]:
    """The ``n`` newest dedupe marks (by time, then id: a Redis sorted set's order)."""
    if not n or len(seen) <= n:
        return seen
    return dict(sorted(seen.items(), key=lambda kv: (kv[1], kv[0].encode()))[-n:])


def apply_event(
    state: ProfileState, event: Event, now_ms: int, cfg: ProfileSettings
) -> tuple[ProfileState, bool]:
    """The profile processor: (state, event, now) -> (state', applied?)."""
    return apply_update(state, event_update(event, cfg), now_ms, cfg)


def replay(events: Iterable[Event], cfg: ProfileSettings, now_ms: int = 0) -> dict[str, ProfileState]:
    """Fold events into per-user states (what a fault-free worker must end with)."""
    states: dict[str, ProfileState] = {}
    for ev in events:
        st = states.get(ev.user_id, ProfileState())
        states[ev.user_id], _ = apply_event(st, ev, now_ms, cfg)
    return states


def render(user_id: str, s: ProfileState, cfg: ProfileSettings) -> Profile:
    """Storage state -> contract Profile JSON (affinities decayed to last_seen)."""
    assert s.first_ms is not None and s.last_ms is not None
    hl = cfg.half_life_s * 1000.0
    last = s.last_ms
    affinity = {c: decay(v, ref, last, hl) for c, (v, ref) in s.affinity.items()}
    recent = [p for p, _ in sorted(s.recent.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]
    return Profile(
        user_id=user_id,
        event_counts=dict(sorted(s.counts.items())),
        category_affinity=dict(sorted(affinity.items(), key=lambda kv: -kv[1])),
        recent_products=recent[: cfg.recent_products],
        first_seen=format_ts(s.first_ms),
        last_seen=format_ts(last),
        cart_value=s.cart_value,
        purchase_value=s.purchase_value,
        profile_version=s.version,
    )
