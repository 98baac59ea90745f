"""`livecopy simulate` and `livecopy demo`.

``simulate`` runs the shoppers against running services (see :mod:`livecopy.sim.live`).
``demo`` starts everything itself: the embedded stack (or containers when Docker answers), the
profile worker, the feedback joiner, the online trainer, the generator worker and the copy
service (with its dashboard) as child processes of this one, runs the shoppers for a few minutes
with a live terminal view, stops everything and writes ``ctr_over_time.png``, ``summary.txt``
and ``summary.json`` to the output directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class SimOptions:
    url: str = "http://127.0.0.1:8080"
    api_key: str | None = None  # a key with the copy scope (None: the service runs with api.auth=open)
    duration_s: float = 120.0
    impressions: int | None = None
    population: str | None = None
    seed: int = 1
    holdout_share: float = 0.25
    concurrency: int = 16
    k: int = 4
    live_view: bool = True
    out_dir: Path = Path("runs/demo")
    title: str = "livecopy simulate"


def run_simulation(settings: Settings, opt: SimOptions, stop: threading.Event | None = None) -> dict[str, Any]:
    """Shoppers against the copy service at ``opt.url`` and the broker of ``settings``; returns the summary."""
    from livecopy import EventProducer
    from livecopy.sim.live import HttpCopySource, LiveStats, SplitSource, StaticShadow, render_live
    from livecopy.sim.population import Population, load_population
    from livecopy.sim.shoppers import ShopperSim, WallClock, run_sessions_threaded

    cfg = load_population(opt.population)
    pop = Population.build(cfg)
    stats = LiveStats()
    stop = stop or threading.Event()
    http = HttpCopySource(opt.url, workers=max(4, opt.concurrency), on_latency=stats.latency, api_key=opt.api_key)
    shadow = StaticShadow(settings, cfg, pop.catalog, k=opt.k, seed=opt.seed) if opt.holdout_share > 0 else None
    source = SplitSource(http, shadow, opt.holdout_share, live_one=http.one,
                         holdout_one=shadow.one if shadow is not None else None)
    sim = ShopperSim(pop, seed=opt.seed, clock=WallClock(), id_prefix=f"sim{opt.seed}-{int(time.time())}")
    producer = EventProducer(settings=settings)

    def sink(event: dict[str, Any]) -> None:
        if event["type"] in ("impression", "click") and source.is_holdout_copy(event.get("copy_id")):
            return  # the holdout's copies did not come from the service: the learner must not see them
        producer.send(event)
        stats.event()

    def answer(ask: Any) -> Any:
        res = source.one(ask)
        if res is None:
            stats.fail()
        return res

    deadline = time.monotonic() + opt.duration_s
    err: list[BaseException] = []

    def loop() -> None:
        try:
            def done() -> bool:
                return stop.is_set() or time.monotonic() > deadline or (
                    opt.impressions is not None and stats.copies >= opt.impressions)

            run_sessions_threaded(sim, answer, sink, until=done, threads=opt.concurrency, on_outcome=stats.outcome)
        except BaseException as exc:  # reported by the caller
            err.append(exc)
        finally:
            stop.set()

    th = threading.Thread(target=loop, name="sim-loop", daemon=True)
    th.start()
    try:
        if opt.live_view:
            from rich.console import Console
            from rich.live import Live

            with Live(render_live(stats, opt.title), console=Console(stderr=True), refresh_per_second=2,
                      transient=False) as live:
                while not stop.wait(1.0):
                    stats.tick()
                    live.update(render_live(stats, opt.title))
                stats.tick()
                live.update(render_live(stats, opt.title))
        else:
            last = time.monotonic()
            while not stop.wait(1.0):
                stats.tick()
                if time.monotonic() - last >= 10:
                    last = time.monotonic()
                    snap = stats.snapshot()
                    log.info("sim: %s events, %s copies, %.1f copies/s, p99 %.0f ms, CTR %s", snap["events"],
                             snap["copies"], snap["copies_per_s"], snap["p99_ms"],
                             {a: round(v, 4) for a, v in snap["ctr"].items()})
    except KeyboardInterrupt:
        stop.set()
    th.join(timeout=60)
    http.close()
    if shadow is not None:
        shadow.close()
    producer.flush()
    if err:
        raise err[0]
    return write_report(stats, opt, http.errors)


def lift_ci(online: Sequence[float], static: Sequence[float], z: float = 1.96) -> dict[str, Any] | None:
    """online / static mean CTR with a 95% confidence interval (delta method on the ratio of two
    independent means of per-impression expected CTRs); None without impressions on both."""
    if len(online) < 2 or len(static) < 2:
        return None
    o, s = np.asarray(online, dtype=np.float64), np.asarray(static, dtype=np.float64)
    mo, ms = float(o.mean()), float(s.mean())
    if ms <= 0:
        return None
    r = mo / ms
    se = r * math.sqrt(o.var(ddof=1) / (len(o) * mo**2) + s.var(ddof=1) / (len(s) * ms**2)) if mo > 0 else 0.0
    return {"ratio": r, "lo": r - z * se, "hi": r + z * se, "n_online": len(o), "n_static": len(s)}


def write_report(stats: Any, opt: SimOptions, errors: dict[str, int]) -> dict[str, Any]:
    from livecopy.sim.live import LIVE_ARMS
    from livecopy.sim.report import plot

    snap = stats.snapshot()
    snap["http_errors"] = errors
    snap["holdout_share"] = opt.holdout_share
    lines = [f"{opt.title}: {snap['elapsed_s']:.0f} s, {snap['events']:,} events, {snap['copies']:,} copies "
             f"({snap['copies_per_s']:.1f}/s at the end), client p99 {snap['p99_ms']:.0f} ms, "
             f"{snap['failed']} failed",
             f"{'policy':<8} {'impressions':>11} {'CTR':>8}  (expected under the hidden model)"]
    for a in LIVE_ARMS:
        lines.append(f"{a:<8} {snap['impressions'][a]:>11,} {snap['ctr'][a]:8.4f}")
    lift = lift_ci(stats.arm_p.get("online", []), stats.arm_p.get("static", []))
    snap["lift"] = lift
    if lift is not None:
        lines.append(f"online / static = {lift['ratio']:.3f} (95% CI {lift['lo']:.3f} .. {lift['hi']:.3f}, "
                     f"{lift['n_online']:,} and {lift['n_static']:,} impressions)")
    lines.append(f"online realised CTR (clicks/impressions): {snap['online_realised_ctr']:.4f}")
    lines.append("online CTR per model version (realised [95% interval] / expected):")
    for row in snap["versions"]:
        lines.append(f"  {row['version']:<40} n={row['impressions']:>6,}  {row['ctr']:.4f} "
                     f"[{row['ctr_lo']:.3f}, {row['ctr_hi']:.3f}] / {row['expected_ctr']:.4f}")
    text = "\n".join(lines)
    opt.out_dir.mkdir(parents=True, exist_ok=True)
    (opt.out_dir / "summary.txt").write_text(text + "\n")
    (opt.out_dir / "summary.json").write_text(json.dumps(snap, indent=2, default=str))
    n = max(len(v) for v in stats.arm_p.values())
    series = {a: stats.arm_p[a] for a in LIVE_ARMS if stats.arm_p[a]}
    if series:
        plot(opt.out_dir / "ctr_over_time.png", series, max(10, n // 25), versions=stats.version_log[1:],
             title=f"{opt.title}: CTR per policy (expected under the hidden model)",
             ylabel="CTR (each policy's impressions)")
    print(text, flush=True)
    return snap


# ---------------------------------------------------------------------------------------- demo


def _free_port() -> int:
    from livecopy.devstack import free_port

    return free_port()


def available_workers() -> set[str]:
    """Names of the ``livecopy worker`` subcommands this installation has."""
    from livecopy.cli.workers import worker

    return set(worker.commands)


def demo_env(info_bootstrap: str, redis_url: str, out_dir: Path, port: int, short: bool) -> dict[str, str]:
    """Environment of the demo's child processes (the one way settings reach them)."""
    reg = str((out_dir / "registry").resolve())
    env = {
        "LIVECOPY_KAFKA__BOOTSTRAP_SERVERS": info_bootstrap,
        "LIVECOPY_REDIS__URL": redis_url,
        "LIVECOPY_API__PORT": str(port),
        # The demo's service is open (no API keys): it runs on loopback for the person watching it.
        "LIVECOPY_API__AUTH": "open",
        "LIVECOPY_TRAINER__REGISTRY_DIR": reg,
        "LIVECOPY_GENERATION__REGISTRY_DIR": reg,
        # a short attribution window so feedback reaches the trainer within the demo
        "LIVECOPY_FEEDBACK__WINDOW_S": "5" if short else "20",
        "LIVECOPY_FEEDBACK__LATENESS_S": "1" if short else "2",
        "LIVECOPY_FEEDBACK__COPY_WAIT_S": "30",
        "LIVECOPY_TRAINER__EVAL_EVERY": "5" if short else "10",
        # the trainer's fast path refits every few dozen feedback records: versions within minutes
        "LIVECOPY_TRAINER__REFIT_EVERY": "20" if short else "60",
        "LIVECOPY_TRAINER__HEAD_MIN_STEPS": "100",
        "LIVECOPY_TRAINER__HELDOUT_FRACTION": "0.2",
        "LIVECOPY_TRAINER__MIN_HELDOUT": "5" if short else "10",
        "LIVECOPY_TRAINER__LOGLOSS_TOLERANCE": "0.01",
        "LIVECOPY_GENERATOR__RELATED": "0",
        "LIVECOPY_GENERATOR__SLOT": "pdp",
        "LIVECOPY_MODELS__TORCH_THREADS": "1",
        "LIVECOPY_LOG_LEVEL": "INFO",
    }
    return env


@contextlib.contextmanager
def children(
    procs: dict[str, list[str]], env: dict[str, str], log_dir: Path
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Start each command as a child (own process group, log file); SIGTERM then SIGKILL at exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **env}
    started: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, cmd in procs.items():
            with open(log_dir / f"{name}.log", "ab") as f:
                started[name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                 env=full_env, start_new_session=True)
            log.info("started %s (pid %d)", name, started[name].pid)
        yield started
    finally:
        for p in started.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name, p in started.items():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop on SIGTERM: killing it", name)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)


def wait_healthy(url: str, procs: dict[str, subprocess.Popen[bytes]], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with status {p.returncode} during start-up (see its log)")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                body = json.loads(r.read())
                if body.get("model_version"):
                    return dict(body)
                last = str(body)
        except (OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise RuntimeError(f"the copy service at {url} did not become healthy in {timeout_s:.0f} s: {last}")


def run_demo(settings: Settings, *, duration_s: float, out_dir: Path, short: bool = False, seed: int = 1,
             population: str | None = None, live_view: bool = True, holdout_share: float = 0.25,
             concurrency: int = 16) -> dict[str, Any]:
    from livecopy.devstack import open_stack

    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open_stack(prefer="auto", data_dir=None, topics=settings.topics) as info:
        print(f"== stack: {info.describe()}", flush=True)
        port = _free_port()
        env = demo_env(info.bootstrap_servers, info.redis_url, out_dir, port, short)
        s = settings.with_endpoints(info.bootstrap_servers, info.redis_url)
        py = [sys.executable, "-m", "livecopy"]
        have = available_workers()
        procs: dict[str, list[str]] = {}
        # --short (CI) leaves the generator worker out: on two cores its pre-generation competes
        # with the copy service for the same CPU, and GET /v1/copy generates on a miss anyway.
        for w in ("profile", "feedback", "responses", "trainer", *(() if short else ("generator",))):
            if w in have:
                procs[f"worker-{w}"] = [*py, "worker", w]
            else:
                print(f"== note: `livecopy worker {w}` is not available in this build; running without it", flush=True)
        procs["serve"] = [*py, "serve", "--host", "127.0.0.1", "--port", str(port)]
        url = f"http://127.0.0.1:{port}"
        with children(procs, env, out_dir / "logs") as running:
            print(f"== started {', '.join(running)}; waiting for the copy service at {url}", flush=True)
            print("== NOTE: the demo's API runs with api.auth=open (no keys, loopback only); "
                  "`livecopy serve` requires API keys by default (`livecopy keys create`)", flush=True)
            health = wait_healthy(url, running, 300.0)
            print(f"== copy service up ({health.get('model_version')}) after {time.monotonic() - t0:.0f} s; "
                  f"dashboard: {url}/dashboard", flush=True)
            opt = SimOptions(url=url, duration_s=duration_s, population=population, seed=seed,
                             holdout_share=holdout_share, concurrency=concurrency, live_view=live_view,
                             out_dir=out_dir, title="livecopy demo")
            summary = run_simulation(s, opt)
            dead = {n: p.returncode for n, p in running.items() if p.poll() is not None}
            summary["crashed"] = dead
            summary["startup_s"] = round(time.monotonic() - t0 - summary["elapsed_s"], 1)
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"== wrote {out_dir / 'ctr_over_time.png'}, {out_dir / 'summary.txt'} "
          f"({time.monotonic() - t0:.0f} s in all)", flush=True)
    return summary
