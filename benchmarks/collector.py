"""POST /v1/events under load: events/s and p50/p99 per request, batches of 1 and of 20.

    python benchmarks/collector.py [--duration 15] [--concurrency 4,16] [--batches 1,20] [--shoppers 2000]
                                   [--broker auto|kafka|tansu] [--json-out report.json]

Starts a broker + Redis (``livecopy.devstack.open_stack``), then ``livecopy serve --no-copy`` as a
subprocess (the collector as a site's pages reach it: a publishable key from an allowed origin, a
signed shopper token per request, rates unlimited), and drives it from a load generator in another
process (multiprocessing, spawn): ``--concurrency`` closed-loop httpx clients on asyncio (a row per
value), each request a batch of product views of one shopper (its own token, as the tracker sends:
text/plain, key and token in the query). Every request is answered only after the broker
acknowledged its events (idempotent producer, acks=all), so latency is request sent -> every event
acknowledged -> answer received; ``ack p50`` is the server's share of it between producing a batch
and its last acknowledgement (``livecopy_collector_write_seconds``, from the histogram's buckets).
Non-200 answers are counted and left out of the percentiles. On a shared 2-core machine the server,
the load generator, the broker and Redis compete for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    ROOT,
    hist_diff,
    hist_quantile,
    histogram,
    machine,
    metric_sum,
    percentile,
    scrape,
    wait_for,
)
from livecopy.devstack import free_port, open_stack
from stream.access.shopper_token import sign_shopper_token

KEY = "lcpk_bench"
SECRET = "bench-site-secret-0123456789abcdef0123"
ORIGIN = "https://shop.example"


def load(url: str, concurrency: int, duration: float, batch: int, shoppers: int, run: str,
         out: Any) -> None:
    """The load generator (its own process): closed-loop clients posting batches for ``duration`` s."""

    async def main() -> dict[str, Any]:
        tokens = [sign_shopper_token(SECRET, f"shopper-{i}", 3600) for i in range(shoppers)]
        lat: list[float] = []
        codes: Counter[int] = Counter()
        events_ok = 0
        stop_at = time.perf_counter() + duration
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

        async def client(n: int, http: httpx.AsyncClient) -> None:
            nonlocal events_ok
            i = 0
            while time.perf_counter() < stop_at:
                i += 1
                s = (n * 7919 + i) % shoppers
                now = int(time.time() * 1000)
                body = json.dumps([{"event_id": f"{run}-{n}-{i}-{j}", "type": "product_view",
                                    "user_id": f"shopper-{s}", "ts": now, "product_id": f"sku-{(i + j) % 500}",
                                    "category": "home/kitchen", "price": 19.9} for j in range(batch)])
                t0 = time.perf_counter()
                r = await http.post("/v1/events", content=body, params={"key": KEY, "token": tokens[s]},
                                    headers={"Origin": ORIGIN, "Content-Type": "text/plain;charset=UTF-8"})
                dt = time.perf_counter() - t0
                codes[r.status_code] += 1
                if r.status_code == 200:
                    lat.append(dt)
                    events_ok += r.json()["accepted"]

        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
            t0 = time.perf_counter()
            await asyncio.gather(*(client(n, http) for n in range(concurrency)))
            wall = time.perf_counter() - t0
        return {"batch": batch, "concurrency": concurrency, "requests": sum(codes.values()), "ok": len(lat),
                "codes": dict(codes), "events": events_ok, "events_per_s": events_ok / wall,
                "requests_per_s": len(lat) / wall, "p50_ms": percentile(lat, 0.5) * 1e3,
                "p99_ms": percentile(lat, 0.99) * 1e3}

    out.put(asyncio.run(main()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--concurrency", default="4,16", help="Clients per row (a row per value and batch size).")
    ap.add_argument("--batches", default="1,20")
    ap.add_argument("--shoppers", type=int, default=2000)
    ap.add_argument("--broker", default="auto", choices=["auto", "kafka", "tansu", "docker"])
    ap.add_argument("--json-out", type=Path, default=None)
    a = ap.parse_args()
    report: dict[str, Any] = {"machine": machine(), "rows": []}
    with open_stack(prefer=a.broker) as info:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOPY_")}
        env.update({
            "LIVECOPY_KAFKA__BOOTSTRAP_SERVERS": info.bootstrap_servers, "LIVECOPY_REDIS__URL": info.redis_url,
            "LIVECOPY_COLLECTOR__PUBLISHABLE_KEYS": json.dumps({KEY: {
                "site": "shop", "origins": [ORIGIN], "rate_per_s": 0, "ip_rate_per_s": 0}}),
            "LIVECOPY_COLLECTOR__SITE_SECRETS": json.dumps({"shop": SECRET}),
            "LIVECOPY_API__AUTH": "open",  # /metrics readable here; the posts go through the publishable key
            "LIVECOPY_API__DASHBOARD": "false",
            "PYTHONPATH": str(ROOT), "LIVECOPY_LOG_LEVEL": "WARNING",
        })
        log = open(ROOT / ".livecopy-bench-collector.log", "wb")  # noqa: SIM115
        server = subprocess.Popen([sys.executable, "-m", "livecopy", "serve", "--no-copy", "--port", str(port)],
                                  env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            if not wait_for(lambda: httpx.get(url + "/healthz", timeout=2).status_code == 200, 120):
                raise SystemExit("server did not come up; see .livecopy-bench-collector.log")
            print(f"machine: {report['machine']}; stack: {info.kind}, broker {info.details.get('broker', '?')}")
            print(f"server: livecopy serve --no-copy (1 process); load generator: another process, httpx + asyncio, "
                  f"{a.concurrency} closed-loop clients, {a.duration:g} s per row, {a.shoppers} shoppers "
                  "(a token each)")
            ctx = mp.get_context("spawn")
            warm = ctx.Queue()
            ctx.Process(target=load, args=(url, 4, 2.0, 5, 50, "warm", warm)).start()
            warm.get(timeout=120)
            print(f"\n{'batch':>5} {'conc':>5} {'requests':>8} {'200':>7} {'other':>10} {'req/s':>8} {'events/s':>9} "
                  f"{'p50 ms':>7} {'p99 ms':>7} {'ack p50':>8}")
            for batch, conc in [(int(b), int(c)) for b in a.batches.split(",") for c in a.concurrency.split(",")]:
                samples = scrape(url + "/metrics")
                before = metric_sum(samples, "livecopy_collector_events_total", outcome="accepted")
                acks_before = histogram(samples, "livecopy_collector_write_seconds")
                q = ctx.Queue()
                proc = ctx.Process(target=load, args=(url, conc, a.duration, batch, a.shoppers,
                                                      uuid.uuid4().hex[:8], q))
                proc.start()
                row = q.get(timeout=a.duration + 300)
                proc.join(30)
                samples = scrape(url + "/metrics")
                row["server_accepted"] = metric_sum(samples, "livecopy_collector_events_total",
                                                    outcome="accepted") - before
                acks = hist_diff(histogram(samples, "livecopy_collector_write_seconds"), acks_before)
                row["ack_p50_ms"] = hist_quantile(acks, 0.5) * 1e3
                report["rows"].append(row)
                other = {k: v for k, v in row["codes"].items() if k != 200}
                print(f"{batch:5d} {row['concurrency']:5d} {row['requests']:8d} {row['ok']:7d} {other or '-'!s:>10} "
                      f"{row['requests_per_s']:8.1f} {row['events_per_s']:9.1f} {row['p50_ms']:7.1f} "
                      f"{row['p99_ms']:7.1f} {row['ack_p50_ms']:8.1f}", flush=True)
                assert row["server_accepted"] == row["events"], (row["server_accepted"], row["events"])
        finally:
            server.terminate()
            server.wait(30)
            log.close()
    if a.json_out:
        a.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
