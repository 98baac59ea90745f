"""A site's catalog into livecopy on the real broker and Redis: the compacted catalog topic through
the catalog worker (upsert, update, tombstone, DLQ with reasons, the worker stays up), and
`livecopy catalog load|show|stats|delete`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from click.testing import CliRunner
from confluent_kafka import Producer

from core.settings import Settings
from core.wire import Topics
from livecopy.cli import cli, register
from services.workers.catalog import build_catalog_loop
from stream.copy_store import CopyKeys
from stream.kafka_io import producer_config
from tests.integration.helpers import read_topic, settings_env, wait_until

pytestmark = pytest.mark.integration

ROW = {
    "product_id": "rw-1",
    "title": "Lodge Cast Iron Skillet",
    "category": "home/kitchen",
    "brand": "Lodge",
    "price": 19.9,
    "noun": "skillet",
}


def _header(headers: Any, name: str) -> str:
    value = dict(headers or []).get(name)
    return value.decode() if isinstance(value, bytes) else str(value)


def test_the_catalog_topic_keeps_redis_current_and_rejects_bad_records(settings: Settings) -> None:
    topics = Topics.from_settings(settings.topics)
    key = CopyKeys(settings.redis.key_prefix, settings.generation.catalog_key).catalog
    r = redis.Redis.from_url(settings.redis.url)
    p = Producer(producer_config(settings.kafka))

    def send(k: str, v: object) -> None:
        p.produce(
            topics.catalog, key=k.encode(), value=None if v is None else v if isinstance(v, bytes) else orjson.dumps(v)
        )

    for i in range(20):
        send(f"rw-{i}", {**ROW, "product_id": f"rw-{i}", "price": 10.0 + i})
    send("rw-bad", {**ROW, "product_id": "rw-bad", "price": -3})
    send("rw-x", {**ROW, "product_id": "rw-y"})
    send("rw-json", b"{not json")
    assert p.flush(10) == 0
    loop = build_catalog_loop(settings)
    worker = threading.Thread(target=loop.run, daemon=True)
    worker.start()
    try:
        wait_until(lambda: r.hlen(key) == 20, 60, "20 products in Redis")
        assert json.loads(r.hget(key, "rw-3") or b"{}")["price"] == 13.0
        dlq = read_topic(settings, topics.dlq, 3)
        reasons = sorted(_header(m.headers(), "error") for m in dlq)
        assert reasons == ["key_mismatch", "not_json", "out_of_range"]
        # the worker stayed up: an update and a tombstone still take effect
        send("rw-3", {**ROW, "product_id": "rw-3", "price": 99.0})
        send("rw-4", None)
        assert p.flush(10) == 0
        wait_until(lambda: r.hlen(key) == 19 and b"99.0" in (r.hget(key, "rw-3") or b""), 60, "update + delete")
    finally:
        loop.stop()
        worker.join(30)


def test_catalog_load_show_stats_delete_commands(settings: Settings, tmp_path: Path) -> None:
    root = register(cli)
    env = settings_env(settings)
    key = CopyKeys(settings.redis.key_prefix, settings.generation.catalog_key).catalog
    r = redis.Redis.from_url(settings.redis.url)
    f = tmp_path / "mine.jsonl"
    f.write_bytes(
        orjson.dumps(ROW)
        + b"\n"
        + orjson.dumps({**ROW, "product_id": "rw-2", "prize": 3})
        + b"\n"
        + orjson.dumps({**ROW, "product_id": "rw-3", "title": "Crème Brûlée Torch", "currency": "EUR"})
        + b"\n"
    )
    runner = CliRunner()
    res = runner.invoke(root, ["catalog", "load", str(f), "--redis"], env=env)
    assert res.exit_code == 1 and "line 2: unknown_field" in res.output, res.output
    assert sorted(r.hkeys(key)) == [b"rw-1", b"rw-3"]  # the good rows were loaded
    shown = runner.invoke(root, ["catalog", "show", "rw-3"], env=env)
    assert shown.exit_code == 0 and json.loads(shown.output)["title"] == "Crème Brûlée Torch"
    assert runner.invoke(root, ["catalog", "show", "nope"], env=env).exit_code == 1
    stats = json.loads(runner.invoke(root, ["catalog", "stats"], env=env).output)
    assert stats["products"] == 2 and stats["currencies"] == {"USD": 1, "EUR": 1}
    assert stats["categories"] == {"home/kitchen": 2} and stats["unrated"] == 2
    # through the topic: the catalog worker applies what `load` published
    csv = tmp_path / "more.csv"
    csv.write_text(
        "product_id,title,category,price,attributes\nrw-7,Oven Mitt,home/kitchen,14.99,silicone|heat-proof\n"
    )
    assert runner.invoke(root, ["catalog", "load", str(csv)], env=env).exit_code == 0
    assert runner.invoke(root, ["catalog", "delete", "rw-1"], env=env).exit_code == 0
    loop = build_catalog_loop(settings)
    worker = threading.Thread(target=loop.run, daemon=True)
    worker.start()
    try:
        wait_until(lambda: sorted(r.hkeys(key)) == [b"rw-3", b"rw-7"], 60, "the topic's changes in Redis")
    finally:
        loop.stop()
        worker.join(30)
