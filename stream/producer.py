"""The event producer SDK: `from livecopy import EventProducer`.

    with EventProducer("broker:9092") as p:
        p.send({"event_id": "e-1", "type": "page_view", "user_id": "u-42", "ts": "2026-11-22T10:00:00Z"})

Events are validated against the v1 contract before they leave (an invalid event raises
`InvalidEvent` at `send`, not a DLQ record later), sent as given (a dict or JSON text is not
re-serialized: unknown fields survive), keyed by `user_id` so a user's events keep
their order, and produced by an idempotent producer (acks=all, no duplicates from retries).
Delivery failures are not swallowed: `flush()` and `close()` raise `DeliveryError` listing them,
and `on_error` (if given) is called for each as it happens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message, Producer

from core.contracts import Event
from core.settings import KafkaSettings, Settings
from core.wire import Rejection, Topics, decode_event, encode_event
from stream.kafka_io import producer_config


class InvalidEvent(ValueError):
    def __init__(self, rejection: Rejection) -> None:
        super().__init__(f"{rejection.reason}: {rejection.detail}")
        self.reason = rejection.reason
        self.detail = rejection.detail


class DeliveryError(RuntimeError):
    def __init__(self, failures: list[tuple[bytes | None, str]]) -> None:
        super().__init__(f"{len(failures)} event(s) not delivered; first: {failures[0][1]}")
        self.failures = failures


class EventProducer:
    def __init__(
        self,
        bootstrap_servers: str | None = None,
        *,
        topic: str | None = None,
        settings: Settings | None = None,
        config: Mapping[str, Any] | None = None,
        on_error: Callable[[bytes | None, str], None] | None = None,
    ) -> None:
        settings = settings or Settings()
        kafka: KafkaSettings = settings.kafka
        if bootstrap_servers:
            kafka = kafka.model_copy(update={"bootstrap_servers": bootstrap_servers})
        self.topic = topic or Topics.from_settings(settings.topics).events
        self._producer = Producer(producer_config(kafka, **dict(config or {})))
        self._failures: list[tuple[bytes | None, str]] = []
        self._on_error = on_error
        self.sent = 0
        self.delivered = 0

    def _delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            return
        failure = (msg.key(), err.str())
        self._failures.append(failure)
        if self._on_error:
            self._on_error(*failure)

    @staticmethod
    def validate(event: Event | Mapping[str, Any] | bytes | str) -> tuple[Event, bytes]:
        """The event and the bytes to send: a mapping or JSON text as given (unknown fields and the
        producer's own `ts` form kept), checked by the same decoder the workers use."""
        if isinstance(event, Event):
            return event, encode_event(event)
        if isinstance(event, str):
            event = event.encode()
        if not isinstance(event, bytes):
            try:
                event = orjson.dumps(dict(event))
            except (TypeError, orjson.JSONEncodeError) as exc:
                raise InvalidEvent(Rejection("not_json", f"event is not JSON-serializable: {exc}")) from None
        try:
            return decode_event(None, event), event
        except Rejection as rej:
            raise InvalidEvent(rej) from None

    def send(self, event: Event | Mapping[str, Any] | bytes | str, timestamp_ms: int | None = None) -> Event:
        """Validate and enqueue one event (key = user_id). Blocks briefly when the queue is full.

        A mapping or JSON text is sent as given once it passes the v1 contract; an `Event` is
        serialized. Raises `InvalidEvent` (with the DLQ reason a worker would give) otherwise."""
        ev, value = self.validate(event)
        self._produce(ev.user_id.encode(), value, timestamp_ms)
        return ev

    def send_raw(self, key: bytes | str | None, value: bytes, timestamp_ms: int | None = None) -> None:
        """Enqueue bytes as they are, unvalidated (replaying a DLQ, testing rejection paths)."""
        self._produce(key.encode() if isinstance(key, str) else key, value, timestamp_ms)

    def _produce(self, key: bytes | None, value: bytes, timestamp_ms: int | None) -> None:
        kw: dict[str, Any] = {"on_delivery": self._delivery}
        if timestamp_ms is not None:
            kw["timestamp"] = timestamp_ms
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, **kw)
                break
            except BufferError:  # local queue full: serve delivery reports, then retry
                self._producer.poll(0.05)
        self.sent += 1
        self._producer.poll(0)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every queued event's acknowledgement; raise DeliveryError on any failure."""
        left = self._producer.flush(timeout_s)
        if left:
            self._failures.append((None, f"{left} event(s) still unacknowledged after {timeout_s} s"))
        if self._failures:
            failures, self._failures = self._failures, []
            raise DeliveryError(failures)

    def close(self, timeout_s: float = 30.0) -> None:
        self.flush(timeout_s)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self.close()
        else:  # do not mask the original error, but still try to deliver what was queued
            try:
                self.close()
            except DeliveryError:
                pass
