"""GET /v1/copy on the real broker + Redis with a tiny real student: contract, cache, cold start,
errors, publication on livecopy.copy, overload (503 then recovery) and hot reload under load."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from confluent_kafka import Producer

from core.catalog import Catalog
from core.contracts import Event, GeneratedCopy, ModelVersion, now_rfc3339
from core.settings import Settings
from core.wire import Topics
from engine.executor import CopyRequest, CopyResult, StudentExecutor
from engine.serving import CopyEngine
from livecopy.devstack import free_port
from models.student import load_student
from services.api.app import create_app
from services.api.copy import copy_extension
from stream.copy_store import CopyKeys
from stream.kafka_io import producer_config
from stream.profile.logic import event_update
from stream.profile.store import RedisProfileStore
from tests.copygen import MODEL_NAME, ServerThread, copy_settings, save_tiny_student
from tests.integration.helpers import read_topic, wait_until

pytestmark = pytest.mark.integration

CATALOG = Catalog.generate()  # what the service loads into an empty Redis catalog
P = [CATALOG.products[i] for i in range(8)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("registry")
    return {
        "v1": save_tiny_student(root / "v1", "v1", seed=1),
        "v2": save_tiny_student(root / "v2", "v2", seed=2),
        "bad": save_tiny_student(root / "bad", "v3-broken", seed=3, break_weights=True),
    }


def with_generation(settings: Settings, model_dir: Path, **over: Any) -> Settings:
    gen = copy_settings(model_dir=model_dir, candidates=2, max_new_tokens=8, mc_draws=20, reload_poll_s=0.1, **over)
    return settings.model_copy(update={"generation": gen})


def copies_on_topic(settings: Settings, expect: int) -> list[GeneratedCopy]:
    topic = Topics.from_settings(settings.topics).copy
    msgs = read_topic(settings, topic, expect, timeout=30)
    out = []
    for m in msgs:
        c = GeneratedCopy.model_validate_json(m.value() or b"")
        assert (m.key() or b"").decode() == c.user_id
        out.append(c)
    return out


def publish_update(settings: Settings, version: str, path: Path, action: str = "promote") -> None:
    rec = ModelVersion(name=MODEL_NAME, version=version, path=str(path), created_at=now_rfc3339(), action=action)
    p = Producer(producer_config(settings.kafka))
    p.produce(Topics.from_settings(settings.topics).model_updates, key=MODEL_NAME.encode(),
              value=rec.model_dump_json().encode())
    assert p.flush(10) == 0


def give_profile(settings: Settings, user: str, events: Sequence[dict[str, Any]]) -> None:
    store = RedisProfileStore(redis.Redis.from_url(settings.redis.url), settings.profile, settings.redis.key_prefix)
    store.apply([event_update(Event.model_validate(e), settings.profile) for e in events], int(time.time() * 1000))


def test_copy_contract_cache_cold_start_errors_and_publication(settings: Settings, models: dict[str, Path]) -> None:
    s = with_generation(settings, models["v1"], hot_reload=False)
    served: list[dict[str, Any]] = []
    with ServerThread(create_app(s, extensions=[copy_extension(s)])) as url, httpx.Client(base_url=url) as http:
        # cold start: never seen user, still 200, non-personalized
        r = http.get("/v1/copy", params={"user_id": "new@shop", "product_id": P[0].product_id})
        assert r.status_code == 200, r.text
        body = r.json()
        served.append(body)
        c = GeneratedCopy.model_validate(body)
        assert (c.user_id, c.product_id, c.model, c.model_version) == ("new@shop", P[0].product_id, MODEL_NAME, "v1")
        assert 0 < (c.propensity or 0) <= 1 and c.policy in ("thompson", "fallback") and c.text
        assert c.features is not None and c.features["user"] == "new" and c.features["profile_version"] == 0
        assert r.headers["X-Livecopy-Cache"] == "miss"
        # the same key again: the cached copy, same copy_id, not published twice
        again = http.get("/v1/copy", params={"user_id": "new@shop", "product_id": P[0].product_id})
        assert again.json()["copy_id"] == c.copy_id and again.headers["X-Livecopy-Cache"] == "hit"
        # another slot is another copy
        slotted = http.get("/v1/copy", params={"user_id": "new@shop", "product_id": P[0].product_id, "slot": "feed"})
        assert slotted.status_code == 200 and slotted.json()["slot"] == "feed"
        assert slotted.json()["copy_id"] != c.copy_id
        served.append(slotted.json())
        # a known user: personalized, keyed by profile version (a new event -> a new copy)
        ev = {"event_id": "e1", "type": "purchase", "user_id": "buyer", "ts": now_rfc3339(),
              "product_id": P[1].product_id, "category": P[1].category, "price": P[1].price}
        give_profile(s, "buyer", [ev])
        first = http.get("/v1/copy", params={"user_id": "buyer", "product_id": P[1].product_id}).json()
        assert first["features"]["profile_version"] == 1 and first["features"]["affinity"] == "high"
        give_profile(s, "buyer", [{**ev, "event_id": "e2", "type": "product_view"}])
        second = http.get("/v1/copy", params={"user_id": "buyer", "product_id": P[1].product_id}).json()
        assert second["features"]["profile_version"] == 2 and second["copy_id"] != first["copy_id"]
        served += [first, second]
        # errors per the contract
        r = http.get("/v1/copy", params={"user_id": "u1", "product_id": "no-such-sku"})
        assert r.status_code == 404 and r.json()["error"] == "unknown_product"
        for params in ({"user_id": "bad id!", "product_id": P[0].product_id},
                       {"user_id": "u1", "product_id": "sku/../x"},
                       {"product_id": P[0].product_id},
                       {"user_id": "u1", "product_id": P[0].product_id, "slot": "x" * 65},
                       {"user_id": "u1\n", "product_id": P[0].product_id},
                       {"user_id": "u1", "product_id": P[0].product_id + "\n"}):
            r = http.get("/v1/copy", params=params)
            assert r.status_code == 422 and "error" in r.json(), params
        health = http.get("/healthz").json()
        assert health["status"] == "ok" and health["model_version"] == "v1" and health["publish_backlog"] is False
        metrics = http.get("/metrics").text
        assert 'livecopy_copy_served_total{policy="cached",source="cache"} 1.0' in metrics
        assert 'livecopy_model_info{model="livecopy-student",version="v1"} 1.0' in metrics
        # one request at a time: the decode speculated, with the guesses learned from the copies before
        guesses = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("livecopy_copy_draft_tokens_total{")}
        assert set(guesses) == {"kept", "refused"} and sum(guesses.values()) > 0, guesses
        # the feed-slot copy's prompt shares its product line with the first copy's: those keys/values were reused
        prompt = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("livecopy_copy_prompt_tokens_total{")}
        assert prompt["cached"] > 0 and prompt["prefilled"] > prompt["cached"], prompt
    on_topic = copies_on_topic(s, len(served))
    assert sorted(c.copy_id for c in on_topic) == sorted(b["copy_id"] for b in served)  # each exactly once
    by_id = {c.copy_id: c for c in on_topic}
    for b in served:
        assert by_id[b["copy_id"]].model_version == b["model_version"] == "v1"
        assert by_id[b["copy_id"]].propensity == b["propensity"]


class GatedExecutor(StudentExecutor):
    """A real executor that holds every batch until the test opens the gate."""

    gate = threading.Event()
    entered = threading.Event()

    def run(self, requests: Sequence[CopyRequest]) -> list[CopyResult]:
        self.entered.set()
        self.gate.wait(60)
        return super().run(requests)


class RecordingExecutor(StudentExecutor):
    """A real executor that keeps the requests it was given."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.seen: list[CopyRequest] = []

    def run(self, requests: Sequence[CopyRequest]) -> list[CopyResult]:
        self.seen.extend(requests)
        return super().run(requests)


def test_the_shoppers_style_response_in_redis_reaches_the_executor(settings: Settings,
                                                                    models: dict[str, Path]) -> None:
    from stream.responses.logic import ResponseUpdate
    from stream.responses.store import RedisResponseStore

    s = with_generation(settings, models["v1"], hot_reload=False)
    store = RedisResponseStore(redis.Redis.from_url(s.redis.url), s.responses, s.redis.key_prefix)
    month_ago = int(time.time() * 1000) - 30 * 86_400_000  # one half-life (default 30 days) before the read
    store.apply([ResponseUpdate(f"i{i}", "fan", "eco", 0.1, i < 5) for i in range(10)], month_ago)
    ex = RecordingExecutor(load_student(models["v1"], device="cpu"), s.generation)
    engine = CopyEngine(ex, s.generation).start()
    try:
        with ServerThread(create_app(s, extensions=[copy_extension(s, engine=engine)])) as url, \
                httpx.Client(base_url=url, timeout=60) as http:
            for user in ("fan", "stranger"):
                assert http.get("/v1/copy", params={"user_id": user, "product_id": P[2].product_id}).status_code == 200
        off = with_generation(settings, models["v1"], hot_reload=False, style_response_strength=0.0)
        with ServerThread(create_app(off, extensions=[copy_extension(off, engine=engine)])) as url, \
                httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/v1/copy", params={"user_id": "fan", "product_id": P[3].product_id}).status_code == 200
    finally:
        engine.stop()
    fan, stranger, fan_off = ex.seen
    assert fan.style_response is not None
    # 5 clicks where 1.0 was expected, a month ago: read aged by one half-life
    assert fan.style_response.clicks == pytest.approx({"eco": 2.5}, rel=1e-4)
    assert fan.style_response.expected == pytest.approx({"eco": 0.5}, rel=1e-4)
    assert stranger.style_response is None and fan_off.style_response is None  # none kept / turned off


def test_overload_answers_503_at_once_and_the_service_recovers(settings: Settings, models: dict[str, Path]) -> None:
    s = with_generation(settings, models["v1"], hot_reload=False, max_batch_size=1, max_queue=2, timeout_ms=60_000.0)
    ex = GatedExecutor(load_student(models["v1"], device="cpu"), s.generation)
    GatedExecutor.gate.clear()
    GatedExecutor.entered.clear()
    engine = CopyEngine(ex, s.generation).start()
    app = create_app(s, extensions=[copy_extension(s, engine=engine)])
    try:
        with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
            def get(i: int) -> httpx.Response:
                return http.get("/v1/copy", params={"user_id": f"o{i}", "product_id": P[i % len(P)].product_id})

            with ThreadPoolExecutor(12) as pool:
                futs = [pool.submit(get, 0)]
                wait_until(GatedExecutor.entered.is_set, 30, "the first request held in the executor")
                futs += [pool.submit(get, i) for i in range(1, 12)]
                # 1 batch held in the executor + 2 queued: the other 9 are refused without waiting for the gate
                wait_until(lambda: sum(f.done() for f in futs) >= 9, 30, "9 refusals while the gate is shut")
                refused = [f.result() for f in futs if f.done()]
                assert all(r.status_code == 503 for r in refused)
                assert all(r.json()["error"] == "overloaded" and r.headers["Retry-After"] == "1" for r in refused)
                GatedExecutor.gate.set()
                statuses = Counter(f.result().status_code for f in futs)
            assert statuses == {503: 9, 200: 3}
            # recovered: new requests are served
            assert all(get(100 + i).status_code == 200 for i in range(4))
            assert http.get("/healthz").json()["queue_depth"] == 0
    finally:
        GatedExecutor.gate.set()
        engine.stop()


def test_a_full_publish_queue_answers_503_serves_nothing_unpublished_and_recovers(settings: Settings,
                                                                                   models: dict[str, Path]) -> None:
    s = with_generation(settings, models["v1"], hot_reload=False)
    # room for one record in the producer's local queue, held there for 5 s before it is sent
    producer = Producer(producer_config(s.kafka, **{"queue.buffering.max.messages": 1, "linger.ms": 5000}))
    app = create_app(s, extensions=[copy_extension(s, producer=producer)])
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        def get(user: str) -> httpx.Response:
            return http.get("/v1/copy", params={"user_id": user, "product_id": P[0].product_id})

        first = get("q1")
        assert first.status_code == 200, first.text
        refused = get("q2")  # generated, but its record cannot be queued: not served, not cached
        assert refused.status_code == 503 and refused.json()["error"] == "publish_backlog"
        assert refused.headers["Retry-After"] == "1"
        # while the queue is still full the next one is refused before it is generated
        again_refused = get("q3")
        assert again_refused.status_code == 503 and again_refused.json()["error"] == "publish_backlog"
        metrics = http.get("/metrics").text
        assert 'livecopy_copy_refused_total{reason="publish_backlog"} 2.0' in metrics
        assert "livecopy_copy_generate_seconds_count 2.0" in metrics  # q1 and q2 only
        assert "livecopy_copy_publish_congested 1.0" in metrics and "livecopy_copy_publish_queue 1.0" in metrics
        assert http.get("/healthz").json()["publish_backlog"] is True
        hit = get("q1")  # a cached copy needs no publishing: still served
        assert hit.status_code == 200 and hit.headers["X-Livecopy-Cache"] == "hit"
        # once the first record is delivered the queue has room again: served (a fresh copy, not a cached one)
        wait_until(lambda: len(producer) == 0, 30, "the first copy delivered")
        again = get("q2")
        assert again.status_code == 200 and again.headers["X-Livecopy-Cache"] == "miss"
        assert http.get("/healthz").json()["publish_backlog"] is False
        assert "livecopy_copy_publish_congested 0.0" in http.get("/metrics").text
        served = [first.json(), again.json()]
    on_topic = copies_on_topic(s, len(served))
    assert sorted(c.copy_id for c in on_topic) == sorted(b["copy_id"] for b in served)


def test_a_copy_the_broker_never_acknowledged_leaves_the_cache(settings: Settings, models: dict[str, Path]) -> None:
    s = with_generation(settings, models["v1"], hot_reload=False)
    # a broker that never answers: the record expires in the producer after 3 s, unacknowledged
    producer = Producer(producer_config(s.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"}),
                                        **{"message.timeout.ms": 3000}))
    app = create_app(s, extensions=[copy_extension(s, producer=producer)])
    r = redis.Redis.from_url(s.redis.url)
    with ServerThread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        def get() -> httpx.Response:
            return http.get("/v1/copy", params={"user_id": "lost", "product_id": P[2].product_id})

        first = get()  # served before the broker answers (the API does not wait for acks)
        assert first.status_code == 200 and first.headers["X-Livecopy-Cache"] == "miss"
        key = CopyKeys(s.redis.key_prefix, s.generation.catalog_key).copy("lost", P[2].product_id, None, 0, "v1")
        assert r.get(key) == first.content  # cached, for now
        wait_until(lambda: r.get(key) is None, 30, "the unacknowledged copy dropped from the cache")
        metrics = http.get("/metrics").text
        assert "livecopy_copy_publish_failed_total 1.0" in metrics and "livecopy_copy_uncached_total 1.0" in metrics
        again = get()  # generated afresh, not the copy that never reached livecopy.copy
        assert again.status_code == 200 and again.headers["X-Livecopy-Cache"] == "miss"
        assert again.json()["copy_id"] != first.json()["copy_id"]


def test_hot_reload_under_concurrent_requests_drops_none(settings: Settings, models: dict[str, Path]) -> None:
    s = with_generation(settings, models["v1"], hot_reload=True, max_batch_size=8, max_wait_ms=5.0,
                        timeout_ms=60_000.0)
    engine = CopyEngine.from_settings(s).start()
    app = create_app(s, extensions=[copy_extension(s, engine=engine)])
    results: list[httpx.Response] = []
    stop = threading.Event()
    try:
        with ServerThread(app) as url:
            def client(n: int) -> None:
                with httpx.Client(base_url=url, timeout=60) as http:
                    i = 0
                    while not stop.is_set():
                        i += 1
                        r = http.get("/v1/copy", params={"user_id": f"c{n}-{i}", "product_id": P[i % 8].product_id})
                        results.append(r)

            threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
            for t in threads:
                t.start()
            wait_until(lambda: len(results) >= 10, 60, "traffic on v1")
            publish_update(s, "v2", models["v2"])
            wait_until(lambda: engine.version == "v2", 60, "v2 swapped in")
            n_at_swap = len(results)
            wait_until(lambda: len(results) >= n_at_swap + 10, 60, "traffic on v2")
            publish_update(s, "v3-broken", models["bad"])
            wait_until(lambda: any(e.version == "v3-broken" for e in engine.reloads.events), 60, "v3 handled")
            n_after = len(results)
            wait_until(lambda: len(results) >= n_after + 5, 60, "traffic after the refusal")
            stop.set()
            for t in threads:
                t.join(60)
    finally:
        stop.set()
        engine.stop()
    assert [r.status_code for r in results if r.status_code != 200] == []
    versions = Counter(r.json()["model_version"] for r in results)
    # >= 10 answered before v2 was published; after the swap at most one in-flight request per client (6) is v1
    assert set(versions) == {"v1", "v2"} and versions["v1"] >= 10 and versions["v2"] >= 9
    ev = {e.version: e for e in engine.reloads.events}
    assert ev["v2"].outcome == "swapped" and ev["v3-broken"].outcome == "refused"
    assert "non-finite" in ev["v3-broken"].reason and engine.version == "v2"
    on_topic = copies_on_topic(s, len(results))
    assert Counter(c.copy_id for c in on_topic) == Counter(r.json()["copy_id"] for r in results)
    topic_versions = {c.copy_id: (c.model_version, c.propensity) for c in on_topic}
    assert all(topic_versions[r.json()["copy_id"]] == (r.json()["model_version"], r.json()["propensity"])
               for r in results)



def test_livecopy_serve_cli_serves_copy(settings: Settings, models: dict[str, Path]) -> None:
    import subprocess
    import sys

    from livecopy.devstack import free_port
    from tests.integration.helpers import ROOT, settings_env

    port = free_port()
    env = settings_env(settings)
    env.update({"LIVECOPY_GENERATION__MODEL_DIR": str(models["v1"]), "LIVECOPY_GENERATION__DEVICE": "cpu",
                "LIVECOPY_GENERATION__MAX_NEW_TOKENS": "8", "LIVECOPY_MODELS__TORCH_THREADS": "1"})
    proc = subprocess.Popen([sys.executable, "-m", "livecopy", "serve", "--port", str(port)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 90, "livecopy serve up")
        r = httpx.get(url + "/v1/copy", params={"user_id": "cli-user", "product_id": P[2].product_id}, timeout=60)
        assert r.status_code == 200 and r.json()["model_version"] == "v1"
        assert httpx.get(url + "/v1/profile/cli-user").status_code == 404  # the profile routes are still there
    finally:
        proc.terminate()
        assert proc.wait(30) in (0, -15)  # uvicorn shuts down gracefully, then re-raises SIGTERM
    assert [c.copy_id for c in copies_on_topic(settings, 1)] == [r.json()["copy_id"]]
