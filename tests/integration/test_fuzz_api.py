"""Fuzzing the HTTP API from its own OpenAPI document (schemathesis, a bounded number of examples per
operation), against the real broker and Redis, with an API key: no answer is a server error, and every
answer is one the document declares (status code, content type, body schema)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings

from core.settings import Settings
from core.wire import Topics
from livecopy.devstack import StackInfo
from services.api.app import create_app
from services.api.copy import copy_extension
from stream.access.keys import KeyStore
from stream.kafka_io import ensure_topics
from tests.copygen import ServerThread, copy_settings, save_tiny_student

pytestmark = pytest.mark.integration

KEY: dict[str, str] = {}


@pytest.fixture(scope="module")
def served(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    tag = uuid.uuid4().hex[:8]
    model: Path = save_tiny_student(tmp_path_factory.mktemp("fuzz") / "v1", "v1", seed=1)
    s = Settings(topics={"prefix": f"z{tag}."}, redis={"url": stack.redis_url, "key_prefix": f"z{tag}:"},  # type: ignore[arg-type]
                 kafka={"bootstrap_servers": stack.bootstrap_servers}, worker={"group_prefix": f"z{tag}-"},  # type: ignore[arg-type]
                 api={"auth": "keys", "generate_rate_per_s": 0},  # type: ignore[arg-type]
                 generation=copy_settings(model_dir=model, candidates=2, max_new_tokens=6, mc_draws=10,
                                          hot_reload=False))
    ensure_topics(s.kafka, Topics.from_settings(s.topics))
    _, key = KeyStore(redis.Redis.from_url(s.redis.url), s.redis.key_prefix).create("fuzz", ["admin"])
    KEY["Authorization"] = f"Bearer {key}"
    with ServerThread(create_app(s, extensions=[copy_extension(s)]), s.api) as url:
        spec = httpx.get(url + "/openapi.json", headers=KEY).json()
        yield url, spec


def test_no_undeclared_answer_and_no_server_error(served: tuple[str, dict[str, Any]]) -> None:
    url, spec = served
    schema = schemathesis.openapi.from_dict(spec)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "GET /v1/copy", "GET /v1/profile/{user_id}", "DELETE /v1/profile/{user_id}", "GET /metrics", "GET /healthz"}
    calls: dict[str, int] = {}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            response = case.call_and_validate(base_url=url, headers=dict(KEY))
            calls[case.path] = calls.get(case.path, 0) + 1
            assert response.status_code != 500, response.text

        check()
    assert sum(calls.values()) >= 5 * len(operations)
