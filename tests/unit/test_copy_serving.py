"""Pure parts of copy serving (cache keys, offset tracking, pre-generation plan, update choice)
and the engine's hot reload on a real tiny student (CPU)."""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from core.catalog import Catalog
from core.contracts import GeneratedCopy, ModelVersion
from core.settings import CopySettings, Settings
from engine.executor import CopyRequest, StudentExecutor, load_executor
from engine.serving import CopyEngine, model_dir_for, resolve_model_path
from models.text.context import product_context
from services.workers.generator import OffsetTracker, plan_products
from stream.copy_store import CopyKeys, CopyPublisher, PublishBacklog
from stream.model_updates import pick_update
from tests.copygen import MODEL_NAME, copy_settings, save_tiny_student

CAT = Catalog.generate(200, seed=5)


def mv(version: str, path: str = "x", name: str = MODEL_NAME, action: str = "promote") -> ModelVersion:
    return ModelVersion(name=name, version=version, path=path, created_at="2026-11-23T00:00:00Z", action=action)


def test_cache_keys_are_cluster_safe_and_unambiguous() -> None:
    k = CopyKeys("lc:")
    key = k.copy("u@1", "sku:1", "pdp hero", 7, "1.0:rc")
    assert key.startswith("lc:{u@1}:copy:")  # hash tag = user: same slot as the profile
    assert key == "lc:{u@1}:copy:1.0%3Arc:7:sku:1:pdp%20hero"
    variants = {k.copy("u", "a:b", "c", 1, "v"), k.copy("u", "a", "b:c", 1, "v"), k.copy("u", "a:b", None, 1, "v"),
                k.copy("u", "a", None, 1, "v"), k.copy("u", "a", None, 2, "v"), k.copy("u", "a", None, 1, "w")}
    assert len(variants) == 6
    assert k.catalog == "lc:catalog"


def test_offset_tracker_commits_only_finished_prefixes() -> None:
    t = OffsetTracker()
    a, b = ("t", 0), ("t", 1)
    for off in (10, 11, 12):
        t.add(a, off)
    t.add(b, 5)
    assert t.committable() == {a: 10, b: 5}
    t.done(a, 11)
    t.done(a, 12)
    assert t.committable()[a] == 10 and t.pending() == 2
    t.done(a, 10)
    t.done(b, 5)
    assert t.committable() == {a: 13, b: 6} and t.pending() == 0
    t.drop([b])
    t.done(b, 6)  # a late completion of a revoked partition is ignored
    assert t.committable() == {a: 13}


def test_plan_is_viewed_product_then_best_same_category_unseen() -> None:
    viewed = CAT.products[0]
    same = [p for p in CAT.in_category(viewed.category) if p.product_id != viewed.product_id]
    best = max(same, key=lambda p: p.reviews * p.rating)
    plan = plan_products(viewed, CAT, [], 3)
    assert plan[0] == viewed and plan[1] == best and len(plan) == min(4, len(same) + 1)
    assert all(p.category == viewed.category for p in plan)
    assert best not in plan_products(viewed, CAT, [best.product_id], 3)
    assert plan_products(viewed, CAT, [], 0) == [viewed]


def test_pick_update_takes_the_last_record_of_our_model() -> None:
    ups = [mv("2"), mv("9", name="other"), mv("3"), mv("2", action="rollback"), mv("4", action="weird")]
    chosen = pick_update(ups, MODEL_NAME)
    assert chosen is not None and (chosen.version, chosen.action) == ("2", "rollback")
    assert pick_update([mv("9", name="other")], MODEL_NAME) is None


def test_model_paths(tmp_path: Path) -> None:
    (tmp_path / "m" / "v2").mkdir(parents=True)
    assert resolve_model_path("m/v2", tmp_path) == tmp_path / "m" / "v2"
    assert resolve_model_path("/abs/v2", tmp_path) == Path("/abs/v2")
    assert resolve_model_path("elsewhere/v2", tmp_path) == Path("elsewhere/v2")
    s = Settings()
    assert model_dir_for(s).name == "livecopy-student"
    s2 = s.model_copy(update={"generation": CopySettings(model_dir=tmp_path)})
    assert model_dir_for(s2) == tmp_path


def test_publisher_refuses_at_once_when_its_local_queue_is_full_and_counts_failures() -> None:
    # a real producer with no broker behind it: room for one record, which times out after 0.5 s
    producer = Producer({"bootstrap.servers": "127.0.0.1:9", "queue.buffering.max.messages": 1,
                         "message.timeout.ms": 500, "log_level": 0})
    pub = CopyPublisher(producer, "t.copy")
    copy = GeneratedCopy(copy_id="c1", user_id="u1", product_id="p1", text="hi", model="m", model_version="1",
                         score=0.1, policy="greedy", created_at="2026-11-23T00:00:00Z")
    try:
        first = pub.publish(copy)
        assert not pub.congested()  # full, but it has not refused anything yet
        started = time.monotonic()
        with pytest.raises(PublishBacklog):
            pub.publish(copy)
        assert time.monotonic() - started < 0.4 and pub.backlogged == 1  # refused, not waited for
        assert pub.congested() and pub.congested()  # still full: asking does not clear it
        with pytest.raises(RuntimeError):
            first.result(10)  # never delivered: the Future says so
        assert pub.failed == 1 and pub.published == 0
        # librdkafka frees the record's queue slot just after its delivery report (on the poll thread)
        deadline = time.monotonic() + 5
        while len(producer) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pub.congested()
        assert pub.publish(copy) is not None  # room again
        assert not pub.congested()
    finally:
        assert pub.close(timeout_s=5) == 0


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reload")
    return {"v1": save_tiny_student(root / "v1", "v1", seed=1), "v2": save_tiny_student(root / "v2", "v2", seed=2),
            "bad": save_tiny_student(root / "bad", "bad", seed=3, break_weights=True),
            "alien": save_tiny_student(root / "alien", "a1", name="someone-else")}


def reqs(n: int) -> list[CopyRequest]:
    return [CopyRequest(f"u{i}", product_context(CAT.products[i % 50])) for i in range(n)]


@pytest.mark.parametrize("kind", ["static", "continuous"])
def test_hot_reload_swaps_between_batches_refuses_bad_versions_and_drops_nothing(dirs: dict[str, Path],
                                                                                 kind: str) -> None:
    cfg = copy_settings(max_batch_size=4, max_wait_ms=1.0, candidates=2, max_new_tokens=6, mc_draws=20, engine=kind)
    seen: list[str] = []
    engine = CopyEngine(load_executor(dirs["v1"], cfg), cfg, on_batch=lambda n, s, v: seen.append(v)).start()
    table, prompts = engine.executor.drafts, engine.executor.prompt_cache
    try:
        first: list[Future[Any]] = [engine.submit(r) for r in reqs(12)]
        ev = engine.apply_update(mv("v2", str(dirs["v2"])))
        assert ev.outcome == "swapped" and engine.version == "v2"
        assert table is not None and engine.executor.drafts is table  # the draft table carries over
        # the prompt cache does not: its keys/values are v1's
        assert prompts is not None and engine.executor.prompt_cache is not None
        assert engine.executor.prompt_cache is not prompts and len(engine.executor.prompt_cache) == 0
        second = [engine.submit(r) for r in reqs(12)]
        results = [f.result(60) for f in first + second]
        assert len(results) == 24 and all(r.text for r in results)
        assert all(r.model_version == "v2" for r in results[12:])  # accepted after the swap: new model
        assert {r.model_version for r in results[:12]} <= {"v1", "v2"}
        if kind == "static":
            assert seen == sorted(seen, key=lambda v: v != "v1")  # never back to v1 once v2 served
        else:  # the rows in flight at the swap finish on v1, stepped beside the new batch on v2
            # (at most one decode's steps: nothing queued after the swap is admitted on v1)
            assert seen[-1] == "v2" and seen[seen.index("v2"):].count("v1") <= cfg.max_new_tokens + 1
        bad = engine.apply_update(mv("bad", str(dirs["bad"])))
        assert bad.outcome == "refused" and "non-finite" in bad.reason
        missing = engine.apply_update(mv("v9", str(dirs["v1"].parent / "nope")))
        assert missing.outcome == "refused" and "load failed" in missing.reason
        alien = engine.apply_update(mv("a1", str(dirs["alien"]), name="someone-else"))
        assert alien.outcome == "refused"
        renamed = engine.apply_update(mv("a1", str(dirs["alien"])))  # our name on the record, not in the checkpoint
        assert renamed.outcome == "refused" and "is not" in renamed.reason
        assert engine.apply_update(mv("v2", str(dirs["v2"]))).outcome == "unchanged"
        assert engine.version == "v2" and all(r.model_version == "v2" for r in engine.generate(reqs(3)))
        back = engine.apply_update(mv("v1", str(dirs["v1"]), action="rollback"))
        assert back.outcome == "swapped" and engine.generate(reqs(2))[0].model_version == "v1"
        assert [e.outcome for e in engine.reloads.events] == [
            "swapped", "refused", "refused", "refused", "refused", "unchanged", "swapped"]
        assert isinstance(engine.executor, StudentExecutor)
    finally:
        engine.stop()


def _cached(text: str, template: str | None, policy: str, slot: str | None = "pdp") -> bytes:
    import orjson

    return orjson.dumps({"copy_id": "c-1", "user_id": "u", "product_id": "p", "text": text, "template": template,
                         "policy": policy, "slot": slot})


def test_a_cached_copy_is_refilled_from_the_product_as_it_is_now() -> None:
    import dataclasses

    import orjson

    from services.copyflow import CopyFlow

    p = CAT.products[0]
    p = dataclasses.replace(p, price=153.99, discount_pct=20)
    cheaper = dataclasses.replace(p, price=99.0)
    template = "Save {discount} on the {title}, now {sale_price}."
    first = StudentExecutor.render(template, product_context(p, "pdp"))[0]
    assert "$123.19" in first
    # same record: the cached bytes as they are
    cached = _cached(first, template, "thompson")
    assert CopyFlow.refill(cached, p) == cached
    # the price changed: the same template with the new price
    now = orjson.loads(CopyFlow.refill(cached, cheaper) or b"{}")
    assert now["text"] == f"Save 20% on the {p.title}, now $79.20." and now["copy_id"] == "c-1"
    # the discount ended: the copy no longer fits the record, a new one is made
    assert CopyFlow.refill(cached, dataclasses.replace(p, discount_pct=0)) is None
    # the fallback copy is re-made from the record
    fb = orjson.loads(CopyFlow.refill(_cached("Meet the X, $153.99.", None, "fallback"), cheaper) or b"{}")
    assert "$79.20" in fb["text"] and "153.99" not in fb["text"]
    # an unslotted copy with a fact baked in is kept only while the fact holds
    baked = _cached(f"The {p.title}, now just $123.19 with 20% off.", None, "thompson")
    assert CopyFlow.refill(baked, p) == baked
    assert CopyFlow.refill(baked, cheaper) is None
