"""Following ``livecopy.model-updates``: every generator process (API or worker) applies the
newest promote/rollback record of its model to its :class:`engine.serving.CopyEngine`.

Each process must see every record, so the follower reads all partitions by assignment (no
consumer group, nothing committed) from the beginning: at start-up it catches up with the log
and applies only the newest record for its model (``pick_update``), then applies
records as they come. Loading and smoke-checking happen on the follower's thread; the engine
swaps between batches. A record that is not a valid ``ModelVersion`` is logged and counted,
never fatal.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from pydantic import ValidationError

from core.contracts import ModelVersion
from core.settings import Settings
from core.wire import Topics
from stream.kafka_io import consumer_config

log = logging.getLogger(__name__)

ACTIONS = ("promote", "rollback")


def pick_update(updates: Sequence[ModelVersion], name: str) -> ModelVersion | None:
    """The record to apply among ``updates`` (in log order): the last promote/rollback for ``name``."""
    for u in reversed(updates):
        if u.name == name and u.action in ACTIONS:
            return u
    return None


def _close_quietly(c: Consumer) -> None:
    try:
        c.close()
    except Exception as exc:
        log.debug("closing the model-updates consumer failed: %s", exc)


class ModelUpdateFollower:
    """A daemon thread: ``start()``, ``caught_up.wait()``, ``stop()``.

    ``apply`` is called (on the follower thread) with the record to apply, e.g.
    ``CopyEngine.apply_update``.
    """

    def __init__(self, settings: Settings, name: str, apply: Callable[[ModelVersion], object]) -> None:
        self.settings = settings
        self.name = name
        self.apply = apply
        self.topic = Topics.from_settings(settings.topics).model_updates
        self.poll_s = settings.generation.reload_poll_s
        self.caught_up = threading.Event()  # set once the log as it was at start-up has been read
        self._ends: dict[int, int] = {}
        self.invalid = 0
        self.applied = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-updates", daemon=True)

    def start(self) -> ModelUpdateFollower:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _consumer(self) -> Consumer:
        """Assigned to every partition from the beginning; ``self._ends`` is each partition's log end now
        (what the start-up catch-up reads up to)."""
        group = f"{self.settings.worker.group_prefix}reload-{uuid.uuid4().hex[:8]}"  # never joins: assign only
        c = Consumer(consumer_config(self.settings.kafka, group))
        try:
            md = c.list_topics(self.topic, timeout=10)
            parts = sorted(md.topics[self.topic].partitions) if self.topic in md.topics else []
            marks = {p: c.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10) for p in parts}
            self._ends = {p: high for p, (low, high) in marks.items() if high > low}
            c.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
        except Exception:
            _close_quietly(c)  # not leaked: the retry builds a new one
            raise
        return c

    def _behind(self, read_to: dict[int, int]) -> bool:
        """Whether some partition has records from before start-up not read yet."""
        return any(read_to.get(p, 0) < end for p, end in self._ends.items())

    def _run(self) -> None:
        consumer: Consumer | None = None
        backlog: list[ModelVersion] = []  # read during the start-up catch-up, applied once at its end
        read_to: dict[int, int] = {}  # next offset per partition
        idle = 0  # empty reads in a row
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = self._consumer()
                msgs = consumer.consume(500, timeout=self.poll_s)
            except Exception:
                log.exception("model-updates consumer failed; retrying")
                if consumer is not None:
                    _close_quietly(consumer)  # its threads and sockets would otherwise leak on every retry
                consumer = None
                backlog, read_to = [], {}
                self._stop.wait(1.0)
                continue
            idle = idle + 1 if not msgs else 0
            updates: list[ModelVersion] = []
            for m in msgs:
                if m.error() is not None:
                    continue
                read_to[m.partition() or 0] = (m.offset() or 0) + 1
                try:
                    updates.append(ModelVersion.model_validate_json(m.value() or b""))
                except ValidationError as exc:
                    self.invalid += 1
                    log.warning("invalid model-updates record at %s[%s]@%s: %s", m.topic(), m.partition(),
                                m.offset(), str(exc).splitlines()[0])
            if not self.caught_up.is_set():
                # Start-up: the whole log up to its end at start-up, then only its newest record for our
                # model (not the newest of every chunk: that would load and serve old versions on the way).
                backlog += updates
                # (three empty reads in a row while "behind": the log's tail is a gap, e.g. compacted away)
                if self._behind(read_to) and idle < 3:
                    continue
                updates, backlog = backlog, []
                self.caught_up.set()
            if not updates:
                continue
            chosen = pick_update(updates, self.name)
            if chosen is not None:
                try:
                    self.apply(chosen)
                    self.applied += 1
                except Exception:
                    log.exception("applying model version %s failed", chosen.version)
        if consumer is not None:
            consumer.close()
