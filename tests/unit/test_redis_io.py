"""stream/redis_io.py without a Redis: the cluster settings, the asyncio cluster client, and how a batch's
WAIT answer and a node's refusals become TransientStoreError (a live cluster: test_redis_cluster.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import MovedError, NoScriptError, ResponseError

from core.settings import RedisSettings, load_settings
from stream import redis_io
from stream.redis_io import LuaScript, TransientStoreError, async_redis_client


def test_cluster_and_wait_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVECOPY_REDIS__CLUSTER", "true")
    monkeypatch.setenv("LIVECOPY_REDIS__WAIT_REPLICAS", "1")
    monkeypatch.setenv("LIVECOPY_REDIS__WAIT_TIMEOUT_MS", "250")
    r = load_settings().redis
    assert (r.cluster, r.wait_replicas, r.wait_timeout_ms) == (True, 1, 250)
    with pytest.raises(ValueError):
        RedisSettings(wait_replicas=-1)


def test_the_api_gets_an_asyncio_cluster_client() -> None:
    async def make() -> object:
        client = async_redis_client(RedisSettings(url="redis://127.0.0.1:7000/0", cluster=True), max_connections=8)
        await client.aclose()
        return client

    client = asyncio.run(make())  # lazy: nothing is contacted until the first command
    assert isinstance(client, AsyncRedisCluster)


class FakePipe:
    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.sent: list[tuple[Any, ...]] = []

    def evalsha(self, *args: Any) -> None:
        self.sent.append(("evalsha", *args))

    def wait(self, *args: Any) -> None:
        self.sent.append(("wait", *args))

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.node.pipelines.append(self.sent)
        return self.node.answers.pop(0)


class FakeNode:
    """A node answering each pipeline with the next of ``answers``."""

    def __init__(self, answers: list[list[Any]]) -> None:
        self.answers = answers
        self.pipelines: list[list[tuple[Any, ...]]] = []
        self.loaded = 0

    def pipeline(self, transaction: bool = False) -> FakePipe:
        return FakePipe(self)

    def script_load(self, source: str) -> str:
        self.loaded += 1
        return "sha"


def script_on(node: FakeNode, wait: tuple[int, int] | None) -> LuaScript:
    if wait:
        redis_io._WAIT[node] = wait
    return LuaScript(node, "profile/profile.lua")  # type: ignore[arg-type]


CALLS = [(["k1"], [1]), (["k2"], [2])]


def test_wait_follows_the_calls_on_the_same_pipeline_and_its_answer_decides() -> None:
    node = FakeNode([[[1], [0], 1]])
    assert script_on(node, (1, 100)).run(CALLS) == [[1], [0]]
    assert [c[0] for c in node.pipelines[0]] == ["evalsha", "evalsha", "wait"] and node.pipelines[0][-1][1:] == (1, 100)
    short = FakeNode([[[1], [0], 0]])
    with pytest.raises(TransientStoreError, match="only 0 of 1 Redis replicas acknowledged"):
        script_on(short, (1, 100)).run(CALLS)
    plain = FakeNode([[[1], [0]]])
    assert script_on(plain, None).run(CALLS) == [[1], [0]] and all(c[0] == "evalsha" for c in plain.pipelines[0])


def test_a_node_demoted_or_a_moved_slot_is_transient_a_bad_call_is_not() -> None:
    moved = FakeNode([[MovedError("3999 127.0.0.1:7001"), [1],
                       ResponseError("WAIT cannot be used with replica instances.")]])
    with pytest.raises(TransientStoreError, match="MovedError"):
        script_on(moved, (1, 100)).run(CALLS)
    demoted = FakeNode([[[1], [1], ResponseError("WAIT cannot be used with replica instances. Please...")]])
    with pytest.raises(TransientStoreError, match="WAIT cannot be used with replica"):
        script_on(demoted, (1, 100)).run(CALLS)
    bad = FakeNode([[ResponseError("ERR bad args"), [1]]])
    with pytest.raises(ResponseError, match="bad args"):
        script_on(bad, None).run(CALLS)


def test_a_node_without_the_script_loads_it_and_runs_the_calls_again() -> None:
    node = FakeNode([[NoScriptError("NOSCRIPT"), NoScriptError("NOSCRIPT"), 1], [[1], [1], 1]])
    assert script_on(node, (1, 100)).run(CALLS) == [[1], [1]]
    assert node.loaded == 1 and len(node.pipelines) == 2
