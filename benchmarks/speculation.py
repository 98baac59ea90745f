"""Speculative steps by batch size: copies/s of the continuous decode with 0..D drafts per row, in one run (CPU).

    python benchmarks/speculation.py [--batches 1,2,3,4,6,8,12] [--depths 0,1,2,3,4] [--prompts 48]

For each number of requests decoding together (b, K candidates each) and each draft depth d, the
shipped student decodes ``--prompts`` requests b at a time with ``models.continuous.ContinuousDecoder``
(peers.py's harness: the draft table filled first by ``--warm-requests`` other requests, each run
starting from it), speculating at every step with exactly d drafts per row (d = 0: plain steps).
Prints copies/s, ms per step and steps per request, then which depth the served settings
(``generation.draft_tokens`` / ``draft_max_rows``: the most drafts with b x K x (1 + d) <= max rows)
pick at each b against the best measured one: the evidence behind ``draft_max_rows``.

Then, with the served depths, copies/s for each ``--tail-places`` value (``generation.draft_tail_places``:
a step whose rows still decoding x (1 + drafts) fit in that many places gives each row more drafts,
up to 8; 0: off), the runs interleaved and the median of ``--repeats``: the evidence behind its 28.
Last, for each ``--first-drafts`` value (``generation.draft_first_tokens``: the drafts a row gets at
most in its first step, right after its style token; none: no cap), the same way: the evidence behind its 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._common import machine
from benchmarks.generation import make_requests
from benchmarks.peers import Bench
from core.settings import CopySettings
from engine.executor import load_executor
from models.paths import shipped_student_dir


def served_depth(b: int, k: int, cfg: CopySettings) -> int:
    """The drafts a step of b requests gets with the served settings (models.continuous.ContinuousDecoder.step)."""
    fit = cfg.draft_max_rows // (b * k)
    return min(cfg.draft_tokens, fit - 1) if fit >= 2 else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=shipped_student_dir())
    ap.add_argument("--batches", default="1,2,3,4,6,8,12")
    ap.add_argument("--depths", default="0,1,2,3,4")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--warm-requests", type=int, default=128)
    ap.add_argument("--tail-places", default="0,12,20,28")
    ap.add_argument("--tail-batches", default="1,2,4,8")
    ap.add_argument("--first-drafts", default="none,0,1,2,3",
                    help="Values of generation.draft_first_tokens for the third table (none: no cap).")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = CopySettings(device="cpu", candidates=a.k, max_new_tokens=a.max_new_tokens)
    ex = load_executor(a.model, cfg)
    bench = Bench(ex, make_requests(a.prompts, seed=3), a.k, a.max_new_tokens)
    bench.warm_drafts(make_requests(a.warm_requests, seed=7))
    depths = [int(x) for x in a.depths.split(",")]
    print(f"CPU: {machine()}; torch {torch.__version__}, 1 thread; {a.prompts} prompts, K={a.k}, "
          f"<= {a.max_new_tokens} new tokens; served: draft_tokens={cfg.draft_tokens}, "
          f"draft_max_rows={cfg.draft_max_rows}, draft_tail_places={cfg.draft_tail_places}, "
          f"draft_first_tokens={cfg.draft_first_tokens}")
    print(f"\n{'b':>3} " + " ".join(f"{f'd={d}: copies/s ms/step steps':>32}" for d in depths))
    picks = []
    for b in (int(x) for x in a.batches.split(",")):
        rates = {}
        cells = []
        for d in depths:
            def run(idx: list[int], seed: int, d: int = d) -> None:
                bench.livecopy_continuous(idx, seed, drafts=d > 0, depth=d, spec_rows=10**9, spec_places=0)

            bench.reset()
            run(list(range(min(b, a.prompts))), 0)  # warm-up
            bench.reset()
            steps0 = bench.steps
            t0 = time.perf_counter()
            for s in range(0, a.prompts, b):
                run(list(range(s, min(s + b, a.prompts))), s)
            wall = time.perf_counter() - t0
            steps = bench.steps - steps0
            rates[d] = a.prompts / wall
            groups = -(-a.prompts // b)
            cells.append(f"{rates[d]:13.2f} {wall / steps * 1e3:8.2f} {steps / groups:9.1f}")
        best = max(rates, key=rates.__getitem__)
        picks.append((b, served_depth(b, a.k, cfg), best, rates))
        print(f"{b:3d} " + " ".join(f"{c:>32}" for c in cells), flush=True)
    print("\nserved depth vs best measured (copies/s ratio):")
    for b, served, best, rates in picks:
        got = rates.get(served)
        ratio = f"{got / rates[best]:.2f}" if got is not None else "n/a"
        print(f"  b={b:3d}: served d={served} ({ratio} of best), best d={best}")

    batches = [int(x) for x in a.tail_batches.split(",")]
    places = [int(x) for x in a.tail_places.split(",")]
    print(f"\nserved depths, draft_tail_places = {a.tail_places} (copies/s, median of {a.repeats}, interleaved):")
    interleaved(bench, a.prompts, batches, a.repeats, "spec_places", places)
    firsts = [None if x.strip() == "none" else int(x) for x in a.first_drafts.split(",")]
    print(f"\nserved depths, draft_first_tokens = {a.first_drafts} (a row's first step after its style token; "
          f"copies/s, median of {a.repeats}, interleaved; ratio to the first):")
    interleaved(bench, a.prompts, batches, a.repeats, "first", firsts)


def interleaved(bench: Bench, prompts: int, batches: list[int], repeats: int, knob: str,
                values: Sequence[int | None]) -> None:
    """Per batch size, copies/s with each value of ``knob`` (a ``Bench.livecopy_continuous`` keyword),
    the values in turn each round, medians printed with their ratio to the first value's."""
    for b in batches:
        got: dict[int | None, list[float]] = {v: [] for v in values}
        for _ in range(repeats):
            for v in values:
                bench.reset()
                t0 = time.perf_counter()
                for s in range(0, prompts, b):
                    kw: dict[str, Any] = {knob: v}
                    bench.livecopy_continuous(list(range(s, min(s + b, prompts))), s, **kw)
                got[v].append(prompts / (time.perf_counter() - t0))
        med = {v: statistics.median(x) for v, x in got.items()}
        print(f"{b:3d} " + " ".join(f"{v!s:>5}: {med[v]:6.2f} ({med[v] / med[values[0]]:.3f}x)" for v in values),
              flush=True)

if __name__ == "__main__":
    main()
