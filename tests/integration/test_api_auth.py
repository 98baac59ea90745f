"""API keys against the real stack: scopes per route, keys stored hashed, revocation, per-key rate
limits on uncached generation, slots from the settings, a copy's features only for debug keys."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from core.catalog import Catalog
from core.settings import Settings
from services.api.app import create_app
from services.api.copy import copy_extension
from stream.access.keys import KeyStore
from tests.copygen import ServerThread, copy_settings, save_tiny_student
from tests.integration.helpers import ROOT, settings_env

pytestmark = pytest.mark.integration

P = Catalog.generate().products[:6]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("m") / "v1", "v1", seed=1)


def keyed(settings: Settings, model: Path, **api: object) -> Settings:
    gen = copy_settings(model_dir=model, candidates=2, max_new_tokens=8, mc_draws=20, hot_reload=False)
    keys_on = settings.api.model_copy(update={"auth": "keys", **api})
    return settings.model_copy(update={"generation": gen, "api": keys_on})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_every_route_but_health_needs_a_key_with_its_scope(settings: Settings, model: Path) -> None:
    s = keyed(settings, model)
    store = KeyStore(redis.Redis.from_url(s.redis.url), s.redis.key_prefix)
    _, site = store.create("site", ["copy"])
    _, reader = store.create("crm", ["profile:read"])
    _, admin = store.create("ops", ["admin"])
    with ServerThread(create_app(s, extensions=[copy_extension(s)])) as url, httpx.Client(base_url=url) as http:
        assert http.get("/healthz").status_code == 200 and http.get("/healthz").json()["auth"] == "keys"
        q = {"user_id": "u1", "product_id": P[0].product_id}
        r = http.get("/v1/copy", params=q)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized" and "WWW-Authenticate" in r.headers
        assert http.get("/v1/copy", params=q, headers=bearer("lck_0000_forged")).status_code == 401
        assert http.get("/v1/copy", params=q, headers=bearer(reader)).status_code == 403
        ok = http.get("/v1/copy", params=q, headers=bearer(site))
        assert ok.status_code == 200, ok.text
        assert "features" not in ok.json()  # a page needs the copy, not the shopper's features
        assert http.get("/v1/copy", params=q, headers={"X-Api-Key": site}).status_code == 200
        assert http.get("/v1/profile/u1").status_code == 401
        assert http.get("/v1/profile/u1", headers=bearer(site)).status_code == 403
        assert http.get("/v1/profile/u1", headers=bearer(reader)).status_code == 404  # allowed; no such profile
        for path in ("/metrics", "/dashboard/data", "/openapi.json"):
            assert http.get(path).status_code == 401, path
            assert http.get(path, headers=bearer(site)).status_code == 403, path
            assert http.get(path, headers=bearer(admin)).status_code == 200, path
        assert http.get("/docs").status_code == 404 and http.get("/redoc").status_code == 404
        spec = http.get("/openapi.json", headers=bearer(admin)).json()
        for code in ("401", "403", "429", "503"):
            assert code in spec["paths"]["/v1/copy"]["get"]["responses"]
        assert "X-Livecopy-Auth" not in ok.headers
    stored = redis.Redis.from_url(s.redis.url).hgetall(f"{s.redis.key_prefix}apikeys")
    assert hashlib.sha256(site.encode()).hexdigest().encode() in stored  # hashed ...
    assert all(site.encode() not in k and site.encode() not in v for k, v in stored.items())  # ... never in clear


def test_debug_keys_see_features_and_a_revoked_key_is_refused(settings: Settings, model: Path) -> None:
    s = keyed(settings, model)
    store = KeyStore(redis.Redis.from_url(s.redis.url), s.redis.key_prefix)
    dbg, debug = store.create("data-team", ["copy", "debug"])
    q = {"user_id": "u2", "product_id": P[1].product_id}
    with ServerThread(create_app(s, extensions=[copy_extension(s)])) as url, httpx.Client(base_url=url) as http:
        r = http.get("/v1/copy", params=q, headers=bearer(debug))
        assert r.status_code == 200 and r.json()["features"]["profile_version"] == 0
    assert store.revoke(dbg.key_id) and not store.revoke(dbg.key_id)
    with ServerThread(create_app(s, extensions=[copy_extension(s)])) as url, httpx.Client(base_url=url) as http:
        assert http.get("/v1/copy", params=q, headers=bearer(debug)).status_code == 401


def test_uncached_generation_is_rate_limited_per_key_with_retry_after(settings: Settings, model: Path) -> None:
    s = keyed(settings, model, generate_rate_per_s=0.2, generate_burst=2)
    store = KeyStore(redis.Redis.from_url(s.redis.url), s.redis.key_prefix)
    _, a = store.create("a", ["copy"])
    _, b = store.create("b", ["copy"])
    with ServerThread(create_app(s, extensions=[copy_extension(s)])) as url, httpx.Client(base_url=url) as http:
        def ask(key: str, i: int, slot: str | None = None) -> httpx.Response:
            params = {"user_id": "u3", "product_id": P[i].product_id, **({"slot": slot} if slot else {})}
            return http.get("/v1/copy", params=params, headers=bearer(key))

        assert ask(a, 0).status_code == 200 and ask(a, 1).status_code == 200  # the burst
        over = ask(a, 2)
        assert over.status_code == 429 and over.json()["error"] == "rate_limited"
        assert 1 <= int(over.headers["Retry-After"]) <= 6
        assert ask(a, 0).status_code == 200  # a cached copy costs nothing
        assert ask(b, 3).status_code == 200  # another key has its own bucket
        # varying the slot does not get around it: a slot is one of the configured ones, each uncached
        assert ask(a, 4, slot="feed").status_code == 429
        bad = ask(b, 4, slot="<script>")
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_slot"


def test_open_mode_says_so_on_every_answer(settings: Settings) -> None:
    with ServerThread(create_app(settings)) as url, httpx.Client(base_url=url) as http:
        r = http.get("/v1/profile/nobody")
        assert r.status_code == 404 and r.headers["X-Livecopy-Auth"] == "open"
        assert http.get("/healthz").json()["auth"] == "open"


def test_keys_cli_create_list_revoke(settings: Settings) -> None:
    env = settings_env(settings)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "livecopy", "keys", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    made = cli("create", "--name", "shop", "--scope", "copy", "--scope", "profile:read")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("lck_") and len(secret) > 40
    listed = cli("list")
    assert "shop" in listed.stdout and "copy,profile:read" in listed.stdout and secret not in listed.stdout
    key_id = secret.split("_")[1]
    assert cli("revoke", key_id).returncode == 0
    assert "revoked" in cli("list").stdout
    assert cli("revoke", key_id).returncode != 0
    assert cli("create", "--name", "x", "--scope", "root").returncode != 0
