"""The online trainer worker: `livecopy.feedback` -> fine-tuned student versions ->
`livecopy.model-updates`.

`TrainerProcessor` hands each consumed batch of feedback records to a
:class:`models.training.online.OnlineTrainer` (one optimizer step per full mini-batch), then asks it to
evaluate and maybe publish. A published version is already saved and current in the registry;
its ``ModelVersion`` record is then produced to ``livecopy.model-updates`` (key: the model
name) and the batch counts as done only once the broker acknowledged it. A record that does
not parse as feedback goes to the DLQ.

Offsets are committed once the trainer took the records in (trained on, or kept in memory: the
rows of a mini-batch not yet full and the held-out rows): a trainer killed between two
publications resumes from the registry's current version and loses what it learned and held out
since (a bounded loss of training signal; nothing half-published is ever served). A version it
promoted but could not announce before stopping is announced when the next trainer starts
(the registry records what was announced).
The loop reads at most ``max_batch_size_factor x batch_size`` records per poll, so one poll's
work stays a few optimizer steps and the consumer keeps polling.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, cast

from confluent_kafka import Producer

from core.contracts import FeedbackRecord, ModelVersion
from core.metrics import TrainerMetrics, WorkerMetrics
from core.process import install_stop_signals
from core.settings import Settings
from core.wire import Record, Rejection, Topics, decode_feedback
from models.training.online import OnlineTrainer
from stream.kafka_io import (
    BatchLoop,
    DeliveryTracker,
    Outcome,
    TransientError,
    group_consumer,
    loop_options,
    producer_config,
)

log = logging.getLogger(__name__)

GROUP = "trainer"
POLL_BATCHES = 4  # mini-batches of records read per poll


def announce(producer: Any, topic: str, mv: ModelVersion, delivery: DeliveryTracker | None = None) -> None:
    """Produce a ModelVersion record (key: model name) and wait for the broker's acknowledgement."""
    tracker = delivery or DeliveryTracker()
    tracker.produce(producer, topic, value=mv.model_dump_json().encode(), key=mv.name.encode())
    tracker.wait(producer, "model-updates produce", 30)


class TrainerProcessor:
    def __init__(self, trainer: OnlineTrainer, producer: Any, topics: Topics,
                 metrics: WorkerMetrics | None = None) -> None:
        self.trainer = trainer
        self.producer = producer
        self.topics = topics
        self.metrics = metrics
        # A version promoted but never announced (the trainer stopped in between) goes out first.
        resumed = trainer.registry.unannounced()
        self.unannounced: list[ModelVersion] = [resumed] if resumed is not None else []
        self.announced: list[ModelVersion] = []
        self._delivery = DeliveryTracker()
        self._gated: object = trainer.last_eval

    def _count(self, outcome: str, n: int) -> None:
        if self.metrics and n:
            self.metrics.count(outcome, n)

    def announce_pending(self) -> None:
        """Announce what was published and not yet acknowledged, oldest first (TransientError if
        the broker does not acknowledge: tried again with the next batch)."""
        while self.unannounced:
            mv = self.unannounced[0]
            announce(self.producer, self.topics.model_updates, mv, self._delivery)
            self.trainer.registry.mark_announced(mv.version)
            self.announced.append(self.unannounced.pop(0))
            log.info("announced %s %s on %s", mv.name, mv.version, self.topics.model_updates)

    def process(self, records: Sequence[Record]) -> Outcome:
        self.announce_pending()  # a version published before a failed announcement goes out first
        recs: list[FeedbackRecord] = []
        rejected: list[tuple[Record, Rejection]] = []
        for r in records:
            try:
                recs.append(decode_feedback(r.value))
            except Rejection as rej:
                rejected.append((r, rej))
        if recs:
            rep = self.trainer.update(recs)
            self._count("trained", rep.records - rep.duplicates - rep.skipped - rep.heldout)
            self._count("heldout", rep.heldout)
            self._count("duplicate", rep.duplicates)
            self._count("skipped", rep.skipped)
            self._count("steps", rep.steps)
            if rep.steps:
                log.debug("%d steps, loss %.4f (ctr %.4f, lm %.4f, kl %.4f)", rep.steps, rep.loss, rep.ctr_loss,
                          rep.lm_loss, rep.kl)
        self.tick()
        return Outcome(rejected)

    def tick(self) -> ModelVersion | None:
        """Evaluate / publish when due, then announce. Returns the version published, if any."""
        mv = self.trainer.maybe_publish()
        ev = self.trainer.last_eval
        if ev is not None and ev is not self._gated:
            self._gated = ev
            if isinstance(self.metrics, TrainerMetrics):
                for code in ev.codes or (["none"] if ev.publish else ["other"]):
                    self.metrics.gate.labels("published" if ev.publish else "refused", code).inc()
        if mv is not None:
            self._count("published", 1)
            self.unannounced.append(mv)
        self.announce_pending()
        return mv

    def healthy(self) -> bool:
        return True


def build_trainer_loop(settings: Settings, *, group_suffix: str = "", metrics: WorkerMetrics | None = None,
                       trainer: OnlineTrainer | None = None, **consumer_overrides: Any) -> BatchLoop:
    topics = Topics.from_settings(settings.topics)
    cfg = settings.trainer
    if trainer is None:
        trainer = OnlineTrainer(cfg.base_dir or settings.models.student_dir, cfg)
    producer = Producer(producer_config(settings.kafka))
    processor = TrainerProcessor(trainer, producer, topics, metrics)
    return BatchLoop(
        group_consumer(settings, GROUP, group_suffix, **consumer_overrides), producer, processor,
        topics=[topics.feedback], dlq_topic=topics.dlq,
        max_batch=max(1, min(settings.worker.max_batch, POLL_BATCHES * cfg.batch_size)), metrics=metrics,
        **loop_options(settings.worker),
    )


def trainer_of(loop: BatchLoop) -> TrainerProcessor:
    return cast(TrainerProcessor, loop.processor)


def run_trainer_worker(settings: Settings, *, metrics_port: int | None = None) -> None:
    if settings.trainer.nice > 0:
        os.nice(settings.trainer.nice)  # background work: the copy service on the same cores comes first
    metrics = TrainerMetrics("trainer")
    metrics.serve(metrics_port if metrics_port is not None else settings.worker.metrics_port)
    loop = build_trainer_loop(settings, metrics=metrics)
    proc = trainer_of(loop)
    install_stop_signals(loop.stop)
    try:
        proc.announce_pending()  # before any feedback arrives
    except TransientError as exc:
        log.warning("%s; announcing with the next batch", exc)
    log.info("online trainer consuming %s from %s (registry %s)", loop.topics, proc.trainer.serving_version,
             settings.trainer.registry_dir)
    loop.run()
    t = proc.trainer
    log.info("online trainer stopped: %d steps, %d records trained, %d versions published", t.steps,
             t.records_trained, len(t.published))
