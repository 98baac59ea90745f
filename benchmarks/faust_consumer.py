"""The faust-streaming side of benchmarks/consumer_choice.py: an agent that decodes and validates
every event (the same `decode_event` the profile worker runs) and reports when it has seen N.

Run by consumer_choice.py as `faust -A faust_consumer worker`, configured by environment:
FC_BROKER, FC_TOPIC, FC_N, FC_OUT.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import faust

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.wire import Rejection, decode_event

N = int(os.environ["FC_N"])
OUT = Path(os.environ["FC_OUT"])

# Settings that faust needs on tansu (see ../shared/ENVIRONMENT.md).
app = faust.App(
    "fc-" + os.environ["FC_TOPIC"],
    broker="kafka://" + os.environ["FC_BROKER"],
    value_serializer="raw",
    key_serializer="raw",
    broker_session_timeout=6,
    broker_heartbeat_interval=1,
    broker_rebalance_timeout=10,
    topic_disable_leader=True,
    consumer_auto_offset_reset="earliest",
)
topic = app.topic(os.environ["FC_TOPIC"], value_type=bytes, key_type=bytes)
state = {"n": 0, "first": 0.0}


@app.agent(topic)
async def consume(stream):  # type: ignore[no-untyped-def]
    async for event in stream.events():
        if state["n"] == 0:
            state["first"] = time.monotonic()
        try:
            decode_event(event.key, event.value)
        except Rejection:
            pass
        state["n"] += 1
        if state["n"] == N:
            OUT.write_text(f"{N / (time.monotonic() - state['first'])}")
