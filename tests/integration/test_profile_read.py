"""Reading profiles: GET /v1/profile/{user_id}, `livecopy profile show`, `livecopy dev up|status|down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from core.contracts import Event, Profile
from core.settings import Settings
from livecopy.devstack import free_port, free_ports
from livecopy.kafka_kraft import kafka_available
from services.api.app import create_app
from services.workers.profile import build_profile_loop
from tests.copygen import ServerThread
from tests.integration.helpers import (
    ROOT,
    ThreadWorker,
    expected_profiles,
    produce,
    settings_env,
    wait_profiles,
)

pytestmark = pytest.mark.integration

EVENTS = [
    {"event_id": "r1", "type": "product_view", "user_id": "reader@shop", "ts": "2026-11-22T10:00:00Z",
     "product_id": "sku-1", "category": "home/kitchen", "price": 39.9},
    {"event_id": "r2", "type": "purchase", "user_id": "reader@shop", "ts": "2026-11-22T11:00:00Z",
     "product_id": "sku-1", "category": "home/kitchen", "price": 39.9, "quantity": 2},
]


@pytest.fixture
def applied(settings: Settings) -> Profile:
    produce(settings, EVENTS)
    expected = expected_profiles(settings, [Event.model_validate(e) for e in EVENTS])
    with ThreadWorker(build_profile_loop(settings)):
        wait_profiles(settings, expected, 60, "events applied")
    return expected["reader@shop"]


def test_http_profile_endpoint(settings: Settings, applied: Profile) -> None:
    with ServerThread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.get("/v1/profile/reader@shop")
        assert r.status_code == 200
        body = r.json()
        assert body == json.loads(applied.model_dump_json())
        assert body["event_counts"] == {"product_view": 1, "purchase": 1}
        assert body["purchase_value"] == pytest.approx(79.8)
        assert body["recent_products"] == ["sku-1"]
        assert body["last_seen"] == "2026-11-22T11:00:00.000Z"
        r = client.get("/v1/profile/nobody")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        for bad in ("bad%20id!", "reader@shop%0A"):  # a trailing newline is not a valid id either
            r = client.get(f"/v1/profile/{bad}")
            assert r.status_code == 422 and r.json()["error"] == "invalid_user_id", bad
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.get("/no/such/path").status_code == 404
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        # one series per route, not per URL (a label per user id would grow without bound)
        assert 'livecopy_http_requests_total{route="/v1/profile/{user_id}",status="200"} 1.0' in metrics.text
        assert 'livecopy_http_requests_total{route="/v1/profile/{user_id}",status="422"} 2.0' in metrics.text
        assert 'livecopy_http_seconds_count{route="/v1/profile/{user_id}"} 4.0' in metrics.text
        assert 'livecopy_http_seconds_count{route="unmatched"} 1.0' in metrics.text
        assert "reader@shop" not in metrics.text and "nobody" not in metrics.text


@pytest.mark.parametrize("auth", ["open", "keys"])
def test_http_profile_answers_503_json_while_redis_is_down(auth: str) -> None:
    """Open: the profile read meets the outage. With keys: the key cannot be checked, which is the same
    outage (503, not 401: the caller's key may well be good)."""
    settings = Settings.model_validate({"redis": {"url": f"redis://127.0.0.1:{free_port()}/0",
                                                  "socket_timeout_s": 1}, "api": {"auth": auth}})
    with ServerThread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.get("/v1/profile/reader@shop", headers={"Authorization": "Bearer lck_0123abcd_secret"})
        assert r.status_code == 503 and r.json()["error"] == "unavailable"
        assert client.get("/healthz").status_code == 503


def test_cli_profile_show_json(settings: Settings, applied: Profile) -> None:
    out = subprocess.run([sys.executable, "-m", "livecopy", "profile", "show", "reader@shop", "--json"],
                         env=settings_env(settings), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Profile.model_validate_json(out.stdout) == applied
    missing = subprocess.run([sys.executable, "-m", "livecopy", "profile", "show", "nobody"],
                             env=settings_env(settings), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "no profile" in missing.stderr


@pytest.mark.parametrize("broker", ["tansu", "kafka"])
def test_dev_up_status_down(tmp_path: Path, broker: str) -> None:
    if broker == "kafka" and not kafka_available() and not os.environ.get("CI"):
        pytest.skip("no Java 17+ (and no cached jars or Maven) on this machine")
    env = settings_env(Settings())
    kafka_port, redis_port = free_ports(2)
    ports = ["--kafka-port", str(kafka_port), "--redis-port", str(redis_port), "--data-dir", str(tmp_path)]
    bootstrap = f"127.0.0.1:{ports[1]}"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "livecopy", "dev", *args, *ports], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=180)

    up = cli("up", "--broker", broker)
    try:
        assert up.returncode == 0, up.stderr
        assert ("tansu" if broker == "tansu" else "Apache Kafka") in up.stdout and "redis" in up.stdout
        st = cli("status")
        assert st.returncode == 0 and st.stdout.count("running") == 2
        again = cli("up", "--broker", broker)  # idempotent: already running
        assert again.returncode == 0, again.stderr
        topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
        for t in ("livecopy.events", "livecopy.events.dlq", "livecopy.copy", "livecopy.feedback",
                  "livecopy.model-updates"):
            assert t in topics
        if broker == "kafka":  # its data is on disk: a record survives down + up
            p = Producer({"bootstrap.servers": bootstrap})
            p.produce("livecopy.copy", key=b"k", value=b"kept across a restart")
            assert p.flush(30) == 0
            assert cli("down").returncode == 0
            assert cli("up", "--broker", broker).returncode == 0
            c = Consumer({"bootstrap.servers": bootstrap, "group.id": "t", "auto.offset.reset": "earliest"})
            c.subscribe(["livecopy.copy"])
            got = []
            deadline = time.monotonic() + 60
            while not got and time.monotonic() < deadline:
                m = c.poll(1.0)
                if m is not None and m.error() is None:
                    got.append(m.value())
            c.close()
            assert got == [b"kept across a restart"]
    finally:
        down = cli("down")
    assert down.returncode == 0
    st = cli("status")
    assert st.returncode == 1 and st.stdout.count("stopped") == 2
