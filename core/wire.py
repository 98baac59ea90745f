"""Topic names and (de)serialization: the one module that owns the wire format.

Everything that reads or writes a livecopy topic goes through here, so the JSON of
CONTRACTS.md and the DLQ header convention live in a single place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from core.contracts import MAX_EVENT_BYTES, Event, FeedbackRecord
from core.settings import TopicSettings

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Topics:
    """Resolved topic names and partition counts."""

    events: str
    dlq: str
    copy: str
    feedback: str
    model_updates: str
    catalog: str = "livecopy.catalog"
    events_partitions: int = 8
    default_partitions: int = 4
    replication_factor: int = 1

    @classmethod
    def from_settings(cls, t: TopicSettings) -> Topics:
        events = t.events or f"{t.prefix}events"
        return cls(
            events=events,
            dlq=t.dlq or f"{events}.dlq",
            copy=t.copy_ or f"{t.prefix}copy",
            feedback=t.feedback or f"{t.prefix}feedback",
            model_updates=t.model_updates or f"{t.prefix}model-updates",
            catalog=t.catalog or f"{t.prefix}catalog",
            events_partitions=t.events_partitions,
            default_partitions=t.default_partitions,
            replication_factor=t.replication_factor,
        )

    def partition_counts(self) -> dict[str, int]:
        """Every topic of CONTRACTS.md with its partition count."""
        return {
            self.events: self.events_partitions,
            self.dlq: self.default_partitions,
            self.copy: self.default_partitions,
            self.feedback: self.default_partitions,
            self.model_updates: self.default_partitions,
            self.catalog: self.default_partitions,
        }

    def configs(self) -> dict[str, dict[str, str]]:
        """Topic configs set at creation: model-updates is compacted (keyed by model name), so the
        newest version of every model stays readable however old it is (a generator starting
        next month still finds it); catalog too (keyed by product id: the newest record of every
        product, a tombstone deletes it); the others keep the broker's retention."""
        return {self.model_updates: {"cleanup.policy": "compact"}, self.catalog: {"cleanup.policy": "compact"}}


@dataclass(slots=True)
class Record:
    """A consumed record, independent of the Kafka client library."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = 0
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class Rejection(Exception):
    """A record that cannot take effect; it goes to the DLQ with `reason` and `detail`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_REASONS = {
    "json_invalid": "not_json",
    "json_type": "not_object",
    "model_type": "not_object",
    "model_attributes_type": "not_object",
    "missing": "missing_field",
    "string_pattern_mismatch": "bad_charset",
    "string_too_long": "bad_length",
    "string_too_short": "bad_length",
    "too_long": "bad_length",
    "enum": "unknown_type",
    "bad_format": "bad_format",
    "out_of_range": "out_of_range",
    "greater_than": "out_of_range",
    "greater_than_equal": "out_of_range",
    "less_than": "out_of_range",
    "less_than_equal": "out_of_range",
    "finite_number": "out_of_range",
}


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters: an ``error.detail``."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def rejection_from(exc: ValidationError) -> Rejection:
    err = exc.errors(include_url=False, include_input=False)[0]
    etype = err["type"]
    reason = _REASONS.get(etype)
    if reason is None:
        reason = "wrong_type" if etype.endswith("_type") or etype.endswith("_parsing") else "invalid"
    loc = ".".join(str(p) for p in err["loc"]) or "record"
    return Rejection(reason, one_line(f"{loc}: {err['msg']}"))


def decode_event(key: bytes | None, value: bytes | None) -> Event:
    """Validate one `livecopy.events` record; raises `Rejection` with the contract's reason."""
    if not value:
        raise Rejection("empty", "record has no value")
    if len(value) > MAX_EVENT_BYTES:
        raise Rejection("oversize", f"record is {len(value)} bytes, over the 64 KiB limit")
    try:
        event = Event.model_validate_json(value)
    except ValidationError as exc:
        raise rejection_from(exc) from None
    if key is not None and key != event.user_id.encode():
        raise Rejection(
            "key_mismatch", one_line(f"record key {key[:80]!r} differs from user_id {event.user_id!r}")
        )
    return event


def decode_feedback(value: bytes | None) -> FeedbackRecord:
    """Validate one `livecopy.feedback` record; raises `Rejection` with the contract's reason."""
    if value is None:
        raise Rejection("empty", "record has no value")
    try:
        return FeedbackRecord.model_validate_json(value)
    except ValidationError as exc:
        raise rejection_from(exc) from None


def encode_event(event: Event) -> bytes:
    return orjson.dumps(event.to_json_dict())


def dlq_headers(rej: Rejection, topic: str, partition: int | str, offset: int | str) -> list[tuple[str, bytes]]:
    return [
        ("error", rej.reason.encode()),
        ("error.detail", rej.detail.encode()),
        ("source.topic", topic.encode()),
        ("source.partition", str(partition).encode()),
        ("source.offset", str(offset).encode()),
    ]


def encode(model: BaseModel) -> bytes:
    """Contract JSON of a copy / feedback / model-version record."""
    return model.model_dump_json(exclude_none=False).encode()


def decode(model: type[M], value: bytes) -> M:
    return model.model_validate_json(value)

