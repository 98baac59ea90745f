"""A consumer that does nothing but read: the broker's own produce->consume latency floor.
Usage: _bare_consumer.py BOOTSTRAP TOPIC N_WARMUP N_MEASURED  -> prints p50/p99 ms as JSON."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Consumer

from core.settings import KafkaSettings
from stream.kafka_io import consumer_config

boot, topic, warm, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
c = Consumer(consumer_config(KafkaSettings(bootstrap_servers=boot), "bare-" + uuid.uuid4().hex[:6]))
c.subscribe([topic])
lat: list[float] = []
seen = 0
print(json.dumps({"ready": True}), flush=True)
IDLE_S = 30.0  # no record for this long after the first: give up on the rest (the broker lost or hid some)
last = None
started = time.monotonic()
while seen < warm + n:
    m = c.poll(0.2)
    if m is None:
        if time.monotonic() - (last if last is not None else started + 90.0) > IDLE_S:  # 2 min for the first
            print(f"bare consumer: {warm + n - seen} records never arrived; measured {len(lat)}", file=sys.stderr)
            break
        continue
    last = time.monotonic()
    now = time.time() * 1000
    for x in [m, *c.consume(1999, timeout=0)]:
        if x.error():
            continue
        seen += 1
        if seen > warm:
            lat.append(now - x.timestamp()[1])
lat.sort()
nan = float("nan")
print(json.dumps({"p50_ms": lat[len(lat) // 2] if lat else nan, "p99_ms": lat[int(len(lat) * 0.99)] if lat else nan,
                  "n": len(lat)}), flush=True)
c.close()
