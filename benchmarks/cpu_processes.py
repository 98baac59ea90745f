"""CPU cores: one engine with N torch threads vs N single-threaded engines side by side, one run.

    python benchmarks/cpu_processes.py [--workers 2] [--requests 128] [--batch 32]

Each engine is the serving executor (``StudentExecutor``: K=4 sampled candidates, CTR head,
filter, Thompson) running batches of ``--batch`` requests back to back. "threads" is one process
with ``torch.set_num_threads(workers)``; "processes" is ``workers`` processes with one thread each,
started together, each doing ``requests / workers``. Prints the combined copies/s of each and the
ratio (the figure behind docs/generation.md's advice to run one process per core on a CPU).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine
from benchmarks.generation import make_requests


def _engine_run(threads: int, part: slice, batch: int, start: object, out: object) -> None:
    import torch

    from core.settings import CopySettings
    from engine.executor import load_executor
    from models.paths import shipped_student_dir

    torch.set_num_threads(threads)
    ex = load_executor(shipped_student_dir(), CopySettings(device="cpu", candidates=4, max_new_tokens=40))
    reqs = make_requests(512)
    ex.run(reqs[:8])  # warm-up
    mine = reqs[part]
    start.wait()  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    for i in range(0, len(mine), batch):
        ex.run(mine[i:i + batch])
    out.put((t0, time.perf_counter(), len(mine)))  # type: ignore[attr-defined]


def measure(workers: int, threads: int, n: int, batch: int) -> float:
    """Combined copies/s of ``workers`` processes with ``threads`` torch threads each."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(workers + 1), ctx.Queue()
    per = n // workers
    procs = [ctx.Process(target=_engine_run, args=(threads, slice(i * per, (i + 1) * per), batch, start, out))
             for i in range(workers)]
    for p in procs:
        p.start()
    start.wait()
    rows = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(r[2] for r in rows) / (max(r[1] for r in rows) - min(r[0] for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    print(f"machine: {machine()}; {a.requests} requests in batches of {a.batch}, K=4, <= 40 new tokens, fp32")
    threads = measure(1, a.workers, a.requests, a.batch)
    print(f"one process, {a.workers} threads:       {threads:6.2f} copies/s", flush=True)
    procs = measure(a.workers, 1, a.requests, a.batch)
    print(f"{a.workers} processes, 1 thread each: {procs:6.2f} copies/s")
    print(f"processes / threads: {procs / threads:.2f}x")


if __name__ == "__main__":
    main()
