"""GET /v1/copy under concurrent load: p50/p99 and requests/s, cached and uncached.

    python benchmarks/api.py [--duration 15] [--cached-concurrency 8,32] [--uncached-concurrency 2,8]
                             [--model DIR] [--json-out report.json]

Starts a broker + Redis (``livecopy.devstack.open_stack``: containers when Docker answers, else
embedded tansu + redis-server), then ``livecopy serve`` as a subprocess (its own process, one
uvicorn worker, torch threads 1), and drives it from this process with ``--concurrency`` closed-loop
httpx clients on asyncio:

* **cached**: a fixed set of (user, product) pairs generated once beforehand, so every measured
  request is a Redis cache hit (validate, catalog, profile read, cache read).
* **uncached**: a fresh cold-start user per request, so every request generates (queue ->
  micro-batch -> K candidates -> CTR -> policy) and then caches and publishes its copy.

Latency is client-side (request sent -> body received). Status codes other than 200 (503 when
the engine's queue is full or a deadline passed) are counted and excluded from the percentiles.
On a shared 2-core machine the server, the load generator, the broker and Redis compete for the
same cores: read the figures as this machine's, not the design's ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import ROOT, machine, percentile, wait_for
from core.catalog import Catalog
from livecopy.devstack import free_port, open_stack
from stream.access.keys import KeyStore


async def drive(url: str, concurrency: int, duration: float, make_params: Any,
                headers: dict[str, str] | None = None) -> dict[str, Any]:
    lat: list[float] = []
    codes: Counter[int] = Counter()
    stop_at = time.perf_counter() + duration

    async def client(n: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as http:
            i = 0
            while time.perf_counter() < stop_at:
                i += 1
                t0 = time.perf_counter()
                r = await http.get("/v1/copy", params=make_params(n, i))
                dt = time.perf_counter() - t0
                codes[r.status_code] += 1
                if r.status_code == 200:
                    lat.append(dt)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": sum(codes.values()), "ok": len(lat),
            "codes": dict(codes), "rps": len(lat) / wall, "p50_ms": percentile(lat, 0.5) * 1e3,
            "p99_ms": percentile(lat, 0.99) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--cached-concurrency", default="8,32")
    ap.add_argument("--uncached-concurrency", default="2,8")
    ap.add_argument("--model", type=Path, default=None, help="Checkpoint (default: the shipped student).")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--timeout-ms", type=float, default=10_000.0)
    ap.add_argument("--json-out", type=Path, default=None)
    a = ap.parse_args()
    cat = Catalog.generate()
    products = [p.product_id for p in cat.products[:200]]
    report: dict[str, Any] = {"machine": machine(), "cached": [], "uncached": []}
    with open_stack() as info:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOPY_")}
        env.update({
            "LIVECOPY_KAFKA__BOOTSTRAP_SERVERS": info.bootstrap_servers, "LIVECOPY_REDIS__URL": info.redis_url,
            "LIVECOPY_MODELS__TORCH_THREADS": "1", "LIVECOPY_GENERATION__DEVICE": "cpu",
            "LIVECOPY_GENERATION__MAX_BATCH_SIZE": str(a.max_batch),
            "LIVECOPY_GENERATION__MAX_WAIT_MS": str(a.max_wait_ms),
            "LIVECOPY_GENERATION__TIMEOUT_MS": str(a.timeout_ms),
            "PYTHONPATH": str(ROOT), "LIVECOPY_LOG_LEVEL": "WARNING",
            # the production path: API keys checked; no rate limit on the key the load generator uses
            "LIVECOPY_API__GENERATE_RATE_PER_S": "0",
        })
        key = KeyStore(redis.Redis.from_url(info.redis_url), "lc:").create("bench", ["copy"])[1]
        auth = {"Authorization": f"Bearer {key}"}
        if a.model is not None:
            env["LIVECOPY_GENERATION__MODEL_DIR"] = str(a.model)
        log = open(ROOT / ".livecopy-bench-api.log", "wb")  # noqa: SIM115
        server = subprocess.Popen([sys.executable, "-m", "livecopy", "serve", "--port", str(port)], env=env,
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            if not wait_for(lambda: httpx.get(url + "/healthz", timeout=2).status_code == 200, 120):
                raise SystemExit("server did not come up; see .livecopy-bench-api.log")
            health = httpx.get(url + "/healthz").json()
            print(f"machine: {report['machine']}; stack: {info.kind}")
            print(f"server: livecopy serve (1 process, torch threads 1), model {health['model']} "
                  f"{health['model_version']}, max_batch_size {a.max_batch}, max_wait_ms {a.max_wait_ms:g}; "
                  f"load generator: this process, httpx + asyncio, closed loop, {a.duration:g} s per row")
            # warm the cache for the cached runs: 64 (user, product) pairs
            pairs = [(f"warm-{i}", products[i % len(products)]) for i in range(64)]
            for u, p in pairs:
                r = httpx.get(url + "/v1/copy", params={"user_id": u, "product_id": p}, timeout=120, headers=auth)
                r.raise_for_status()
            print(f"\n{'kind':9} {'conc':>5} {'requests':>8} {'200':>6} {'other':>12} {'req/s':>8} {'p50 ms':>8} "
                  f"{'p99 ms':>8}")

            def show(kind: str, row: dict[str, Any]) -> None:
                other = {k: v for k, v in row["codes"].items() if k != 200}
                print(f"{kind:9} {row['concurrency']:5d} {row['requests']:8d} {row['ok']:6d} {other or '-'!s:>12} "
                      f"{row['rps']:8.1f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f}", flush=True)

            for c in [int(x) for x in a.cached_concurrency.split(",")]:
                row = asyncio.run(drive(url, c, a.duration, lambda n, i: dict(
                    zip(("user_id", "product_id"), pairs[(n * 7 + i) % len(pairs)], strict=True)), auth))
                report["cached"].append(row)
                show("cached", row)
            run_id = uuid.uuid4().hex[:6]
            for c in [int(x) for x in a.uncached_concurrency.split(",")]:
                row = asyncio.run(drive(url, c, a.duration, lambda n, i, c=c: {
                    "user_id": f"cold-{run_id}-{c}-{n}-{i}",
                    "product_id": products[(n * 31 + i) % len(products)]}, auth))
                report["uncached"].append(row)
                show("uncached", row)
        finally:
            server.terminate()
            server.wait(30)
            log.close()
    if a.json_out:
        a.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
