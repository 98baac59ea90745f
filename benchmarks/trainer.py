"""The feedback loop's speed: joiner throughput (Redis vs in-memory state), online-trainer
throughput, and update latency (feedback in -> new version serving), on the shipped student.

    python benchmarks/trainer.py [--device cpu|cuda] [--steps 12] [--eval-every 4] [--batch-size 32]
                                 [--skip-joiner] [--skip-e2e] [--threads N] [--json-out report.json]

1. **joiner**: impressions + clicks + copy records (2:0.3:1, with 10 % re-deliveries) through
   ``FeedbackProcessor`` on the real broker, window 0 (every impression is emitted in the same
   batch), once with the Redis store (feedback.lua) and once with the in-memory store (the same
   logic without Redis: the ceiling). Prints input records/s and feedback records/s.
2. **trainer (in process)**: head mode (the shipped default): ``--head-records`` records with
   logged embeddings -> refit -> gated, saved version, in seconds; then full mode:
   ``OnlineTrainer.update`` on synthetic feedback in mini-batches of
   ``--batch-size``: records/s and s/step (after one warm-up step), then one evaluation +
   publication (held-out slice, KL, IPS/SNIPS, save, registry).
3. **end to end**: the trainer worker (BatchLoop on ``livecopy.feedback``) and a CopyEngine
   following ``livecopy.model-updates``, on the real broker. After a warm-up round (first
   version served), ``eval_every x batch_size`` new records (+ held-out share) are produced at
   t0; printed: records/s consumed, t(trained), t(published + announced), t(the engine serves
   it) -- the update latency. The publication gate is relaxed here (``logloss_tolerance`` and
   ``max_kl`` large): this measures the path, the gate's decisions are tested elsewhere.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
import torch

from benchmarks._common import machine
from core.settings import FeedbackSettings, Settings, TrainerSettings
from core.styles import STYLES
from core.wire import Record, Topics
from models.paths import shipped_student_dir
from tests.feedback_data import click_event, copy_record, feedback_records, impression_event, style_ctr


def bench_joiner(settings: Settings, n_imp: int) -> dict[str, Any]:
    from confluent_kafka import Producer

    from services.workers.feedback import FeedbackProcessor
    from stream.feedback.logic import InMemoryFeedbackStore
    from stream.feedback.store import RedisFeedbackStore
    from stream.kafka_io import producer_config
    from stream.redis_io import redis_client

    topics = Topics.from_settings(settings.topics)
    rng = random.Random(1)
    now = int(time.time() * 1000)
    recs: list[Record] = []
    for i in range(n_imp):
        cp = f"c{i // 2}"
        if i % 2 == 0:
            recs.append(Record(topics.copy, 0, 0, None, copy_record(cp, user=f"u{i % 500}")))
        recs.append(Record(topics.events, 0, 0, None, orjson.dumps(impression_event(f"i{i}", cp, ts=now))))
        if rng.random() < 0.3:
            recs.append(Record(topics.events, 0, 0, None, orjson.dumps(click_event(f"i{i}", cp, ts=now + 10))))
    recs += rng.sample(recs, len(recs) // 10)
    cfg = FeedbackSettings(window_s=0, lateness_s=0, sweep_limit=5000)
    out: dict[str, Any] = {"impressions": n_imp, "input_records": len(recs)}
    for name in ("redis", "memory"):
        prefix = f"bench{random.randrange(1 << 30)}:"
        store: Any = (RedisFeedbackStore(redis_client(settings.redis), cfg, prefix) if name == "redis"
                      else InMemoryFeedbackStore(cfg))
        producer = Producer(producer_config(settings.kafka))
        proc = FeedbackProcessor(store, producer, topics, cfg)
        t0 = time.perf_counter()
        for i in range(0, len(recs), 1000):
            proc.process(recs[i:i + 1000])
        proc.sweep()
        dt = time.perf_counter() - t0
        assert proc.emitted == n_imp, (name, proc.emitted)
        out[name] = {"seconds": round(dt, 3), "input_records_per_s": round(len(recs) / dt),
                     "feedback_per_s": round(proc.emitted / dt)}
        print(f"joiner [{name:6}]: {len(recs)} input records ({n_imp} impressions) in {dt:.2f} s = "
              f"{len(recs) / dt:,.0f} records/s in, {proc.emitted / dt:,.0f} feedback records/s out", flush=True)
    out["redis_vs_memory"] = round(out["redis"]["input_records_per_s"] / out["memory"]["input_records_per_s"], 3)
    print(f"joiner: Redis store runs at {out['redis_vs_memory']:.2f}x the in-memory ceiling", flush=True)
    return out


def trainer_cfg(tmp: Path, args: argparse.Namespace, **over: Any) -> TrainerSettings:
    base: dict[str, Any] = {"registry_dir": tmp / "registry", "mode": "full", "batch_size": args.batch_size, "lr": 1e-4,
                            "eval_every": args.eval_every, "min_heldout": 10, "heldout_fraction": 0.1,
                            "device": args.device, "logloss_tolerance": 10.0, "max_kl": 100.0}
    base.update(over)
    return TrainerSettings.model_validate(base)


def bench_in_process(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from models.training.online import OnlineTrainer

    t = OnlineTrainer(shipped_student_dir(), trainer_cfg(tmp, args, eval_every=10_000))
    bs = args.batch_size
    recs = feedback_records(int((args.steps + 1) * bs / 0.9) + bs, style_ctr(STYLES[2]), seed=1)
    t.update(recs[:bs + bs // 5])  # warm-up step
    steps0 = t.steps
    t0 = time.perf_counter()
    rep = t.update(recs[bs + bs // 5:])
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    n = rep.records
    steps = t.steps - steps0
    t1 = time.perf_counter()
    mv = t.maybe_publish(force_eval=True)
    dt_pub = time.perf_counter() - t1
    ev = t.last_eval
    assert ev is not None
    out = {"records": n, "steps": steps, "seconds": round(dt, 3), "records_per_s": round(n / dt, 1),
           "s_per_step": round(dt / max(1, steps), 4), "heldout_rows": ev.n, "eval_s": round(ev.seconds, 3),
           "eval_and_publish_s": round(dt_pub, 3), "published": mv is not None,
           "ope": ev.offpolicy.to_dict() if ev.offpolicy else None}
    print(f"trainer [in process, {args.device}]: {n} records, {steps} steps of {bs} in {dt:.2f} s = "
          f"{n / dt:,.1f} records/s, {dt / max(1, steps):.3f} s/step", flush=True)
    print(f"trainer [in process, {args.device}]: evaluation of {ev.n} held-out rows {ev.seconds:.2f} s, "
          f"evaluation + save + registry {dt_pub:.2f} s (published: {mv is not None}); off-policy: "
          f"SNIPS {ev.offpolicy.snips if ev.offpolicy else float('nan'):.4f} "
          f"IPS {ev.offpolicy.ips if ev.offpolicy else float('nan'):.4f} "
          f"logged CTR {ev.offpolicy.logged_ctr if ev.offpolicy else float('nan'):.4f}", flush=True)
    return out


def with_embeddings(records: list[Any], tmp: Path) -> list[Any]:
    """The records as the generator logs them: with the trunk's embedding at EOS (computed here once)."""
    from core.contracts import Embedding
    from models.training.online import OnlineTrainer, row_of

    t = OnlineTrainer(shipped_student_dir(), TrainerSettings(registry_dir=tmp / "embed-registry"))
    rows = t._with_embeddings([row_of(r) for r in records])  # type: ignore[misc]
    return [r.model_copy(update={"embedding": Embedding.pack(row.embedding, t.trunk)})
            for r, row in zip(records, rows, strict=True)]


def bench_head(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The shipped fast path: ``--head-records`` feedback records (with logged embeddings) -> one refit of
    the CTR head, posterior and style policy -> evaluation, gate, save, registry."""
    from models.training.online import OnlineTrainer

    recs = with_embeddings(feedback_records(args.head_records, style_ctr(STYLES[2]), seed=2, prefix="h"), tmp)
    n_train = int(args.head_records * 0.85)
    t = OnlineTrainer(shipped_student_dir(), trainer_cfg(tmp, args, mode="head", refit_every=n_train,
                                                       heldout_fraction=0.1))
    t0 = time.perf_counter()
    rep = t.update(recs)
    t1 = time.perf_counter()
    mv = t.maybe_publish()
    t2 = time.perf_counter()
    ev = t.last_eval
    assert ev is not None
    out = {"records": len(recs), "refits": t.refits, "steps": rep.steps, "update_s": round(t1 - t0, 3),
           "eval_and_publish_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3), "published": mv is not None,
           "heldout_rows": ev.n, "records_per_s": round(len(recs) / (t1 - t0), 1)}
    print(f"trainer [head mode, as shipped, {args.device}]: {len(recs):,} records with logged embeddings -> "
          f"refit ({rep.steps} steps) in {t1 - t0:.2f} s ({len(recs) / (t1 - t0):,.0f} records/s); evaluation "
          f"of {ev.n} held-out rows + gate + save + registry {t2 - t1:.2f} s; a gated version "
          f"{'published' if mv else 'NOT published: ' + '; '.join(ev.reasons)} {t2 - t0:.2f} s after the "
          f"records arrived", flush=True)
    return out


def bench_e2e(settings: Settings, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from confluent_kafka import Producer

    from core.settings import CopySettings
    from engine.serving import CopyEngine
    from models.training.online import OnlineTrainer
    from services.workers.trainer import build_trainer_loop, trainer_of
    from stream.kafka_io import producer_config
    from stream.model_updates import ModelUpdateFollower

    gen = CopySettings(model_dir=shipped_student_dir(), device=args.device, candidates=2, max_new_tokens=8,
                       mc_draws=20, reload_poll_s=0.05)
    round_n = int(args.eval_every * args.batch_size / 0.9) + args.batch_size
    if args.mode == "head":
        round_n = args.head_records
        tcfg = trainer_cfg(tmp, args, mode="head", refit_every=int(round_n * 0.8))
    else:
        tcfg = trainer_cfg(tmp, args)
    s = settings.model_copy(update={"generation": gen, "trainer": tcfg})
    topics = Topics.from_settings(s.topics)
    rounds = [feedback_records(round_n, style_ctr(STYLES[2]), seed=10 + k, prefix=f"r{k}") for k in range(2)]
    if args.mode == "head":
        rounds = [with_embeddings(r, tmp / f"e{k}") for k, r in enumerate(rounds)]
    producer = Producer(producer_config(s.kafka))

    def send(records: list[Any]) -> None:
        for r in records:
            producer.produce(topics.feedback, key=r.copy_id.encode(), value=r.model_dump_json().encode())
        assert producer.flush(30) == 0

    engine = CopyEngine.from_settings(s).start()
    follower = ModelUpdateFollower(s, engine.model, engine.apply_update).start()
    loop = build_trainer_loop(s, trainer=OnlineTrainer(None, s.trainer))
    proc = trainer_of(loop)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()

    def wait(cond: Any, timeout: float, what: str) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return time.perf_counter()
            time.sleep(0.005)
        raise RuntimeError(f"timed out waiting for {what}")

    try:
        send(rounds[0])  # warm-up: group join, first publication, first swap
        wait(lambda: proc.announced and engine.version == proc.announced[-1].version, 600, "warm-up version")
        n_pub, consumed0 = len(proc.announced), loop.records
        t0 = time.perf_counter()
        send(rounds[1])
        t_sent = time.perf_counter()
        t_consumed = wait(lambda: loop.records >= consumed0 + len(rounds[1]), 600, "records consumed")
        t_pub = wait(lambda: len(proc.announced) > n_pub, 600, "publication")
        version = proc.announced[-1].version
        t_swap = wait(lambda: engine.version == version, 600, "swap")
    finally:
        loop.stop()
        thread.join(60)
        follower.stop()
        engine.stop()
    n = len(rounds[1])
    out = {"records": n, "produce_s": round(t_sent - t0, 3), "consumed_s": round(t_consumed - t0, 3),
           "records_per_s": round(n / (t_consumed - t0), 1), "published_s": round(t_pub - t0, 3),
           "serving_s": round(t_swap - t0, 3), "mode": args.mode}
    print(f"end to end [{args.device}, {args.mode} mode]: {n} feedback records produced in {t_sent - t0:.2f} s; "
          f"consumed + trained after {t_consumed - t0:.2f} s "
          f"({n / (t_consumed - t0):,.1f} records/s; the last poll's batch includes the evaluation); version "
          f"published + announced after {t_pub - t0:.2f} s; serving in the CopyEngine after {t_swap - t0:.2f} s "
          f"(update latency)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--joiner-impressions", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--mode", choices=("head", "full"), default="head",
                    help="The trainer mode of the end-to-end part (head: the shipped default).")
    ap.add_argument("--head-records", type=int, default=3000, help="Feedback records per head-mode version.")
    ap.add_argument("--skip-joiner", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"machine: {machine()}; device {dev}; torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    report: dict[str, Any] = {"machine": machine(), "device": dev}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        report["trainer_head"] = bench_head(args, tmp / "h")
        report["trainer"] = bench_in_process(args, tmp / "a")
        if not (args.skip_joiner and args.skip_e2e):
            from livecopy.devstack import open_stack
            from stream.kafka_io import ensure_topics

            with open_stack(prefer="auto") as info:
                s = Settings().with_endpoints(info.bootstrap_servers, info.redis_url)
                s = s.model_copy(update={"topics": s.topics.model_copy(update={"prefix": "bench."})})
                ensure_topics(s.kafka, Topics.from_settings(s.topics))
                if not args.skip_joiner:
                    report["joiner"] = bench_joiner(s, args.joiner_impressions)
                if not args.skip_e2e:
                    report["e2e"] = bench_e2e(s, args, tmp / "b")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
