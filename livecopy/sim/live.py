"""`livecopy simulate`: the shoppers against the real services (HTTP copy, Kafka events).

Shoppers are split by a hash of their id into two groups:

* **live** (most of them): copy comes from the real ``GET /v1/copy`` (the online policy: whatever
  model version the copy service serves, hot-reloaded as the trainer publishes), and all their
  events -- views, impressions, clicks, carts -- go to ``livecopy.events`` through the SDK
  (:class:`stream.producer.EventProducer`), so the profile worker, the feedback joiner and the
  trainer learn from them;
* **holdout** (``holdout_share``): copy comes from the shipped student run in this process with
  no online learning (the ``static`` policy); the same K candidates also give the ``random``
  policy (one of them uniformly) and the ``oracle`` (the best under the hidden model), scored by
  their expected hidden CTR. Their browsing events are published (profiles stay realistic) but
  not their impressions and clicks: those copies never went through the copy service, and the
  learner must only learn from what it served.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livecopy.sim.population import PopulationConfig, click_probability
from livecopy.sim.shoppers import CopyAsk, Outcome, ShownCopy

log = logging.getLogger(__name__)

LIVE_ARMS = ("random", "static", "online", "oracle")


HOLDOUT_COPY_PREFIX = "c-holdout-"


def wilson(clicks: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a click-through rate (nan, nan without impressions)."""
    if n <= 0:
        return math.nan, math.nan
    p = clicks / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return mid - half, mid + half


def in_holdout(user_id: str, share: float) -> bool:
    return (zlib.crc32(user_id.encode()) % 10_000) < share * 10_000


class HttpCopySource:
    """Asks ``GET {base_url}/v1/copy`` for each ask, ``workers`` requests at a time."""

    def __init__(self, base_url: str, *, timeout_s: float = 15.0, workers: int = 16,
                 on_latency: Callable[[float], None] | None = None, api_key: str | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sim-http")
        self.on_latency = on_latency
        self.errors: dict[str, int] = {}

    def one(self, ask: CopyAsk) -> ShownCopy | None:
        q = urllib.parse.urlencode({"user_id": ask.shopper.user_id, "product_id": ask.product.product_id,
                                    "slot": ask.slot})
        t0 = time.monotonic()
        for attempt in range(3):
            try:
                req = urllib.request.Request(f"{self.base}/v1/copy?{q}", headers=self.headers)
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    body = json.loads(r.read())
                if self.on_latency:
                    self.on_latency(time.monotonic() - t0)
                return ShownCopy(copy_id=body["copy_id"], text=body["text"], model_version=body["model_version"],
                                 policy=body.get("policy", ""), style=None)
            except urllib.error.HTTPError as exc:
                self.errors[str(exc.code)] = self.errors.get(str(exc.code), 0) + 1
                if exc.code != 503:
                    return None
                time.sleep(0.2 * (attempt + 1))
            except (OSError, ValueError, KeyError) as exc:
                key = type(exc).__name__
                self.errors[key] = self.errors.get(key, 0) + 1
                return None
        return None

    def __call__(self, asks: Sequence[CopyAsk]) -> list[ShownCopy | None]:
        return list(self.pool.map(self.one, asks))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class StaticShadow:
    """The holdout's copy: the shipped student, K candidates, safety filter, Thompson on its
    shipped CTR head -- never updated. Also scores random and oracle on the same candidates."""

    def __init__(self, settings: Any, pop_cfg: PopulationConfig, catalog: Any, *, k: int = 4, seed: int = 0) -> None:
        from engine.executor import load_executor
        from models.paths import shipped_student_dir
        from stream.profile.store import RedisProfileStore
        from stream.redis_io import redis_client

        cfg = settings.generation.model_copy(update={"candidates": k, "seed": seed, "device": "cpu"})
        path = settings.generation.model_dir or settings.models.student_dir or shipped_student_dir()
        self.executor = load_executor(path, cfg)
        self.settings = settings
        self.pop_cfg = pop_cfg
        self.catalog = catalog
        self.store = RedisProfileStore(redis_client(settings.redis), settings.profile,
                                       settings.redis.key_prefix)
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.version = self.executor.version
        self._engine: Any = None

    def run(self, asks: Sequence[CopyAsk]) -> list[ShownCopy | None]:
        return self(asks)

    def one(self, ask: CopyAsk) -> ShownCopy | None:
        """One ask through a micro-batching engine (asks of concurrent shoppers share a batch)."""
        from engine.batching import BatchConfig, BatchingEngine

        if self._engine is None:
            self._engine = BatchingEngine(self, BatchConfig(max_batch_size=32, max_wait_ms=20.0, max_queue=1024,
                                                            default_timeout_ms=120_000)).start()
        try:
            return self._engine.submit(ask).result(timeout=180)
        except Exception:
            log.exception("holdout copy failed")
            return None

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()

    def _context(self, ask: CopyAsk) -> Any:
        from models.text.context import context_from_profile
        from stream.profile.logic import render

        st = self.store.load(ask.shopper.user_id)
        prof = render(ask.shopper.user_id, st, self.settings.profile) if st is not None else None
        return context_from_profile(ask.product, prof, ask.slot, lookup=self.catalog.get)

    def __call__(self, asks: Sequence[CopyAsk]) -> list[ShownCopy | None]:
        from core.styles import classify_style
        from models.generate import generate_candidates
        from models.text.context import build_prompt
        from models.text.slots import available

        if not asks:
            return []
        ex = self.executor
        ctxs = [self._context(a) for a in asks]
        self.seed += 1
        groups = generate_candidates(ex.student.model, ex.student.tokenizer, [build_prompt(c) for c in ctxs],
                                     k=ex.cfg.candidates, max_new_tokens=ex.cfg.max_new_tokens,
                                     temperature=ex.cfg.temperature, top_k=ex.cfg.top_k, top_p=ex.cfg.top_p,
                                     seed=self.seed, slots_ok=[available(c) for c in ctxs],
                                     weights=ex.cfg.cpu_weights)
        out: list[ShownCopy | None] = []
        for ask, ctx, group in zip(asks, ctxs, groups, strict=True):
            rendered = [ex.render(c.text, ctx) for c in group]  # slots filled, grounding + filter
            ok = np.array([res.ok for _, res in rendered])
            if not ok.any():
                ok[:] = True
            idx = np.flatnonzero(ok)
            texts = [rendered[i][0] for i in idx]
            seen = [classify_style(t) for t in texts]
            p_true = np.array([click_probability(self.pop_cfg, ask.shopper, ask.product, t, ask.slot, s)
                               for t, s in zip(texts, seen, strict=True)])
            scores = np.array([group[i].ctr if group[i].ctr is not None else 0.5 for i in idx])
            fl = [group[i].ctr_features for i in idx]
            feats = np.stack([f for f in fl if f is not None]) if all(f is not None for f in fl) else None
            if feats is not None and ex.posterior is not None and feats.shape[1] + 1 == ex.posterior.dim:
                j = ex.chooser.choose(feats, scores, ex.posterior, self.rng).index
            else:
                j = int(np.argmax(scores))
            picks = {"static": j, "random": int(self.rng.integers(len(idx))), "oracle": int(np.argmax(p_true))}
            out.append(ShownCopy(
                copy_id=f"{HOLDOUT_COPY_PREFIX}{ask.seq}", text=texts[j], model_version=self.version, policy="static",
                style=seen[j], arm_p={a: float(p_true[i]) for a, i in picks.items()},
                arm_style={a: seen[i] for a, i in picks.items()},
            ))
        return out


class SplitSource:
    """A fixed share of impressions, drawn per impression (by a hash of shopper and impression
    number), to the static shadow (static, random and oracle are scored on them); all others to the
    live copy service. Callable on a batch of asks (lock-step runs) or one ask at a time (:meth:`one`)."""

    def __init__(self, live: Callable[[Sequence[CopyAsk]], Sequence[ShownCopy | None]],
                 holdout: Callable[[Sequence[CopyAsk]], Sequence[ShownCopy | None]] | None, share: float, *,
                 live_one: Callable[[CopyAsk], ShownCopy | None] | None = None,
                 holdout_one: Callable[[CopyAsk], ShownCopy | None] | None = None) -> None:
        self.live, self.holdout, self.share = live, holdout, share
        self.live_one, self.holdout_one = live_one, holdout_one

    def is_holdout(self, ask: CopyAsk) -> bool:
        return self.holdout is not None and in_holdout(f"{ask.shopper.user_id}/{ask.seq}", self.share)

    @staticmethod
    def is_holdout_copy(copy_id: str | None) -> bool:
        """Whether an impression or click names a copy the shadow showed (the learner must not see it)."""
        return bool(copy_id) and str(copy_id).startswith(HOLDOUT_COPY_PREFIX)

    def one(self, ask: CopyAsk) -> ShownCopy | None:
        if self.is_holdout(ask):
            return self.holdout_one(ask) if self.holdout_one is not None else None
        return self.live_one(ask) if self.live_one is not None else self.live([ask])[0]

    def __call__(self, asks: Sequence[CopyAsk]) -> list[ShownCopy | None]:
        hold = [i for i, a in enumerate(asks) if self.is_holdout(a)]
        held = set(hold)
        live = [i for i in range(len(asks)) if i not in held]
        out: list[ShownCopy | None] = [None] * len(asks)
        results: dict[str, Sequence[ShownCopy | None]] = {}

        def run_holdout() -> None:
            assert self.holdout is not None
            results["h"] = self.holdout([asks[i] for i in hold])

        th = None
        if hold:
            th = threading.Thread(target=run_holdout, name="sim-holdout")
            th.start()
        live_res = self.live([asks[i] for i in live]) if live else []
        if th is not None:
            th.join()
        for i, r in zip(live, live_res, strict=True):
            out[i] = r
        for i, r in zip(hold, results.get("h", []), strict=True):
            out[i] = r
        return out


@dataclass
class LiveStats:
    """What the live view and the final report show. Written by the session threads (outcomes,
    events, failures) and the HTTP threads (latencies), read by the live view: one lock."""

    started: float = field(default_factory=time.monotonic)
    arm_p: dict[str, list[float]] = field(default_factory=lambda: {a: [] for a in LIVE_ARMS})
    online_clicks: list[int] = field(default_factory=list)
    version_log: list[tuple[int, str]] = field(default_factory=list)  # (online impression index, version)
    events: int = 0
    copies: int = 0
    failed: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    recent: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=120))  # (t, events, copies)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def latency(self, s: float) -> None:
        with self.lock:
            self.latencies.append(s)

    def event(self) -> None:
        with self.lock:
            self.events += 1

    def fail(self) -> None:
        with self.lock:
            self.failed += 1

    def outcome(self, o: Outcome) -> None:
        shown = o.shown
        with self.lock:
            self.copies += 1
            if shown.arm_p is not None:  # holdout: static (shown), random and oracle
                for a, p in shown.arm_p.items():
                    self.arm_p[a].append(p)
                return
            self.arm_p["online"].append(shown.p_click)
            self.online_clicks.append(int(shown.clicked))
            v = shown.model_version
            if not self.version_log or self.version_log[-1][1] != v:
                self.version_log.append((len(self.online_clicks) - 1, v))

    def tick(self) -> None:
        with self.lock:
            self.recent.append((time.monotonic(), self.events, self.copies))

    def rates(self) -> tuple[float, float]:
        """(events/s, copies/s) over the last ~10 s."""
        if len(self.recent) < 2:
            el = max(1e-6, time.monotonic() - self.started)
            return self.events / el, self.copies / el
        t1, e1, c1 = self.recent[-1]
        t0, e0, c0 = self.recent[max(0, len(self.recent) - 11)]
        dt = max(1e-6, t1 - t0)
        return (e1 - e0) / dt, (c1 - c0) / dt

    def p99_ms(self) -> float:
        if not self.latencies:
            return math.nan
        return float(np.percentile(np.fromiter(self.latencies, float), 99) * 1000.0)

    def version_ctr(self) -> list[tuple[str, int, float, float]]:
        """(version, impressions, realised CTR, expected CTR) in serving order."""
        bounds = [*self.version_log, (len(self.online_clicks), "")]
        out: dict[str, list[float]] = {}
        for (start, v), (end, _) in itertools.pairwise(bounds):
            acc = out.setdefault(v, [0.0, 0.0, 0.0])
            acc[0] += end - start
            acc[1] += sum(self.online_clicks[start:end])
            acc[2] += sum(self.arm_p["online"][start:end])
        return [(v, int(n), k / n if n else math.nan, p / n if n else math.nan) for v, (n, k, p) in out.items()]

    def version_rows(self) -> list[dict[str, Any]]:
        """Per serving version: impressions, realised CTR with its 95% Wilson interval, expected CTR."""
        rows = []
        for v, n, c, e in self.version_ctr():
            lo, hi = wilson(c * n if n else 0.0, n)
            rows.append({"version": v, "impressions": n, "ctr": c, "ctr_lo": lo, "ctr_hi": hi, "expected_ctr": e})
        return rows

    def ctr(self, arm: str, last: int | None = None) -> float:
        xs = self.arm_p[arm][-last:] if last else self.arm_p[arm]
        return float(np.mean(xs)) if xs else math.nan

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            ev, cp = self.rates()
            return {
                "elapsed_s": round(time.monotonic() - self.started, 1), "events": self.events,
                "copies": self.copies, "failed": self.failed, "events_per_s": ev, "copies_per_s": cp,
                "p99_ms": self.p99_ms(),
                "ctr": {a: self.ctr(a) for a in LIVE_ARMS}, "ctr_recent": {a: self.ctr(a, 500) for a in LIVE_ARMS},
                "impressions": {a: len(self.arm_p[a]) for a in LIVE_ARMS},
                "online_realised_ctr": float(np.mean(self.online_clicks)) if self.online_clicks else math.nan,
                "versions": self.version_rows(),
            }


def render_live(stats: LiveStats, title: str = "livecopy demo") -> Any:
    """A rich renderable of the live numbers."""
    from rich.table import Table

    snap = stats.snapshot()
    t = Table(title=f"{title}  ({snap['elapsed_s']:.0f} s)", show_lines=False)
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("events/s", f"{snap['events_per_s']:.1f}")
    t.add_row("copies/s", f"{snap['copies_per_s']:.1f}")
    t.add_row("copy p99 (client)", f"{snap['p99_ms']:.0f} ms")
    t.add_row("events / copies / failed", f"{snap['events']:,} / {snap['copies']:,} / {snap['failed']:,}")
    for a in LIVE_ARMS:
        t.add_row(f"CTR {a}", f"{snap['ctr'][a]:.4f}  (last 500: {snap['ctr_recent'][a]:.4f}, "
                              f"n={snap['impressions'][a]:,})")
    t.add_row("online realised CTR", f"{snap['online_realised_ctr']:.4f}")
    for row in snap["versions"][-6:]:
        t.add_row(f"  model {row['version'][:28]}", f"n={row['impressions']:,} CTR {row['ctr']:.4f} "
                                                   f"[{row['ctr_lo']:.3f}, {row['ctr_hi']:.3f}] "
                                                   f"(expected {row['expected_ctr']:.4f})")
    return t
