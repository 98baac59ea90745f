"""Writing a batch to Kafka and waiting for the broker: the collector answers a request only once
every record it wrote was acknowledged (or failed). One idempotent producer (``acks=all``, no
duplicates from its own retries) per API process; a thread serves its delivery reports and resolves
each record's asyncio future on the loop that wrote it. ``message.timeout.ms`` is the collector's
ack timeout, so a record the broker does not take in time fails instead of hanging the request."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from core.settings import KafkaSettings
from stream.kafka_io import producer_config


@dataclass(frozen=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def sink_config(kafka: KafkaSettings, ack_timeout_s: float, **overrides: Any) -> dict[str, Any]:
    """The producer's config: ``kafka``'s, with ``message.timeout.ms`` the ack timeout and a linger of at
    most 1 ms (a request waits for its acks: lingering is latency; under load the records of concurrent
    requests batch anyway)."""
    linger = min(kafka.producer_linger_ms, 1)
    return producer_config(kafka, **{"message.timeout.ms": max(1000, int(ack_timeout_s * 1000)), "linger.ms": linger,
                                     **overrides})


class EventSink:
    def __init__(self, producer: Producer, ack_timeout_s: float) -> None:
        self.producer = producer
        self.ack_timeout_s = ack_timeout_s
        self.written = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="collector-sink", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    async def write(self, records: Sequence[OutRecord]) -> list[str | None]:
        """Produce ``records`` and wait for the broker: per record None (acknowledged) or why not."""
        if not records:
            return []
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[str | None]] = []

        def settle(fut: asyncio.Future[str | None], outcome: str | None) -> None:
            if not fut.done():
                fut.set_result(outcome)

        for rec in records:
            fut: asyncio.Future[str | None] = loop.create_future()
            futures.append(fut)

            def done(err: KafkaError | None, _msg: Message, fut: asyncio.Future[str | None] = fut) -> None:
                loop.call_soon_threadsafe(settle, fut, None if err is None else err.str())

            headers: list[tuple[str, str | bytes | None]] = list(rec.headers)
            try:
                self.producer.produce(rec.topic, key=rec.key, value=rec.value, headers=headers or None,
                                      on_delivery=done)
            except BufferError:
                settle(fut, "the producer's local queue is full (broker unreachable or slow)")
            except Exception as exc:  # e.g. a value over the producer's message.max.bytes
                settle(fut, f"{type(exc).__name__}: {str(exc)[:200]}")
        await asyncio.wait(futures, timeout=self.ack_timeout_s + 1.0)
        out = [f.result() if f.done() else f"not acknowledged within {self.ack_timeout_s:g} s" for f in futures]
        for f in futures:  # a late report finds its future settled (ignored), never an error
            if not f.done():
                f.set_result("late")
        self.written += sum(1 for o in out if o is None)
        self.failed += sum(1 for o in out if o is not None)
        return out

    def queued(self) -> int:
        return len(self.producer)

    def close(self, timeout_s: float = 10.0) -> int:
        """Flush (up to ``timeout_s``) and stop; returns records still unacknowledged."""
        self._stop.set()
        self._thread.join(2.0)
        left = int(self.producer.flush(timeout_s))
        close = getattr(self.producer, "close", None)
        if close is not None:
            close()
        return left
