"""The HTTP collector's pure part (``POST /v1/events``): a request body -> the batch's events, each
validated with the workers' own decoder (``core.wire.decode_event``), and the answer per event.

Bodies: a JSON array of events (or one event object), ``application/json``; JSON lines,
``application/x-ndjson``; ``text/plain`` (what ``navigator.sendBeacon`` sends for a string): an array
when it starts with ``[``, else JSON lines. Each event is validated as the profile worker would
validate the record: the same reasons (``missing_field``, ``bad_charset``, ``not_json``, ...).

Per event the answer is ``accepted`` (written to ``livecopy.events``, or written before: then
``duplicate``), ``rejected`` with a reason (nothing written to the events topic; ``unknown_copy``
goes to the DLQ: ``dlq``), or ``failed`` (the broker did not acknowledge it: send it again). The
request's status: 200 when all were accepted; 503 when any failed; when none was accepted and all
were refused alike, that refusal's status (422 invalid, 403 another shopper's event); else 207.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from core.contracts import IMPRESSION_REQUIRED, Event
from core.wire import Rejection, decode_event

ACCEPTED, REJECTED, FAILED = "accepted", "rejected", "failed"
JSON_TYPES = ("application/json", "")
LINES_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines", "application/json-seq")
TEXT_TYPES = ("text/plain",)


class BodyError(Exception):
    """The request as a whole is refused: ``status`` (400, 413, 415) and a short ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Item:
    """One event of a batch and what became of it."""

    index: int
    raw: bytes  # the bytes produced (a JSON-lines event as sent; an array element re-serialized)
    event: Event | None = None
    event_id: str | None = None  # for the answer, also of a rejected event when it names one
    status: str = ACCEPTED  # provisional until written
    reason: str | None = None
    detail: str | None = None
    code: int = 200  # the HTTP status this event alone would get
    duplicate: bool = False
    dlq: bool = False
    same_as: int | None = None  # an event id repeated in the batch: the index of its first occurrence

    def reject(self, reason: str, detail: str, code: int = 422) -> None:
        self.status, self.reason, self.detail, self.code = REJECTED, reason, detail, code

    def fail(self, detail: str) -> None:
        self.status, self.reason, self.detail, self.code = FAILED, "not_written", detail, 503

    @property
    def pending(self) -> bool:
        """Valid, allowed and not yet known: to be written (to the events topic, or the DLQ)."""
        return self.status == ACCEPTED and not self.duplicate and self.event is not None

    def answer(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "event_id": self.event_id, "status": self.status}
        if self.reason is not None:
            out["reason"] = self.reason
            out["detail"] = self.detail
        if self.duplicate:
            out["duplicate"] = True
        if self.dlq:
            out["dlq"] = True
        return out


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def split_body(body: bytes, content_type: str | None, max_batch: int) -> list[bytes]:
    """The batch's events, one JSON text each; raises ``BodyError`` for a body that is no batch."""
    kind = media_type(content_type)
    text = body.strip()
    if not text:
        raise BodyError(400, "empty_body", "the body holds no event")
    if kind in JSON_TYPES or (kind in TEXT_TYPES and text[:1] == b"["):
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise BodyError(400, "not_json", f"the body is not JSON: {str(exc)[:200]}") from None
        if isinstance(doc, dict):
            doc = [doc]
        if not isinstance(doc, list):
            raise BodyError(400, "not_a_batch", "the body must be a JSON array of events (or one event object)")
        if len(doc) > max_batch:
            raise BodyError(413, "batch_too_large", f"{len(doc)} events in one request, over {max_batch}")
        return [orjson.dumps(e) for e in doc]
    if kind in LINES_TYPES or kind in TEXT_TYPES:
        lines = [ln.strip() for ln in text.split(b"\n")]
        events = [ln.lstrip(b"\x1e") for ln in lines if ln]  # json-seq's record separator
        if len(events) > max_batch:
            raise BodyError(413, "batch_too_large", f"{len(events)} events in one request, over {max_batch}")
        return events
    raise BodyError(415, "unsupported_media_type",
                    "send application/json (an array), application/x-ndjson (one event a line) or text/plain")


def _named_id(raw: bytes) -> str | None:
    """The ``event_id`` a rejected event names, if it is a short string (the answer echoes it)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    eid = doc.get("event_id") if isinstance(doc, dict) else None
    return eid if isinstance(eid, str) and len(eid) <= 128 else None


def validate(raws: Sequence[bytes], shopper: str | None) -> list[Item]:
    """Each event checked against the v1 contract (the workers' decoder) and, with ``shopper`` set (a
    browser's shopper token), against the shopper it may speak for. An event id repeated within the
    batch is accepted once (the later ones are ``duplicate``)."""
    items: list[Item] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raws):
        item = Item(i, raw)
        items.append(item)
        try:
            ev = decode_event(None, raw)
        except Rejection as rej:
            item.event_id = _named_id(raw)
            item.reject(rej.reason, rej.detail)
            continue
        item.event, item.event_id = ev, ev.event_id
        if shopper is not None and ev.user_id != shopper:
            item.reject("forbidden_user", "the shopper token names another user_id", 403)
        elif ev.event_id in seen:
            item.duplicate, item.same_as = True, seen[ev.event_id]
        else:
            seen[ev.event_id] = i
    return items


def settle_repeats(items: Sequence[Item]) -> None:
    """An event id repeated in the batch ends as its first occurrence did (written, refused or failed)."""
    for it in items:
        if it.same_as is not None and it.status == ACCEPTED:
            first = items[it.same_as]
            it.status, it.reason, it.detail, it.code, it.dlq = first.status, first.reason, first.detail, first.code, \
                first.dlq


def needs_copy(ev: Event) -> bool:
    """Impressions and clicks must name a copy that was served to the shopper."""
    return ev.type in IMPRESSION_REQUIRED and ev.copy_id is not None


def status_of(items: Iterable[Item]) -> int:
    items = list(items)
    if any(it.status == FAILED for it in items):
        return 503
    refused = [it for it in items if it.status == REJECTED]
    if not refused:
        return 200
    codes = {it.code for it in refused}
    if len(refused) == len(items) and len(codes) == 1:
        return codes.pop()
    return 207


def answer(items: Sequence[Item]) -> dict[str, Any]:
    count = {s: sum(1 for it in items if it.status == s) for s in (ACCEPTED, REJECTED, FAILED)}
    return {**count, "duplicates": sum(1 for it in items if it.duplicate),
            "results": [it.answer() for it in items]}
