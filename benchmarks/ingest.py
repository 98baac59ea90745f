"""Ingest benchmark: one profile worker process on the embedded stack.

Prints, for the batched worker and for a naive one-Redis-round-trip-per-event variant
(`--max-batch 1`: poll one record, one EVALSHA, one commit), in one run (and the batched worker's
throughput with one user per Lua call, `profile.users_per_call=1`):
  - sustained events/s draining a preloaded topic (10%..90% of the records, so start-up and
    tail are excluded);
  - p50/p99 produce→profile-updated latency while events are produced at a fixed rate
    (record CreateTime → Redis acknowledged, read from the worker's Prometheus histogram,
    whose buckets are 1 ms wide up to 10 ms and 5 ms wide up to 50 ms);
and the ratios. Targets (2-core machine): >= 20,000 events/s, p99 <= 50 ms at 5,000 events/s.

With `--peer quix` (the default with `--broker kafka`) it then measures the same two figures, on the
same broker, Redis and events, for the same profile update written as a quixstreams application
(`_quix_profile.py`: a `BatchingSink` writing each checkpoint to Redis, dedupe by event id in Lua),
and prints the ratios livecopy/quixstreams. quixstreams pins other confluent-kafka versions than
livecopy, so the peer runs in its own virtualenv, `.livecopy/quix-venv`, created on first use.

    python benchmarks/ingest.py [--events 200000] [--rate 5000] [--seconds 20] [--broker tansu|kafka]
                                [--peer quix|none] [--quix-commit-interval 0.1]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn

import redis
from _common import (
    ROOT,
    cli_process,
    hist_diff,
    hist_quantile,
    histogram,
    machine,
    metric_sum,
    scrape,
    wait_for,
)

from core.catalog import Catalog
from core.settings import Settings
from core.wire import Topics
from livecopy import EventProducer
from livecopy.devstack import free_port, open_stack
from livecopy.sim.loadgen import SessionGenerator, paced
from stream.kafka_io import ensure_topics
from stream.profile.store import RedisProfileStore


def fresh_settings(bootstrap: str, redis_url: str, partitions: int = 8) -> Settings:
    tag = uuid.uuid4().hex[:8]
    s = Settings(
        kafka={"bootstrap_servers": bootstrap},  # type: ignore[arg-type]
        redis={"url": redis_url, "key_prefix": f"b{tag}:"},  # type: ignore[arg-type]
        topics={"prefix": f"b{tag}.", "events_partitions": partitions},  # type: ignore[arg-type]
        worker={"group_prefix": f"b{tag}-"},  # type: ignore[arg-type]
    )
    ensure_topics(s.kafka, Topics.from_settings(s.topics))
    return s


def env_for(s: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVECOPY_")}
    env.update({
        "LIVECOPY_KAFKA__BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers,
        "LIVECOPY_REDIS__URL": s.redis.url,
        "LIVECOPY_REDIS__KEY_PREFIX": s.redis.key_prefix,
        "LIVECOPY_TOPICS__PREFIX": s.topics.prefix,
        "LIVECOPY_WORKER__GROUP_PREFIX": s.worker.group_prefix,
        "LIVECOPY_LOG_LEVEL": "WARNING",
    })
    return env


def events(n: int, seed: int) -> list[dict[str, object]]:
    gen = SessionGenerator(Catalog.generate(2000), users=20_000, seed=seed).events()
    return list(itertools.islice(gen, n))


def applied(url: str) -> float:
    return metric_sum(scrape(url), "livecopy_records_total", worker="profile")


def throughput(bootstrap: str, redis_url: str, n: int, max_batch: int | None, users_per_call: int | None = None
               ) -> float:
    s = fresh_settings(bootstrap, redis_url)
    with EventProducer(settings=s, config={"linger.ms": 20}) as p:
        for e in events(n, seed=1):
            p.send(e)
    port = free_port()
    args = ["worker", "profile", "--metrics-port", str(port)]
    if max_batch:
        args += ["--max-batch", str(max_batch)]
    env = env_for(s)
    if users_per_call:
        env["LIVECOPY_PROFILE__USERS_PER_CALL"] = str(users_per_call)
    proc = cli_process(env, *args)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        marks: dict[float, float] = {}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                done = applied(url)
            except OSError:
                time.sleep(0.1)
                continue
            now = time.monotonic()
            for frac in (0.1, 0.9):
                if frac not in marks and done >= frac * n:
                    marks[frac] = now
            if 0.9 in marks:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("worker did not drain the topic in 10 minutes")
        return 0.8 * n / (marks[0.9] - marks[0.1])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def aof_rewrites(redis_url: str) -> int:
    """AOF rewrites Redis has finished so far: a rewrite (the dev stack's Redis keeps an AOF, fsync always)
    forks and rewrites the whole data set on these same two cores, and the worker's p99 shows it."""
    info = redis.Redis.from_url(redis_url).info("persistence")
    return int(info.get("aof_rewrites", 0)) + int(info.get("aof_rewrite_in_progress", 0))


def latency(bootstrap: str, redis_url: str, rate: float, seconds: float, max_batch: int | None,
            partitions: int = 8, bare: bool = False) -> dict[str, float]:
    """p50/p99 at a fixed rate: of a profile worker (record CreateTime -> Redis acknowledged), or
    with bare=True of a consumer that only reads (the broker's own floor)."""
    s = fresh_settings(bootstrap, redis_url, partitions)
    evs = events(int(rate * seconds) + 200, seed=2)
    topic = Topics.from_settings(s.topics).events
    rewrites = aof_rewrites(redis_url)
    if bare:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "_bare_consumer.py"), bootstrap, topic,
                                 "200", str(len(evs) - 200)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()
        done = lambda: proc.poll() is not None  # noqa: E731
    else:
        port = free_port()
        args = ["worker", "profile", "--metrics-port", str(port)]
        if max_batch:
            args += ["--max-batch", str(max_batch)]
        proc = cli_process(env_for(s), *args)
        url = f"http://127.0.0.1:{port}/metrics"
    # One producer for warm-up and measurement: a fresh one would charge its own connection
    # and idempotence handshake to the first records' latency.
    p = EventProducer(settings=s)
    try:
        for e in evs[:200]:  # warm-up: the consumer has joined its group and read something
            p.send(e)
        p.flush()
        if not bare and not wait_for(lambda: applied(url) >= 200, 60):
            raise RuntimeError("worker did not start")
        if bare:
            time.sleep(8)  # group join (~half the session timeout on tansu)
        else:
            before = histogram(scrape(url), "livecopy_event_to_effect_seconds")
        sent = 0
        started = time.monotonic()
        for i in paced(rate, seconds):
            p.send(evs[200 + i])
            sent += 1
        achieved = sent / (time.monotonic() - started)
        p.flush()
        if bare:
            wait_for(done, 120)
            assert proc.stdout is not None
            res = json.loads(proc.stdout.readline())
            return {"rate": achieved, "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"], "n": sent}
        wait_for(lambda: applied(url) >= 200 + sent, 300, every=0.2)
        h = hist_diff(histogram(scrape(url), "livecopy_event_to_effect_seconds"), before)
        return {"rate": achieved, "p50_ms": 1000 * hist_quantile(h, 0.5), "p99_ms": 1000 * hist_quantile(h, 0.99),
                "n": h[-1][1], "aof_rewrites": aof_rewrites(redis_url) - rewrites}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


# --- the quixstreams peer: the same profile update as a quixstreams application, in its own venv ---

QUIX_VENV = ROOT / ".livecopy" / "quix-venv"
USER = "<user>"  # the user id's place in the peer's key templates (_quix_profile.USER)
QUIX_VERSION = "3.28.1"
QUIX_PINS = [f"quixstreams=={QUIX_VERSION}", "redis==8.2.0", "orjson==3.13.0"]


@functools.cache
def quix_python() -> Path:
    """The peer's interpreter, creating `.livecopy/quix-venv` with QUIX_PINS the first time."""
    py = QUIX_VENV / "bin" / "python"
    probe = f"import quixstreams, redis, orjson, sys; sys.exit(quixstreams.__version__ != {QUIX_VERSION!r})"
    if py.exists() and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
        return py
    print(f"creating {QUIX_VENV.relative_to(ROOT)} ({', '.join(QUIX_PINS)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(QUIX_VENV)], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *QUIX_PINS], check=True)
    return py


def profile_spec(s: Settings) -> dict[str, Any]:
    """What the peer takes of livecopy's profile worker, as data (it imports nothing of livecopy): the
    ProfileSettings, profile.lua, a user's keys (USER for the user id) and the header arguments after now_ms
    that RedisProfileStore calls it with (taken from the store's own call, so that they follow it), and
    how many users the store puts in one call."""
    store = RedisProfileStore(redis.Redis(), s.profile, s.redis.key_prefix)  # connects to nothing
    keys, args = store.call([(USER, [])], 0)
    return {"profile": s.profile.model_dump(mode="json"), "lua": store.script.source, "keys": keys,
            "head": args[1:-1], "users_per_call": s.profile.users_per_call}


class QuixPeer:
    """`_quix_profile.py` in the quix venv, its JSON lines read by a thread: progress, then the result."""

    def __init__(self, s: Settings, commit_interval: float, skip: int = 0) -> None:
        self.progress: list[tuple[float, int]] = []  # (monotonic s, records applied) per checkpoint
        self.result: dict[str, float] = {}
        self.version = "?"
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (the peer's stderr, shown when it fails)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVECOPY_", "PYTHON"))}
        self.proc = subprocess.Popen(
            [str(quix_python()), str(Path(__file__).parent / "_quix_profile.py"),
             "--bootstrap", s.kafka.bootstrap_servers, "--topic", Topics.from_settings(s.topics).events,
             "--group", s.worker.group_prefix + "quix-profile", "--redis-url", s.redis.url,
             "--commit-interval", str(commit_interval), "--fetch-wait-max-ms", str(s.kafka.fetch_wait_max_ms),
             "--skip", str(skip)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(profile_spec(s)) + "\n")
        self.proc.stdin.close()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if "quixstreams" in msg:
                self.version = msg["quixstreams"]
            elif "n" in msg and "t" in msg:
                self.progress.append((msg["t"], msg["n"]))
            else:
                self.result = msg

    def applied(self) -> int:
        return self.progress[-1][1] if self.progress else 0

    def wait_applied(self, n: float, timeout: float, every: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while self.applied() < n:
            if self.proc.poll() is not None:
                self.fail(f"exited ({self.proc.returncode}) after {self.applied()} records")
            if time.monotonic() > deadline:
                self.fail(f"applied {self.applied()} of {n:.0f} records in {timeout:.0f} s")
            time.sleep(every)

    def fail(self, what: str) -> NoReturn:
        self.stop()
        self.stderr.seek(0)
        tail = "".join(self.stderr.readlines()[-30:])
        raise RuntimeError(f"quixstreams peer {what}; its stderr ends:\n{tail}")

    def stop(self) -> dict[str, float]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(10)
        return self.result


def quix_throughput(bootstrap: str, redis_url: str, n: int, commit_interval: float) -> tuple[float, str]:
    """Like `throughput`, for the quixstreams peer: events/s over 10%..90% of a preloaded topic (the
    times are the peer's own, taken when each checkpoint's Redis writes were acknowledged)."""
    s = fresh_settings(bootstrap, redis_url)
    with EventProducer(settings=s, config={"linger.ms": 20}) as p:
        for e in events(n, seed=1):
            p.send(e)
    peer = QuixPeer(s, commit_interval)
    try:
        peer.wait_applied(0.9 * n, 600)
        t10 = next(t for t, done in peer.progress if done >= 0.1 * n)
        t90 = next(t for t, done in peer.progress if done >= 0.9 * n)
        return 0.8 * n / (t90 - t10), peer.version
    finally:
        peer.stop()


def quix_latency(bootstrap: str, redis_url: str, rate: float, seconds: float, commit_interval: float,
                 partitions: int = 8) -> dict[str, float]:
    """Like `latency`, for the quixstreams peer: p50/p99 of record CreateTime -> Redis acknowledged
    (exact, from every record after the 200 warm-up ones)."""
    s = fresh_settings(bootstrap, redis_url, partitions)
    evs = events(int(rate * seconds) + 200, seed=2)
    peer = QuixPeer(s, commit_interval, skip=200)
    rewrites = aof_rewrites(redis_url)
    p = EventProducer(settings=s)
    try:
        for e in evs[:200]:
            p.send(e)
        p.flush()
        peer.wait_applied(200, 120)
        sent = 0
        started = time.monotonic()
        for i in paced(rate, seconds):
            p.send(evs[200 + i])
            sent += 1
        achieved = sent / (time.monotonic() - started)
        p.flush()
        peer.wait_applied(200 + sent, 300, every=0.2)
        res = peer.stop()
        return {"rate": achieved, "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"], "n": res["n"],
                "aof_rewrites": aof_rewrites(redis_url) - rewrites}
    finally:
        peer.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000, help="preloaded events for the batched throughput run")
    ap.add_argument("--naive-events", type=int, default=20_000, help="preloaded events for the naive run")
    ap.add_argument("--rate", type=float, default=5000.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--naive-seconds", type=float, default=10.0)
    ap.add_argument("--broker", choices=("tansu", "kafka"), default="tansu",
                    help="the embedded tansu broker (the README's table) or Apache Kafka (KRaft, needs Java 17+)")
    ap.add_argument("--peer", choices=("quix", "none"), default=None,
                    help="also measure the same update written with quixstreams (default: quix with --broker kafka)")
    ap.add_argument("--quix-commit-interval", type=float, default=0.1,
                    help="the peer's checkpoint interval, s: its BatchingSink writes to Redis at each checkpoint")
    a = ap.parse_args()
    peer = a.peer or ("quix" if a.broker == "kafka" else "none")
    if peer == "quix":
        quix_python()  # create the peer's venv (first run) before the stack starts
    print(f"machine: {machine()}")
    with open_stack(prefer=a.broker) as st:
        bs, ru = st.bootstrap_servers, st.redis_url
        print(f"stack: {st.describe()}")
        print("worker: one `livecopy worker profile` process; producer: EventProducer in this process\n")
        def measured(name: str, value: Any) -> Any:  # each figure as it comes (a later failure keeps them)
            print(f"  measured {name}: {value}", flush=True)
            return value

        tb = measured("batched events/s", throughput(bs, ru, a.events, None))
        tn = measured("naive events/s", throughput(bs, ru, a.naive_events, 1))
        t1 = measured("batched, one user per call, events/s", throughput(bs, ru, a.events, None, users_per_call=1))
        lb = measured("batched latency", latency(bs, ru, a.rate, a.seconds, None))
        ln = measured("naive latency", latency(bs, ru, a.rate, a.naive_seconds, 1))
        floor8 = measured("bare consumer, 8 partitions", latency(bs, ru, a.rate, a.seconds, None, bare=True))
        lb2 = measured("batched latency, 2 partitions", latency(bs, ru, a.rate, a.seconds, None, partitions=2))
        floor2 = measured("bare consumer, 2 partitions",
                          latency(bs, ru, a.rate, a.seconds, None, partitions=2, bare=True))
        if peer == "quix":
            tq, quix_version = measured("quixstreams events/s",
                                        quix_throughput(bs, ru, a.events, a.quix_commit_interval))
            lq = measured("quixstreams latency", quix_latency(bs, ru, a.rate, a.seconds, a.quix_commit_interval))
    print(f"events topic: 8 partitions (CONTRACTS.md default); latency at {a.rate:,.0f} events/s\n")
    qname = f"quixstreams {quix_version} (same update, BatchingSink)" if peer == "quix" else ""
    w = max(40, len(qname))
    print(f"{'variant':{w}} {'events/s':>10} {'rate':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, t, lat in ((f"batched (pipelined Lua calls of {Settings().profile.users_per_call} users)", tb, lb),
                         ("naive (one Redis round trip per event)", tn, ln)):
        print(f"{name:{w}} {t:10,.0f} {lat['rate']:8,.0f} {lat['p50_ms']:8.1f} {lat['p99_ms']:8.1f}")
    print(f"{'batched, one user per Lua call':{w}} {t1:10,.0f}")
    print(f"{'  broker floor: bare consumer, 8 parts':{w}} {'':>10} {floor8['rate']:8,.0f} "
          f"{floor8['p50_ms']:8.1f} {floor8['p99_ms']:8.1f}")
    print(f"{'batched, events topic with 2 partitions':{w}} {'':>10} {lb2['rate']:8,.0f} "
          f"{lb2['p50_ms']:8.1f} {lb2['p99_ms']:8.1f}")
    print(f"{'  broker floor: bare consumer, 2 parts':{w}} {'':>10} {floor2['rate']:8,.0f} "
          f"{floor2['p50_ms']:8.1f} {floor2['p99_ms']:8.1f}")
    if peer == "quix":
        print(f"{qname:{w}} {tq:10,.0f} {lq['rate']:8,.0f} {lq['p50_ms']:8.1f} {lq['p99_ms']:8.1f}")
        print(f"  (quixstreams: one process, own venv; its BatchingSink runs livecopy's profile.lua, the same users "
              f"per call, per partition at each checkpoint, every {a.quix_commit_interval:g} s)")
    print(f"  (Redis AOF rewrites during the worker's latency runs: batched 8 partitions {lb['aof_rewrites']}, "
          f"naive {ln['aof_rewrites']}, batched 2 partitions {lb2['aof_rewrites']}"
          + (f", quixstreams {lq['aof_rewrites']})" if peer == "quix" else ")"))
    print(f"\nthroughput ratio batched/naive: {tb / tn:.1f}x; {Settings().profile.users_per_call} users per Lua call / "
          f"one: {tb / t1:.2f}x")
    print(f"p99 ratio naive/batched at {a.rate:,.0f}/s: {ln['p99_ms'] / lb['p99_ms']:.1f}x")
    if peer == "quix":
        print(f"throughput ratio livecopy batched/quixstreams: {tb / tq:.2f}x")
        print(f"p99 ratio livecopy batched/quixstreams at {a.rate:,.0f}/s, 8 partitions: "
              f"{lb['p99_ms'] / lq['p99_ms']:.2f}x (quixstreams/livecopy {lq['p99_ms'] / lb['p99_ms']:.2f}x)")
    print(f"targets: >= 20,000 events/s: {'met' if tb >= 20_000 else 'MISSED'} ({tb:,.0f}); "
          f"p99 <= 50 ms at {a.rate:,.0f}/s: 8 partitions {'met' if lb['p99_ms'] <= 50 else 'MISSED'} "
          f"({lb['p99_ms']:.0f} ms), 2 partitions {'met' if lb2['p99_ms'] <= 50 else 'MISSED'} "
          f"({lb2['p99_ms']:.0f} ms)")


if __name__ == "__main__":
    main()
