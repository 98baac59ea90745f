"""Copy generation: unbatched vs micro-batched, in one run, on the shipped student.

    python benchmarks/generation.py [--device cpu|cuda] [--loads 1,3,6,12,24] [--duration 10]
                                    [--max-batch 32] [--max-wait-ms 10] [--json-out report.json]

The engine under test is the serving one (``engine.serving.CopyEngine``: bounded queue,
scheduler, ``StudentExecutor`` with K sampled candidates, CTR head, filter, Thompson policy).
"Unbatched" is the same engine with ``max_batch_size=1`` (each request still decodes its K
candidates together, as the real executor does); "micro-batched" uses ``--max-batch`` /
``--max-wait-ms``.

Two measurements per mode:

* **burst** (saturation): ``--burst`` requests submitted at once; copies/s = n / wall time.
* **open loop** at each offered load (Poisson arrivals, ``--duration`` s): achieved copies/s,
  p50/p99 latency of completed requests (submit -> result), and how many were refused
  (queue full) or expired (deadline ``--timeout-ms`` passed while queued). Offered loads above
  what a mode sustains show up as expired/refused requests, not as an ever-growing queue.

The report ends with the batching ratios: burst throughput, and achieved throughput at the
highest load where batching's p99 is equal or better than unbatched p99. On CUDA it also prints
the highest achieved copies/s with p99 <= 50 ms. On the CPU it also prints the arithmetic
ceiling of batching, measured in the same run: one full batch on the micro-batched executor under
``torch.profiler``, the time its matrix products take (linear layers, LM head, attention), and
the copies/s and ratio over the unbatched burst that batch would give if everything else in it
were free. Timings on a shared CPU are noisy: ratios come from one run, with both modes measured
back to back.
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
        self.expired = 0
        self.failed = 0
        self.first_done = float("inf")
        self.last_done = 0.0
        self.lock = threading.Lock()
        self.pending = 0
        self.idle = threading.Event()
        self.idle.set()

    def submit(self, req: CopyRequest, timeout_ms: float | None = None) -> bool:
        t0 = time.perf_counter()
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
                    self.first_done = min(self.first_done, t1)
                    self.last_done = max(self.last_done, t1)
                elif type(f.exception()).__name__ == "DeadlineExceeded":
                    self.expired += 1
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
              seed: int) -> Point:
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
        if not run.submit(reqs[submitted % len(reqs)]):
            refused += 1
    run.idle.wait()
    # achieved rate over the offered window (completions after it count: they were accepted in it)
    span = max(duration, (run.last_done - start) if run.lat else duration)
    sizes = list(engine.batching.stats.batch_sizes)
    return Point(mode, load, submitted, len(run.lat), refused, run.expired, len(run.lat) / span,
                 percentile(run.lat, 0.5) * 1e3, percentile(run.lat, 0.99) * 1e3,
                 sum(sizes) / max(len(sizes), 1))


MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


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
    ap.add_argument("--loads", default=None, help="Offered requests/s, comma-separated (default per device).")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--burst", type=int, default=None, help="Requests in the saturation burst.")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--timeout-ms", type=float, default=5000.0)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default 1 on CPU: on a shared 2-core box 2 threads ran 3-10x slower)")
    ap.add_argument("--slo-ms", type=float, default=50.0, help="p99 target reported on CUDA")
    ap.add_argument("--json-out", type=Path, default=None)
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    threads = a.threads if a.threads is not None else (0 if cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    loads = [float(x) for x in (a.loads or ("25,50,100,200,400,800" if cuda else "1,3,6,12,24")).split(",")]
    # The unbatched burst runs one request at a time: 512 of them on a GPU took minutes, 128 keep a run short.
    n_burst = a.burst or (128 if cuda else 64)
    base = dict(device=a.device, candidates=a.candidates, max_new_tokens=a.max_new_tokens, policy="thompson",
                timeout_ms=a.timeout_ms, max_queue=4096)
    modes = {
        "unbatched": CopySettings(**base, max_batch_size=1, max_wait_ms=0.0),
        "micro-batched": CopySettings(**base, max_batch_size=a.max_batch, max_wait_ms=a.max_wait_ms),
    }
    dev = torch.cuda.get_device_name(0) if cuda else machine()
    isa = "" if cuda else f", CPU capability {torch.backends.cpu.get_cpu_capability()}"
    print(f"device: {a.device} ({dev}); torch {torch.__version__}, threads {torch.get_num_threads()}{isa}")
    print(f"model: {a.model.name}; K={a.candidates} candidates, <= {a.max_new_tokens} new tokens, thompson; "
          f"{'bf16 autocast' if cuda else 'fp32'}; deadline {a.timeout_ms:g} ms")
    print(f"micro-batched: max_batch_size={a.max_batch}, max_wait_ms={a.max_wait_ms:g}; unbatched: max_batch_size=1")
    reqs = make_requests(max(n_burst, 256))
    points: list[Point] = []
    ceiling: tuple[float, float] | None = None
    print(f"\n{'mode':13} {'load':>8} {'sent':>6} {'done':>6} {'refuse':>6} {'expire':>6} "
          f"{'copies/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'batch':>7}")
    for mode, cfg in modes.items():
        engine = engine_for(a.model, cfg)
        try:
            engine.generate(reqs[:8])  # warm-up (allocator, kernels)
            points.append(burst(engine, reqs[:n_burst], mode))
            print(fmt(points[-1]), flush=True)
            for i, load in enumerate(loads):
                points.append(open_loop(engine, reqs, mode, load, a.duration, seed=i))
                print(fmt(points[-1]), flush=True)
            if mode == "micro-batched" and not cuda:
                ceiling = matmul_time(engine, reqs[:a.max_batch])
        finally:
            engine.stop()
    by = {(p.mode, p.load): p for p in points}
    ub, mb = by[("unbatched", 0.0)], by[("micro-batched", 0.0)]
    print(f"\nburst throughput: unbatched {ub.copies_per_s:.2f} copies/s, micro-batched {mb.copies_per_s:.2f} "
          f"copies/s -> {mb.copies_per_s / ub.copies_per_s:.1f}x")
    if ceiling is not None:
        wall, mm = ceiling
        top = a.max_batch / mm
        print(f"arithmetic ceiling: a batch of {a.max_batch} (profiled) spends {mm:.2f} of {wall:.2f} s in matrix "
              f"products; with all else free it would give {top:.1f} copies/s -> "
              f"{top / ub.copies_per_s:.1f}x the unbatched burst")
    best = None
    for load in loads:
        u, m = by[("unbatched", load)], by[("micro-batched", load)]
        if m.p99_ms <= u.p99_ms:
            best = (load, u, m)
    if best:
        load, u, m = best
        print(f"open loop, highest load with micro-batched p99 <= unbatched p99 ({load:g}/s offered): "
              f"{m.copies_per_s:.2f} vs {u.copies_per_s:.2f} copies/s -> "
              f"{m.copies_per_s / max(u.copies_per_s, 1e-9):.1f}x (p99 {m.p99_ms:.0f} vs {u.p99_ms:.0f} ms)")
    slo: dict[str, Any] = {}
    for mode in modes:
        ok = [p for p in points if p.mode == mode and p.load > 0 and p.p99_ms <= a.slo_ms and p.refused == 0
              and p.expired == 0]
        top = max(ok, key=lambda p: p.copies_per_s) if ok else None
        slo[mode] = asdict(top) if top else None
        if cuda or top:
            print(f"{mode}: highest copies/s with p99 <= {a.slo_ms:g} ms: "
                  + (f"{top.copies_per_s:.1f} (offered {top.load:g}/s, p99 {top.p99_ms:.1f} ms)" if top else "none"))
    if a.json_out:
        a.json_out.write_text(json.dumps({"device": a.device, "device_name": dev, "points": [asdict(p) for p in points],
                                          "slo": slo,
                                          "matmul_ceiling": None if ceiling is None else
                                          {"batch": a.max_batch, "wall_s": ceiling[0], "matmul_s": ceiling[1]}},
                                         indent=2))


if __name__ == "__main__":
    main()
