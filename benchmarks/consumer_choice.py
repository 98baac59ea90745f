"""Why the profile worker uses confluent-kafka, not faust-streaming: measured.

Both consume the same preloaded topic on the embedded stack and run the same per-record work
(decode + validate against the v1 contract), without Redis, so the figure is the consumer
framework's own cost. Prints events/s for each and the ratio, from one run.

    python benchmarks/consumer_choice.py [--events 100000]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import ROOT, machine

from core.catalog import Catalog
from core.settings import KafkaSettings, Settings
from core.wire import Rejection, Topics, decode_event
from livecopy import EventProducer
from livecopy.devstack import free_port, open_stack
from livecopy.sim.loadgen import SessionGenerator
from stream.kafka_io import consumer_config, ensure_topics


def confluent_rate(bootstrap: str, topic: str, n: int) -> float:
    from confluent_kafka import Consumer

    c = Consumer(consumer_config(KafkaSettings(bootstrap_servers=bootstrap), "cc-" + uuid.uuid4().hex[:6]))
    c.subscribe([topic])
    seen, first = 0, 0.0
    while seen < n:
        m = c.poll(0.5)
        if m is None:
            continue
        msgs = [m, *c.consume(1999, timeout=0)]
        if seen == 0:
            first = time.monotonic()
        for x in msgs:
            if x.error():
                continue
            try:
                decode_event(x.key(), x.value())
            except Rejection:
                pass
            seen += 1
    rate = n / (time.monotonic() - first)
    c.close()
    return rate


def faust_rate(bootstrap: str, topic: str, n: int) -> float:
    out = Path(tempfile.mkdtemp()) / "rate"
    env = {**os.environ, "FC_BROKER": bootstrap, "FC_TOPIC": topic, "FC_N": str(n), "FC_OUT": str(out),
           "PYTHONPATH": f"{ROOT / 'benchmarks'}:{ROOT}"}
    datadir = tempfile.mkdtemp()
    proc = subprocess.Popen([sys.executable, "-m", "faust", "-A", "faust_consumer", "--datadir", datadir,
                             "worker", "--web-port", str(free_port()), "-l", "warn"],
                            env=env, cwd=ROOT / "benchmarks", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not out.exists() and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("faust worker exited")
            time.sleep(0.2)
        return float(out.read_text())
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    a = ap.parse_args()
    print(f"machine: {machine()}")
    with open_stack(prefer="tansu") as st:  # the figures the README quotes were measured on tansu
        s = Settings(kafka={"bootstrap_servers": st.bootstrap_servers},  # type: ignore[arg-type]
                     topics={"prefix": f"cc{uuid.uuid4().hex[:6]}."})  # type: ignore[arg-type]
        ensure_topics(s.kafka, Topics.from_settings(s.topics))
        topic = Topics.from_settings(s.topics).events
        gen = SessionGenerator(Catalog.generate(2000), 20_000, seed=1).events()
        with EventProducer(settings=s) as p:
            for e in itertools.islice(gen, a.events):
                p.send(e)
        print(f"stack: {st.describe()}; {a.events} events preloaded in {topic}")
        rc = confluent_rate(st.bootstrap_servers, topic, a.events)
        rf = faust_rate(st.bootstrap_servers, topic, a.events)
    print(f"\n{'consumer':40} {'events/s':>10}")
    print(f"{'confluent-kafka (poll + consume batch)':40} {rc:10,.0f}")
    print(f"{'faust-streaming 0.15 agent (aiokafka)':40} {rf:10,.0f}")
    print(f"\nconfluent-kafka / faust: {rc / rf:.1f}x (decode + validate per record, no Redis)")


if __name__ == "__main__":
    main()
