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

from livecopy.settings import KafkaSettings
from stream.kafka_io import consumer_config

boot, topic, warm, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
c = Consumer(consumer_config(KafkaSettings(bootstrap_servers=boot), "bare-" + uuid.uuid4().hex[:6]))
c.subscribe([topic])
lat: list[float] = []
seen = 0
print(json.dumps({"ready": True}), flush=True)
while seen < warm + n:
    m = c.poll(0.2)
    if m is None:
        continue
    now = time.time() * 1000
    for x in [m, *c.consume(1999, timeout=0)]:
        if x.error():
            continue
        seen += 1
        if seen > warm:
            lat.append(now - x.timestamp()[1])
lat.sort()
print(json.dumps({"p50_ms": lat[len(lat) // 2], "p99_ms": lat[int(len(lat) * 0.99)]}), flush=True)
c.close()
