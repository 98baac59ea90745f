"""Feedback joining: impressions + clicks + copy records -> one labelled record per impression.

Pure logic, no I/O. Three kinds of input change the state of one impression (keyed by
``impression_id``): the impression event, click events naming it, and the copy record of its
``copy_id`` (from ``livecopy.copy``). They may arrive in any order, more than once, and a click
may come before its impression. :func:`decide` looks at an impression's state and says what is
due: emit it (clicked or not), wait until a given time, give up on it (an orphan, which goes to
the DLQ with the reason), or nothing (already emitted).

Timing (all in epoch ms; event time for the window, arrival time for waiting):

* a click counts when ``click_ts <= impression_ts + window`` (a click stamped before its
  impression counts too: device clocks differ);
* a clicked impression is due as soon as impression, click and copy record are all there;
* an unclicked one is due at ``close_at = max(impression_ts + window, impression_seen) + lateness``
  -- the window in event time, but never sooner than ``lateness`` after the impression arrived,
  so a replay of old events still gives its clicks time to arrive;
* a decided impression whose copy record is missing waits ``copy_wait`` more, then is an orphan
  (``copy_not_found``); a click whose impression never arrives is an orphan after ``orphan_wait``
  (``impression_not_found``).

Orphans go to the DLQ as the original record (key and value bytes, unchanged): the state keeps the
key and bytes of the record its ``source`` names -- the impression's, else the first click's -- until
the impression is done.

Emission is claim -> produce -> ack: :func:`claim` marks the impression ``emitting`` with a
token and reschedules it ``reclaim`` later; once the feedback record is acknowledged by the
broker, :func:`ack` marks it ``done`` (a tombstone that makes re-deliveries no-ops) and counts it
in the CTR aggregates. A worker killed between produce and ack leaves an ``emitting`` state that
is claimed again after ``reclaim``: at-least-once, the duplicate carrying the same
``impression_id`` (consumers dedupe on it). stream/feedback/feedback.lua mirrors :func:`apply_item`,
:func:`decide`, :func:`claim` and :func:`ack` for Redis; keep them in step.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson

from core.contracts import Event, EventType, FeedbackRecord, GeneratedCopy, format_ts
from core.settings import FeedbackSettings

OPEN, EMITTING, DONE = "o", "e", "d"


@dataclass(frozen=True, slots=True)
class Item:
    """One input of the joiner: an impression (``kind='i'``), a click (``'c'``) or a copy record (``'p'``)."""

    kind: Literal["i", "c", "p"]
    copy_id: str
    impression_id: str = ""
    user_id: str = ""
    product_id: str = ""
    ts: int = 0
    slot: str | None = None
    source: str = ""  # "topic|partition|offset" of the record, for the DLQ of orphans
    copy_json: bytes = b""  # kind 'p': the copy record (GeneratedCopy JSON)
    raw_key: bytes | None = None  # kinds 'i', 'c': the record's key and value as read (None: not kept),
    raw_value: bytes | None = None  # what goes to the DLQ if the impression turns out an orphan

    def to_args(self) -> list[bytes]:
        """The item as feedback.lua's apply takes it: its JSON, then -- when the record is kept (``"r"``) --
        the record's key (empty, with ``"nk"``, when it had none) and value, binary-safe."""
        if self.kind == "p":
            return [orjson.dumps({"k": "p", "c": self.copy_id, "j": self.copy_json.decode()})]
        d: dict[str, Any] = {"k": self.kind, "c": self.copy_id, "i": self.impression_id, "u": self.user_id,
                             "p": self.product_id, "t": self.ts, "src": self.source}
        if self.slot is not None:
            d["sl"] = self.slot
        if self.raw_value is None:
            return [orjson.dumps(d)]
        d["r"] = 1
        if self.raw_key is None:
            d["nk"] = 1
        return [orjson.dumps(d), self.raw_key or b"", self.raw_value]


def event_item(ev: Event, source: str = "", key: bytes | None = None, value: bytes | None = None) -> Item | None:
    """The joiner's view of an event (None for event types it does not use); ``key`` and ``value``
    are the record as read, kept for the DLQ."""
    if ev.type not in (EventType.IMPRESSION, EventType.CLICK):
        return None
    assert ev.impression_id is not None and ev.copy_id is not None and ev.product_id is not None
    return Item(
        kind="i" if ev.type == EventType.IMPRESSION else "c", copy_id=ev.copy_id, impression_id=ev.impression_id,
        user_id=ev.user_id, product_id=ev.product_id, ts=ev.ts, slot=ev.slot, source=source,
        raw_key=key if value is not None else None, raw_value=value,
    )


def copy_item(copy: GeneratedCopy) -> Item:
    return Item(kind="p", copy_id=copy.copy_id, copy_json=copy.model_dump_json(exclude_none=True).encode())


def shard_of(copy_id: str, shards: int) -> int:
    """Everything about one copy (its record, its impressions) lives in one shard."""
    return zlib.crc32(copy_id.encode()) % shards


@dataclass
class ImpressionState:
    """What the joiner knows about one impression (the Redis hash ``...:i:<impression_id>``)."""

    impression_id: str
    copy_id: str = ""
    user_id: str = ""
    product_id: str = ""
    slot: str | None = None
    imp_ts: int | None = None  # impression event time
    imp_seen: int | None = None  # arrival (processing) time of the first impression record
    click_ts: int | None = None  # earliest click event time
    click_seen: int | None = None  # arrival time of the first click record
    source: str = ""
    raw_key: bytes | None = None  # key and value of the record ``source`` names (None: not kept);
    raw_value: bytes | None = None  # let go once the impression is done
    status: str = OPEN
    token: str = ""


def apply_item(st: ImpressionState | None, item: Item, now_ms: int) -> tuple[ImpressionState, bool]:
    """Merge an impression or click into its state; (new state, changed?). Idempotent and
    order-independent: the first impression wins, the earliest click time wins."""
    s = replace(st) if st is not None else ImpressionState(item.impression_id)
    if s.status == DONE:
        return s, False
    if item.kind == "i":
        if s.imp_ts is not None:
            return s, False
        s.copy_id, s.user_id, s.product_id, s.slot = item.copy_id, item.user_id, item.product_id, item.slot
        s.imp_ts, s.imp_seen, s.source = item.ts, now_ms, item.source
        s.raw_key, s.raw_value = item.raw_key, item.raw_value
        return s, True
    if item.kind == "c":
        changed = False
        if s.click_ts is None or item.ts < s.click_ts:
            s.click_ts, changed = item.ts, True
        if s.click_seen is None:
            s.click_seen, changed = now_ms, True
        if s.imp_ts is None and not s.copy_id:
            s.copy_id, s.user_id, s.product_id, s.slot, s.source = (
                item.copy_id, item.user_id, item.product_id, item.slot, item.source)
            s.raw_key, s.raw_value = item.raw_key, item.raw_value
        return s, changed
    raise ValueError(f"apply_item takes impressions and clicks, not {item.kind!r}")


@dataclass(frozen=True)
class Decision:
    kind: Literal["emit", "wait", "orphan", "drop"]
    clicked: bool = False
    at: int = 0  # kind 'wait': when to look again
    reason: str = ""  # kind 'orphan'


def clicked_in_window(s: ImpressionState, window_ms: int) -> bool:
    return s.imp_ts is not None and s.click_ts is not None and s.click_ts <= s.imp_ts + window_ms


def decide(s: ImpressionState, copy_present: bool, now_ms: int, cfg: FeedbackSettings) -> Decision:
    """What is due for this impression at ``now_ms`` (pure; see the module docstring)."""
    if s.status == DONE:
        return Decision("drop")
    if s.imp_ts is None or s.imp_seen is None:
        assert s.click_seen is not None
        deadline = s.click_seen + int(cfg.orphan_wait_s * 1000)
        if now_ms >= deadline:
            return Decision("orphan", reason="impression_not_found")
        return Decision("wait", at=deadline)
    window_ms = int(cfg.window_s * 1000)
    close_at = max(s.imp_ts + window_ms, s.imp_seen) + int(cfg.lateness_s * 1000)
    clicked = clicked_in_window(s, window_ms)
    if not clicked and now_ms < close_at:
        return Decision("wait", at=close_at)
    if copy_present:
        return Decision("emit", clicked=clicked)
    decided_at = max(s.imp_seen, s.click_seen or 0) if clicked else close_at
    deadline = decided_at + int(cfg.copy_wait_s * 1000)
    if now_ms >= deadline:
        return Decision("orphan", clicked=clicked, reason="copy_not_found")
    return Decision("wait", at=deadline)


@dataclass
class Claimed:
    """An impression claimed for emission (a feedback record, or an orphan for the DLQ)."""

    state: ImpressionState
    decision: Decision
    token: str
    copy_json: bytes | None = None

    @property
    def shard_key(self) -> str:
        return self.state.copy_id


def top_category(features: Mapping[str, Any] | None) -> str:
    try:
        cat = str(features["product"]["category"]) if features else ""
    except (KeyError, TypeError):
        cat = ""
    return cat.split("/")[0] if cat else "unknown"


def feedback_record(c: Claimed) -> FeedbackRecord:
    """The ``livecopy.feedback`` record of an emitted impression."""
    s = c.state
    assert c.copy_json is not None and s.imp_ts is not None
    copy = GeneratedCopy.model_validate_json(c.copy_json)
    clicked = c.decision.clicked
    return FeedbackRecord(
        impression_id=s.impression_id, copy_id=s.copy_id, user_id=s.user_id, product_id=s.product_id,
        model_version=copy.model_version, text=copy.text, clicked=clicked, impression_ts=format_ts(s.imp_ts),
        click_ts=format_ts(s.click_ts) if clicked and s.click_ts is not None else None,
        features=copy.features or {}, model=copy.model, policy=copy.policy, propensity=copy.propensity,
        score=copy.score, style=copy.style, slot=s.slot if s.slot is not None else copy.slot,
        template=copy.template, embedding=copy.embedding,
    )


def aggregate_fields(rec: FeedbackRecord) -> list[str]:
    """CTR aggregate dimensions of one feedback record: ``<dim>|<value>`` (counts ``n|..`` and
    clicks ``k|..`` are kept for each)."""
    return [
        f"mv|{rec.model or '-'}@{rec.model_version}",
        f"pol|{rec.policy or '-'}",
        f"cat|{top_category(rec.features)}",
        f"style|{rec.style or '-'}",
        "all|all",
    ]


def dlq_record(c: Claimed) -> tuple[bytes | None, bytes]:
    """(key, value) that goes to the DLQ for a claimed impression: the record its ``source`` names, as
    it was read. A state written before the record was kept has only the rebuilt event."""
    s = c.state
    if s.raw_value is not None:
        return s.raw_key, s.raw_value
    return s.user_id.encode() or None, rebuilt_event(c)


def rebuilt_event(c: Claimed) -> bytes:
    """The impression (or click) event rebuilt from the state (not the original: another event_id,
    no category/price/props); only for states written before the original record was kept."""
    s = c.state
    is_imp = s.imp_ts is not None
    d: dict[str, Any] = {
        "event_id": f"{s.impression_id}:{'impression' if is_imp else 'click'}",
        "type": "impression" if is_imp else "click", "user_id": s.user_id,
        "ts": s.imp_ts if is_imp else s.click_ts, "product_id": s.product_id, "impression_id": s.impression_id,
        "copy_id": s.copy_id,
    }
    if s.slot is not None:
        d["slot"] = s.slot
    return orjson.dumps(d)


@dataclass
class CtrStats:
    """CTR aggregates summed over shards: dim -> value -> (impressions, clicks)."""

    by: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)

    @classmethod
    def from_fields(cls, fields: Mapping[str, int]) -> CtrStats:
        acc: dict[str, dict[str, list[int]]] = {}
        for name, v in fields.items():
            kind, dim, value = name.split("|", 2)
            slot = acc.setdefault(dim, {}).setdefault(value, [0, 0])
            slot[0 if kind == "n" else 1] += int(v)
        return cls({d: {k: (n, c) for k, (n, c) in vals.items()} for d, vals in acc.items()})

    def ctr(self, dim: str, value: str) -> float:
        n, k = self.by.get(dim, {}).get(value, (0, 0))
        return k / n if n else float("nan")

    def to_json_dict(self) -> dict[str, dict[str, dict[str, float]]]:
        return {d: {v: {"impressions": n, "clicks": k, "ctr": (k / n if n else 0.0)} for v, (n, k) in vals.items()}
                for d, vals in self.by.items()}


class InMemoryFeedbackStore:
    """The joiner state over dicts: the same functions the Lua script mirrors (unit tests)."""

    def __init__(self, cfg: FeedbackSettings) -> None:
        self.cfg = cfg
        self.states: dict[str, ImpressionState] = {}
        self.copies: dict[str, bytes] = {}
        self.due: dict[str, int] = {}
        self.waiting: dict[str, set[str]] = {}
        self.ctr: dict[str, int] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            from stream.redis_io import TransientStoreError

            raise TransientStoreError("in-memory store is down")

    def apply(self, items: Sequence[Item], now_ms: int) -> list[bool]:
        self._check()
        out = []
        for it in items:
            if it.kind == "p":
                fresh = it.copy_id not in self.copies
                self.copies[it.copy_id] = it.copy_json
                for imp in self.waiting.pop(it.copy_id, set()):
                    if imp in self.due and self.due[imp] > now_ms:
                        self.due[imp] = now_ms
                out.append(fresh)
                continue
            st, changed = apply_item(self.states.get(it.impression_id), it, now_ms)
            self.states[it.impression_id] = st
            if changed and st.status == OPEN:
                self._schedule(st, now_ms)
            out.append(changed)
        return out

    def _schedule(self, st: ImpressionState, now_ms: int) -> None:
        present = st.copy_id in self.copies
        d = decide(st, present, now_ms, self.cfg)
        self.due[st.impression_id] = now_ms if d.kind in ("emit", "orphan") else d.at
        if not present:
            self.waiting.setdefault(st.copy_id, set()).add(st.impression_id)

    def claim(self, now_ms: int, token: str, limit: int | None = None) -> list[Claimed]:
        self._check()
        out: list[Claimed] = []
        limit = limit or self.cfg.sweep_limit
        per_shard: dict[int, int] = {}
        picked = []
        for imp in sorted((i for i, at in self.due.items() if at <= now_ms), key=lambda i: (self.due[i], i)):
            shard = shard_of(self.states[imp].copy_id, self.cfg.shards)  # the Redis store's limit is per shard
            if per_shard.get(shard, 0) < limit:
                per_shard[shard] = per_shard.get(shard, 0) + 1
                picked.append(imp)
        for imp in picked:
            st = self.states[imp]
            copy = self.copies.get(st.copy_id)
            d = decide(replace(st, status=OPEN) if st.status == EMITTING else st, copy is not None, now_ms, self.cfg)
            if d.kind == "drop":
                del self.due[imp]
            elif d.kind == "wait":
                self.due[imp] = d.at
                if copy is None:
                    self.waiting.setdefault(st.copy_id, set()).add(imp)
            else:
                st.status, st.token = EMITTING, token
                self.due[imp] = now_ms + int(self.cfg.reclaim_s * 1000)
                out.append(Claimed(replace(st), d, token, copy))
        return out

    def ack(self, done: Sequence[tuple[Claimed, list[str]]], now_ms: int) -> int:
        """Mark claimed impressions done (when still held by the same token) and count the
        aggregates; returns how many took effect."""
        self._check()
        n = 0
        for c, dims in done:
            st = self.states.get(c.state.impression_id)
            if st is None or st.status != EMITTING or st.token != c.token:
                continue
            st.status = DONE
            st.raw_key = st.raw_value = None
            self.due.pop(st.impression_id, None)
            for dim in dims:
                self.ctr["n|" + dim] = self.ctr.get("n|" + dim, 0) + 1
                if c.decision.clicked:
                    self.ctr["k|" + dim] = self.ctr.get("k|" + dim, 0) + 1
            n += 1
        return n

    def stats(self) -> CtrStats:
        return CtrStats.from_fields(self.ctr)

    def next_due(self) -> int | None:
        return min(self.due.values()) if self.due else None

    def ping(self) -> bool:
        return not self.down
