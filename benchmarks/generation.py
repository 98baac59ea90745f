"""Copy generation: the static and the continuous engine (and unbatched), in one run, on the shipped student.

    python benchmarks/generation.py [--device cpu|cuda] [--engines static,continuous[,unbatched]]
                                    [--load-fraction 0.5] [--loads 1,3,6] [--duration 20]
                                    [--deadline-ms 300] [--max-batch 32] [--json-out report.json]

The engine under test is the serving one (``engine.serving.CopyEngine``: bounded queue, K sampled
candidates, CTR head, filter, Thompson policy) with ``generation.engine``:

* **static** (``engine/batching.py``): micro-batches of up to ``--max-batch`` requests
  (``--max-wait-ms`` for company), each run from prefill to its last EOS;
* **continuous** (``engine/continuous.py``): up to ``--max-batch`` requests decode together, a new
  one joins at the next step, a finished one is answered at once;
* **unbatched** (only when listed): the static engine with ``max_batch_size=1``.

Measurements, all engines back to back in one process:

* **burst** (saturation): ``--burst`` requests submitted at once; copies/s = n / wall time.
* **open loop** (Poisson arrivals, ``--duration`` s) at ``--load-fraction`` of the static engine's
  saturated copies/s (the same offered load for every engine), and at each of ``--loads``:
  achieved copies/s, p50/p99 latency (submit -> result), refused and expired requests. The
  report prints continuous p99 / static p99 at that load (target: <= 1/3).
* **deadlines** (``--deadline-ms`` > 0): open loop at 1.5x the highest saturated rate (so every
  engine is overloaded) with that deadline: how late the 503 answers (``DeadlineExceeded``) come
  after their deadline (p99, max;
  target: within 100 ms). The continuous engine checks deadlines at every step; the static one only
  before a batch starts, so a request that started in time is answered when its batch ends.

On the CPU it also prints the arithmetic ceiling of static batching: one full batch under
``torch.profiler``, the time its matrix products take. On CUDA: the highest copies/s with p99 <=
``--slo-ms``. Timings on a shared CPU are noisy: ratios come from one run, engines measured back to
back.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._common import machine, percentile
from core.catalog import Catalog
from core.settings import CopySettings
from engine.batching import Overloaded
from engine.executor import CopyRequest, load_executor
from engine.serving import CopyEngine
from models.paths import shipped_student_dir
from models.text.context import context_from_profile, product_context


@dataclass
class Point:
    mode: str
    load: float  # offered requests/s (0: burst)
    submitted: int
    completed: int
    refused: int
    expired: int
    copies_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    in_time: int = 0  # completed within their deadline (the static engine's deadline is only to start)


def make_requests(n: int, seed: int = 1) -> list[CopyRequest]:
    cat = Catalog.generate()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = cat.sample(rng)
        ctx = product_context(p, rng.choice(["pdp", "feed", None]))
        if i % 2:  # half with a persona
            ctx = context_from_profile(p, None, ctx.slot).with_persona(
                user="returning", engagement=rng.choice(["casual", "engaged"]),
                price_sensitivity=rng.choice(["low", "mid", "high"]), likes=(p.category.split("/")[-1],),
                affinity=rng.choice(["some", "high"]))
        out.append(CopyRequest(f"bench-{i}", ctx, profile_version=i % 7))
    return out


class Run:
    def __init__(self, engine: CopyEngine) -> None:
        self.engine = engine
        self.lat: list[float] = []
        self.late: list[float] = []  # DeadlineExceeded answers: seconds after the deadline
        self.expired = 0
        self.in_time = 0
        self.failed = 0
        self.first_done = float("inf")
        self.last_done = 0.0
        self.lock = threading.Lock()
        self.pending = 0
        self.idle = threading.Event()
        self.idle.set()

    def submit(self, req: CopyRequest, timeout_ms: float | None = None) -> bool:
        t0 = time.perf_counter()
        budget = (timeout_ms if timeout_ms is not None else self.engine.cfg.timeout_ms) / 1000.0
        try:
            fut: Future[Any] = self.engine.submit(req, timeout_ms)
        except Overloaded:
            return False
        with self.lock:
            self.pending += 1
            self.idle.clear()

        def done(f: Future[Any]) -> None:
            t1 = time.perf_counter()
            with self.lock:
                if f.exception() is None:
                    self.lat.append(t1 - t0)
                    self.in_time += t1 - t0 <= budget
                    self.first_done = min(self.first_done, t1)
                    self.last_done = max(self.last_done, t1)
                elif type(f.exception()).__name__ == "DeadlineExceeded":
                    self.expired += 1
                    self.late.append(t1 - t0 - budget)
                else:
                    self.failed += 1
                self.pending -= 1
                if self.pending == 0:
                    self.idle.set()

        fut.add_done_callback(done)
        return True


def engine_for(model_dir: Path, cfg: CopySettings) -> CopyEngine:
    return CopyEngine(load_executor(model_dir, cfg), cfg).start()


def burst(engine: CopyEngine, reqs: list[CopyRequest], mode: str) -> Point:
    engine.batching.stats.batch_sizes.clear()
    run = Run(engine)
    t0 = time.perf_counter()
    for r in reqs:
        run.submit(r, timeout_ms=600_000.0)  # a burst is about throughput: no deadline
    run.idle.wait()
    wall = time.perf_counter() - t0
    sizes = list(engine.batching.stats.batch_sizes)
    return Point(mode, 0.0, len(reqs), len(run.lat), 0, run.expired, len(run.lat) / wall,
                 percentile(run.lat, 0.5) * 1e3, percentile(run.lat, 0.99) * 1e3,
                 sum(sizes) / max(len(sizes), 1))


def open_loop(engine: CopyEngine, reqs: list[CopyRequest], mode: str, load: float, duration: float,
              seed: int, timeout_ms: float | None = None, late: list[float] | None = None) -> Point:
    engine.batching.stats.batch_sizes.clear()
    rng = random.Random(seed)
    run = Run(engine)
    refused = submitted = 0
    start = time.perf_counter()
    t = start
    while True:
        t += rng.expovariate(load)
        if t - start > duration:
            break
        delay = t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submitted += 1
        if not run.submit(reqs[submitted % len(reqs)], timeout_ms):
            refused += 1
    run.idle.wait()
    if late is not None:
        late.extend(run.late)
    # achieved rate over the offered window (completions after it count: they were accepted in it)
    span = max(duration, (run.last_done - start) if run.lat else duration)
    sizes = list(engine.batching.stats.batch_sizes)
    return Point(mode, load, submitted, len(run.lat), refused, run.expired, len(run.lat) / span,
                 percentile(run.lat, 0.5) * 1e3, percentile(run.lat, 0.99) * 1e3,
                 sum(sizes) / max(len(sizes), 1), run.in_time)


MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "quantized::linear_dynamic")


def matmul_time(engine: CopyEngine, reqs: list[CopyRequest]) -> tuple[float, float]:
    """(wall s, s in matrix products) of one batch of ``reqs`` run on the engine's executor directly
    (the engine idle), under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        engine.executor.run(reqs)
        wall = time.perf_counter() - t0
    mm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS) / 1e6
    return wall, mm


def fmt(p: Point) -> str:
    load = "burst" if p.load == 0 else f"{p.load:g}/s"
    return (f"{p.mode:13} {load:>8} {p.submitted:6d} {p.completed:6d} {p.refused:6d} {p.expired:6d} "
            f"{p.copies_per_s:9.2f} {p.p50_ms:9.1f} {p.p99_ms:9.1f} {p.mean_batch:7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=shipped_student_dir())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engines", default="static,continuous",
                    help="Comma-separated: static, continuous, unbatched (static with max_batch_size=1).")
    ap.add_argument("--engine", choices=["static", "continuous"], default=None, help="Only this engine.")
    ap.add_argument("--load-fraction", type=float, default=0.5,
                    help="Open-loop load as a fraction of the static engine's saturated copies/s (0: none).")
    ap.add_argument("--loads", default="", help="More offered requests/s, comma-separated.")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--burst", type=int, default=None, help="Requests in the saturation burst.")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--timeout-ms", type=float, default=5000.0)
    ap.add_argument("--deadline-ms", type=float, default=1000.0, help="Deadline of the overload run (0: no run).")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default 1 on CPU: on a shared 2-core box 2 threads ran 3-10x slower)")
    ap.add_argument("--slo-ms", type=float, default=50.0, help="p99 target reported on CUDA")
    ap.add_argument("--ceiling", action="store_true", help="CPU: profile one static batch's matrix products.")
    ap.add_argument("--compile", action="store_true",
                    help="Continuous engine: torch.compile the decode step (generation.compile_decode).")
    ap.add_argument("--draft-tokens", type=int, default=None, help="Continuous: speculative drafts per row (0: none).")
    ap.add_argument("--draft-max-rows", type=int, default=None,
                    help="Continuous: speculate while rows x (1 + drafts) <= this.")
    ap.add_argument("--json-out", type=Path, default=None)
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    threads = a.threads if a.threads is not None else (0 if cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    names = [a.engine] if a.engine else [x.strip() for x in a.engines.split(",") if x.strip()]
    extra_loads = [float(x) for x in a.loads.split(",") if x.strip()]
    n_burst = a.burst or (256 if cuda else 96)
    drafts = {k: v for k, v in (("draft_tokens", a.draft_tokens), ("draft_max_rows", a.draft_max_rows))
              if v is not None}
    base = dict(device=a.device, candidates=a.candidates, max_new_tokens=a.max_new_tokens, policy="thompson",
                timeout_ms=a.timeout_ms, max_queue=4096)
    all_modes = {
        "unbatched": CopySettings(**base, engine="static", max_batch_size=1, max_wait_ms=0.0),
        "static": CopySettings(**base, engine="static", max_batch_size=a.max_batch, max_wait_ms=a.max_wait_ms),
        "continuous": CopySettings(**base, engine="continuous", max_batch_size=a.max_batch, compile_decode=a.compile,
                                   **drafts),
    }
    modes = {m: all_modes[m] for m in names}
    dev = torch.cuda.get_device_name(0) if cuda else machine()
    isa = "" if cuda else f", CPU capability {torch.backends.cpu.get_cpu_capability()}"
    print(f"device: {a.device} ({dev}); torch {torch.__version__}, threads {torch.get_num_threads()}{isa}")
    print(f"model: {a.model.name}; K={a.candidates} candidates, <= {a.max_new_tokens} new tokens, thompson; "
          f"{'bf16 autocast' if cuda else CopySettings().cpu_weights + ' weights'}; deadline {a.timeout_ms:g} ms")
    d = CopySettings(**drafts)
    spec = (f"speculative steps with up to {d.draft_tokens} drafts while rows x (1 + drafts) <= {d.draft_max_rows}"
            if d.draft_tokens and not (cuda or a.compile) else "no speculative steps")
    print(f"static: max_batch_size={a.max_batch}, max_wait_ms={a.max_wait_ms:g}; continuous: up to {a.max_batch} "
          f"requests decoding together, {spec}")
    reqs = make_requests(max(n_burst, 256))
    points: list[Point] = []
    late: dict[str, list[float]] = {}
    ceiling: tuple[float, float] | None = None
    print(f"\n{'mode':13} {'load':>8} {'sent':>6} {'done':>6} {'refuse':>6} {'expire':>6} "
          f"{'copies/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'batch':>7}")
    engines = {}
    try:
        for mode, cfg in modes.items():
            engines[mode] = engine = engine_for(a.model, cfg)
            engine.generate(reqs[:8])  # warm-up (allocator, kernels)
            points.append(burst(engine, reqs[:n_burst] if mode != "unbatched" else reqs[: n_burst // 3], mode))
            print(fmt(points[-1]), flush=True)
        sat = {p.mode: p.copies_per_s for p in points}
        ref = sat.get("static") or max(sat.values())
        loads = ([round(a.load_fraction * ref, 2)] if a.load_fraction > 0 else []) + extra_loads
        for i, load in enumerate(loads):
            for mode, engine in engines.items():
                points.append(open_loop(engine, reqs, mode, load, a.duration, seed=i))
                print(fmt(points[-1]), flush=True)
        if a.deadline_ms > 0:
            over = round(1.5 * max(sat.values()), 2)  # every engine overloaded: its deadlines are what is read
            print(f"\noverload {over:g}/s with a {a.deadline_ms:g} ms deadline:")
            for mode, engine in engines.items():
                late[mode] = []
                points.append(open_loop(engine, reqs, f"{mode}/dl", over, min(a.duration, 10.0), seed=99,
                                        timeout_ms=a.deadline_ms, late=late[mode]))
                print(fmt(points[-1]) + f"   in time: {points[-1].in_time}", flush=True)
        if a.ceiling and not cuda and "static" in engines:
            ceiling = matmul_time(engines["static"], reqs[:a.max_batch])
    finally:
        for engine in engines.values():
            engine.stop()
    by = {(p.mode, p.load): p for p in points}
    summary: dict[str, Any] = {"saturated": sat}
    print("\nsaturated (burst) copies/s: " + ", ".join(f"{m} {v:.2f}" for m, v in sat.items()))
    if "static" in sat and "continuous" in sat:
        summary["burst_ratio"] = sat["continuous"] / sat["static"]
        print(f"  continuous / static: {summary['burst_ratio']:.2f}x")
    if loads and ("static", loads[0]) in by and ("continuous", loads[0]) in by:
        st, co = by[("static", loads[0])], by[("continuous", loads[0])]
        ratio = co.p99_ms / max(st.p99_ms, 1e-9)
        summary["p99_at_load"] = {"load": loads[0], "static_ms": st.p99_ms, "continuous_ms": co.p99_ms,
                                  "ratio": ratio}
        print(f"open loop at {loads[0]:g}/s ({a.load_fraction:g} x static saturation): p99 static {st.p99_ms:.0f} ms, "
              f"continuous {co.p99_ms:.0f} ms -> {ratio:.2f} (target <= 0.33: "
              f"{'met' if ratio <= 1 / 3 else 'missed'}); p50 {st.p50_ms:.0f} vs {co.p50_ms:.0f} ms")
    for mode, xs in late.items():
        if xs:
            p99, worst = percentile(xs, 0.99) * 1e3, max(xs) * 1e3
            summary.setdefault("deadline_late_ms", {})[mode] = {"n": len(xs), "p99": p99, "max": worst}
            print(f"{mode}: {len(xs)} deadline answers, {p99:.0f} ms (p99) / {worst:.0f} ms (max) after the deadline "
                  f"(target <= 100 ms: {'met' if worst <= 100 else 'missed'})")
        else:
            print(f"{mode}: no deadline answers")
    if ceiling is not None:
        wall, mm = ceiling
        top = a.max_batch / mm
        print(f"arithmetic ceiling: a static batch of {a.max_batch} (profiled) spends {mm:.2f} of {wall:.2f} s in "
              f"matrix products; with all else free it would give {top:.1f} copies/s")
    slo: dict[str, Any] = {}
    for mode in modes:
        ok = [p for p in points if p.mode == mode and p.load > 0 and p.p99_ms <= a.slo_ms and p.refused == 0
              and p.expired == 0]
        top_p = max(ok, key=lambda p: p.copies_per_s) if ok else None
        slo[mode] = asdict(top_p) if top_p else None
        if cuda:
            print(f"{mode}: highest copies/s with p99 <= {a.slo_ms:g} ms: "
                  + (f"{top_p.copies_per_s:.1f} (offered {top_p.load:g}/s, p99 {top_p.p99_ms:.1f} ms)" if top_p
                     else "none"))
    if a.json_out:
        a.json_out.write_text(json.dumps({"device": a.device, "device_name": dev, "points": [asdict(p) for p in points],
                                          "summary": summary, "slo": slo,
                                          "matmul_ceiling": None if ceiling is None else
                                          {"batch": a.max_batch, "wall_s": ceiling[0], "matmul_s": ceiling[1]}},
                                         indent=2))


if __name__ == "__main__":
    main()
