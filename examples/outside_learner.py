"""An outside online learner on livecopy's feedback topic: a contextual bandit over copy styles.

This is the code a team outside livecopy would write: it reads ``livecopy.feedback`` with
confluent-kafka, learns online with River (one logistic regression per style, predicting a click
from the shopper and product context), and evaluates its own epsilon-greedy policy off-policy
from the logged propensities -- progressively: each record is scored by the policy as it stood
before learning from that record. It prints its IPS and SNIPS estimates beside the CTR of
livecopy's own (logging) policy on the same records. Nothing is imported from livecopy; the record
format is docs/CONTRACTS.md and docs/schemas/livecopy.feedback.schema.json (``--schema`` validates
every record against it, with ``jsonschema``).

    pip install confluent-kafka river jsonschema      # or: pip install -e ".[examples]"
    python examples/outside_learner.py --bootstrap localhost:9094 --from-beginning --idle-timeout 10

The action is the copy's style (``style``); the logged propensity is livecopy's probability of
the copy it showed. For uniformly random logging that is the style's probability and the estimate
is unbiased; for livecopy's Thompson chooser it is the probability among the sampled candidates,
so read the estimate as approximate there (docs/feedback.md, "Off-policy estimate").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError
from river import linear_model, optim

STYLES = ("urgency", "discount", "quality", "eco", "social_proof", "practical")  # livecopy's copy styles


def context(features: dict[str, Any]) -> dict[str, float]:
    """The record's ``features`` as River features: shopper buckets and product facts, one-hot or scaled."""
    x: dict[str, float] = {"bias": 1.0}
    for name in ("user", "price_sensitivity", "engagement", "affinity", "slot"):
        value = features.get(name)
        if value is not None:
            x[f"{name}={value}"] = 1.0
    if features.get("eco_minded"):
        x["eco_minded"] = 1.0
    for like in features.get("likes") or []:
        x[f"likes={like}"] = 1.0
    product = features.get("product") or {}
    category = str(product.get("category") or "")
    if category:
        x[f"category={category.split('/', 1)[0]}"] = 1.0
    price = product.get("price")
    if isinstance(price, (int, float)) and price > 0:
        x["log_price"] = math.log1p(price) / 10.0
    for name, scale in (("discount_pct", 100.0), ("rating", 5.0)):
        value = product.get(name)
        if isinstance(value, (int, float)):
            x[name] = value / scale
    if product.get("eco"):
        x["product_eco"] = 1.0
    return x


@dataclass
class EpsilonGreedyLearner:
    """One River logistic regression per arm; plays the arm with the highest predicted CTR, a random
    one with probability ``epsilon``."""

    arms: list[str]
    epsilon: float = 0.1
    lr: float = 0.05
    models: dict[str, linear_model.LogisticRegression] = field(default_factory=dict)

    def model(self, arm: str) -> linear_model.LogisticRegression:
        if arm not in self.models:
            self.models[arm] = linear_model.LogisticRegression(optimizer=optim.SGD(self.lr))
            if arm not in self.arms:
                self.arms.append(arm)
        return self.models[arm]

    def probabilities(self, x: dict[str, float]) -> dict[str, float]:
        """pi(arm | x) of the epsilon-greedy policy (ties go to the first arm)."""
        scores = {a: self.model(a).predict_proba_one(x).get(True, 0.0) for a in self.arms}
        best = max(self.arms, key=lambda a: scores[a])
        k = len(self.arms)
        return {a: (1 - self.epsilon) * (a == best) + self.epsilon / k for a in self.arms}

    def learn(self, x: dict[str, float], arm: str, clicked: bool) -> None:
        self.model(arm).learn_one(x, clicked)


@dataclass
class OffPolicy:
    """Running IPS / SNIPS of the learner's policy, and the logging policy's own CTR."""

    clip: float = 10.0
    n: int = 0
    clicks: int = 0
    sum_w: float = 0.0
    sum_wr: float = 0.0
    sum_w2: float = 0.0
    clipped: int = 0
    policies: dict[str, int] = field(default_factory=dict)

    def add(self, pi: float, propensity: float, clicked: bool, policy: str) -> None:
        w = pi / propensity
        if w > self.clip:
            self.clipped += 1
            w = self.clip
        self.n += 1
        self.clicks += clicked
        self.sum_w += w
        self.sum_wr += w * clicked
        self.sum_w2 += w * w
        self.policies[policy] = self.policies.get(policy, 0) + 1

    def report(self) -> dict[str, Any]:
        n = self.n or 1
        return {
            "records": self.n, "livecopy_logged_ctr": self.clicks / n,
            "learner_ips": self.sum_wr / n, "learner_snips": self.sum_wr / self.sum_w if self.sum_w else None,
            "learner_ess": self.sum_w**2 / self.sum_w2 if self.sum_w2 else 0.0, "clipped": self.clipped,
            "logging_policies": self.policies,
        }


def feedback(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Feedback records from the topic, until ``--max-records`` or ``--idle-timeout`` s without one."""
    consumer = Consumer({
        "bootstrap.servers": args.bootstrap, "group.id": args.group or f"outside-learner-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest" if args.from_beginning else "latest", "enable.auto.commit": False,
    })
    consumer.subscribe([args.topic])
    idle_since, seen = time.monotonic(), 0
    try:
        while args.max_records is None or seen < args.max_records:
            msg = consumer.poll(0.5)
            if msg is None:
                if time.monotonic() - idle_since > args.idle_timeout:
                    return
                continue
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    print(f"kafka: {err}", file=sys.stderr)
                continue
            idle_since = time.monotonic()
            seen += 1
            try:
                yield json.loads(msg.value() or b"")
            except ValueError as exc:
                print(f"skipped a record that is not JSON at offset {msg.offset()}: {exc}", file=sys.stderr)
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", default="localhost:9094", help="Kafka bootstrap servers")
    ap.add_argument("--topic", default="livecopy.feedback")
    ap.add_argument("--group", default=None, help="consumer group (default: a fresh one)")
    ap.add_argument("--from-beginning", action="store_true", help="read the topic from its earliest offset")
    ap.add_argument("--max-records", type=int, default=None)
    ap.add_argument("--idle-timeout", type=float, default=30.0, help="stop after this many seconds without a record")
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=10.0, help="importance weights are clipped at this")
    ap.add_argument("--schema", type=Path, default=None, help="validate every record against this JSON Schema")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args(argv)

    validate = None
    if args.schema is not None:
        import jsonschema

        validate = jsonschema.Draft202012Validator(json.loads(args.schema.read_text())).is_valid

    learner = EpsilonGreedyLearner(arms=list(STYLES), epsilon=args.epsilon)
    ope = OffPolicy(clip=args.clip)
    seen: set[str] = set()
    skipped = {"duplicate": 0, "no_style_or_propensity": 0, "invalid": 0}
    for rec in feedback(args):
        if validate is not None and not validate(rec):
            skipped["invalid"] += 1
            continue
        if rec["impression_id"] in seen:  # delivery is at-least-once: dedupe on impression_id
            skipped["duplicate"] += 1
            continue
        seen.add(rec["impression_id"])
        style, propensity = rec.get("style"), rec.get("propensity")
        if not style or not propensity or propensity <= 0:
            skipped["no_style_or_propensity"] += 1
            continue
        x = context(rec.get("features") or {})
        pi = learner.probabilities(x).get(style, 0.0) if style in learner.arms else 0.0
        ope.add(pi, float(propensity), bool(rec["clicked"]), str(rec.get("policy") or "-"))  # before learning
        learner.learn(x, style, bool(rec["clicked"]))

    out = ope.report()
    out["skipped"] = skipped
    if not ope.n:
        print(f"no usable feedback records on {args.topic} (skipped: {skipped})")
        return 1
    snips = "-" if out["learner_snips"] is None else f"{out['learner_snips']:.4f}"
    print(f"{ope.n} feedback records from {args.topic} (skipped: {skipped}); logging policies: {ope.policies}")
    print(f"livecopy's policy, logged CTR (on-policy):        {out['livecopy_logged_ctr']:.4f}")
    print(f"outside learner (River, epsilon-greedy {args.epsilon:g}), off-policy: "
          f"SNIPS {snips}  IPS {out['learner_ips']:.4f}  (ESS {out['learner_ess']:.1f}, clip {args.clip:g}, "
          f"{ope.clipped} clipped)")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
