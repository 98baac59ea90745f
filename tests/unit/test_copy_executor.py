"""The copy executor (filter, policy, fallback, propensity) and the engine on a real tiny student (CPU)."""

from __future__ import annotations

import gc
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.catalog import Catalog
from core.contracts import GeneratedCopy
from engine.executor import CopyRequest, StudentExecutor, load_executor, smoke_check
from engine.serving import CopyEngine
from models.generate import Candidate
from models.text.context import context_from_features, product_context
from models.text.slots import fill
from tests.copygen import copy_settings, save_tiny_student

CAT = Catalog.generate(60, seed=11)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("m") / "v1", "v1")


def requests(n: int, slot: str | None = "pdp") -> list[CopyRequest]:
    return [CopyRequest(f"u{i}", product_context(CAT.products[i % len(CAT)], slot), profile_version=i)
            for i in range(n)]


class ScriptedGenerate:
    """Stands in for models.generate.generate_candidates: K fixed candidates per prompt (one good
    copy about the product, the rest failing the filter unless `all_good`)."""

    def __init__(self, reqs: list[CopyRequest], all_good: bool = False, none_good: bool = False) -> None:
        self.reqs = reqs
        self.all_good = all_good
        self.none_good = none_good

    def __call__(self, model: Any, tok: Any, prompts: list[str], k: int, **kw: Any) -> list[list[Candidate]]:
        out = []
        for _ in self.reqs[: len(prompts)]:
            good = "The {title} is a {noun} built to last, rated {rating} stars."
            group = []
            for j in range(k):
                ok = not self.none_good and (self.all_good or j == 1)
                text = good if ok else "buy buy buy now"
                group.append(Candidate(text=text, style="quality", logprob=-1.0, token_ids=[1],
                                       ctr=0.1 + 0.1 * j, ctr_features=np.full(8, 0.1 * j, np.float32)))
            out.append(group)
        return out


@pytest.mark.parametrize("policy", ["thompson", "greedy", "epsilon_greedy", "random"])
def test_only_filtered_candidates_are_chosen_with_a_propensity(model_dir: Path, policy: str) -> None:
    reqs = requests(4)
    ex = load_executor(model_dir, copy_settings(policy=policy, candidates=3))
    ex.generate = ScriptedGenerate(reqs)
    results = ex.run(reqs)
    assert len(results) == 4
    for req, res in zip(reqs, results, strict=True):
        assert res.product_id == req.product_id and res.user_id == req.user_id
        assert res.text.startswith("The ") and res.policy == policy
        assert res.template == "The {title} is a {noun} built to last, rated {rating} stars."
        assert res.text == fill(res.template, req.ctx) and req.ctx.title in res.text  # filled from the record
        assert res.propensity == pytest.approx(1.0)  # one eligible candidate: any policy must pick it
        assert res.score == pytest.approx(0.2) and res.passed == 1 and res.candidates == 3
        assert res.model_version == "v1" and res.model == "livecopy-student" and res.slot == "pdp"
        assert context_from_features(res.features) == req.ctx
        assert res.features["profile_version"] == req.profile_version
    assert ex.filter_stats.checked == 12 and ex.filter_stats.passed == 4 and ex.filter_stats.fallbacks == 0


def test_thompson_propensity_is_a_probability_and_greedy_takes_the_best(model_dir: Path) -> None:
    reqs = requests(20)
    ex = load_executor(model_dir, copy_settings(policy="thompson", candidates=3, mc_draws=400))
    ex.generate = ScriptedGenerate(reqs, all_good=True)
    res = ex.run(reqs)
    assert all(0.0 < r.propensity <= 1.0 for r in res)
    assert len({r.copy_id for r in res}) == 20
    gx = load_executor(model_dir, copy_settings(policy="greedy", candidates=3))
    gx.generate = ScriptedGenerate(reqs, all_good=True)
    assert all(r.score == pytest.approx(0.3) and r.propensity == 1.0 for r in gx.run(reqs))


def test_no_safe_candidate_gives_the_fallback_copy_counted(model_dir: Path) -> None:
    reqs = requests(3)
    ex = load_executor(model_dir, copy_settings(candidates=2))
    ex.generate = ScriptedGenerate(reqs, none_good=True)
    res = ex.run(reqs)
    assert [r.policy for r in res] == ["fallback"] * 3
    assert all(r.propensity == 1.0 and 0.0 <= r.score <= 1.0 and r.style == "practical" for r in res)
    assert ex.filter_stats.fallbacks == 3 and ex.filter_stats.reasons["repetition"] == 6


def test_real_student_results_are_contract_copies(model_dir: Path) -> None:
    ex = load_executor(model_dir, copy_settings())
    reqs = requests(5, slot=None)
    res = ex.run(reqs)
    assert [r.product_id for r in res] == [r.product_id for r in reqs]
    for r in res:
        GeneratedCopy.model_validate(r.to_copy().model_dump())
        assert r.text and r.model_version == "v1"
    assert smoke_check(ex)["copies"]


def test_smoke_check_refuses_broken_weights(tmp_path: Path) -> None:
    from engine.executor import SmokeCheckFailed

    ex = load_executor(save_tiny_student(tmp_path / "bad", "bad", break_weights=True), copy_settings())
    with pytest.raises(SmokeCheckFailed, match="non-finite"):
        smoke_check(ex)


@pytest.mark.parametrize("kind", ["static", "continuous"])
def test_engine_batches_real_model_and_answers_one_to_one(model_dir: Path, kind: str) -> None:
    cfg = copy_settings(max_batch_size=8, max_wait_ms=20.0, engine=kind)
    sizes: list[int] = []
    engine = CopyEngine.from_dir(model_dir, cfg, on_batch=lambda n, s, v: sizes.append(n)).start()
    try:
        reqs = requests(24)
        futs: list[Future[Any]] = [engine.submit(r) for r in reqs]
        results = [f.result(60) for f in futs]
    finally:
        engine.stop()
    assert [r.product_id for r in results] == [r.product_id for r in reqs]
    assert [r.user_id for r in results] == [r.user_id for r in reqs]
    # on_batch: per batch (static) or per decode step, with the requests decoding (continuous)
    assert engine.batching.stats.requests == 24 and max(sizes) > 1 and max(sizes) <= 8
    if kind == "static":
        assert sum(sizes) == 24
    assert isinstance(engine.executor, StudentExecutor) and engine.version == "v1"


def test_a_started_engine_leaves_its_startup_heap_to_reference_counting(model_dir: Path) -> None:
    """CopyEngine.start() freezes what is alive (the model, torch): a full collection no longer scans it."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    engine = CopyEngine.from_dir(model_dir, copy_settings(engine="continuous")).start()
    try:
        assert gc.get_freeze_count() > 0
        model = engine.executor.student.model  # loaded before the start: frozen, out of the collector's scans
        assert not any(o is model for o in gc.get_objects())
    finally:
        engine.stop()
        gc.unfreeze()


def _eco_lover() -> Any:
    from core.styles import StyleResponse

    resp = StyleResponse.empty()
    for st in ("urgency", "discount", "quality", "eco", "social_proof", "practical"):
        for i in range(200):
            resp.observe(st, 0.05, clicked=(st == "eco" and i < 40))  # eco: 40 clicks where 10 expected
    return resp


def test_a_shoppers_style_response_tilts_the_styles_the_real_student_samples(model_dir: Path) -> None:
    """A shopper who clicked 'eco' copy 4x more than predicted and never the other styles gets
    eco candidates: the style tokens' first-token logits are tilted by log(multiplier) / 0.3."""
    resp = _eco_lover()
    reqs = [CopyRequest(f"u{i}", product_context(CAT.products[i], "pdp"), style_response=resp) for i in range(6)]
    ex = load_executor(model_dir, copy_settings(policy="thompson", candidates=4, mc_draws=50))
    calls: list[tuple[dict[str, Any], list[list[Candidate]]]] = []
    real = ex.generate

    def spy(*a: Any, **kw: Any) -> list[list[Candidate]]:
        out = real(*a, **kw)
        calls.append((kw, out))
        return out

    ex.generate = spy
    ex.run(reqs)
    ex.run([CopyRequest(r.user_id, r.ctx) for r in reqs])
    (kw_t, tilted), (kw_p, plain) = calls
    bias = kw_t["style_bias"][0]  # about log(43/13)/0.3 = 4.0 for eco, log(3/13)/0.3 = -4.9 the rest (sampled)
    assert bias["eco"] - max(v for st, v in bias.items() if st != "eco") > 5.0
    assert "style_bias" not in kw_p  # no response: the model's own style distribution
    share_t = np.mean([c.style == "eco" for g in tilted for c in g])
    share_p = np.mean([c.style == "eco" for g in plain for c in g])
    assert share_t >= 0.9 and share_t > share_p + 0.3


def test_a_shoppers_style_response_steers_the_choice_but_not_the_logged_score(model_dir: Path) -> None:
    reqs = [CopyRequest(f"u{i}", product_context(CAT.products[i], "pdp"), style_response=_eco_lover())
            for i in range(8)]
    ex = load_executor(model_dir, copy_settings(policy="thompson", candidates=4, mc_draws=50))

    def scripted(model: Any, tok: Any, prompts: list[str], k: int, **kw: Any) -> list[list[Candidate]]:
        out = []
        for _ in reqs[: len(prompts)]:
            text = "The {title} is a {noun} built to last, rated {rating} stars."
            out.append([Candidate(text=text, style=st, logprob=-1.0, token_ids=[1], ctr=ctr,
                                  ctr_features=np.zeros(8, np.float32))
                        for st, ctr in (("quality", 0.2), ("eco", 0.1), ("urgency", 0.2), ("social_proof", 0.2))])
        return out

    ex.generate = scripted
    res = ex.run(reqs)
    assert all(r.style == "eco" for r in res)  # the head prefers the others 2:1, the shopper eco ~14:1
    assert all(r.score == pytest.approx(0.1) for r in res)  # logged: the head's CTR, as the worker expects
    ex_plain = load_executor(model_dir, copy_settings(policy="greedy", candidates=4))
    ex_plain.generate = scripted
    assert not any(r.style == "eco" for r in ex_plain.run([CopyRequest(r.user_id, r.ctx) for r in reqs]))


@pytest.mark.parametrize("kind", ["static", "continuous"])
def test_a_poisoned_request_cannot_fail_the_others_of_its_batch(model_dir: Path, kind: str) -> None:
    """One request whose category is thousands of tokens long (CJK, emoji: what a valid event can plant in
    a profile) among 31 others: its prompt is shortened to the model's positions, and every request of the
    batch gets its copy; an executor that fails on one request answers that one alone with the error."""
    from dataclasses import replace as dc_replace

    cfg = copy_settings(max_batch_size=32, max_wait_ms=50.0, candidates=2, max_new_tokens=8, engine=kind)
    engine = CopyEngine.from_dir(model_dir, cfg).start()
    assert type(engine.batching).__name__ == ("ContinuousEngine" if kind == "continuous" else "BatchingEngine")
    try:
        reqs = requests(32)
        poison = "猫😀" * 120 + "/" + "é" * 200
        reqs[5] = CopyRequest("u5", dc_replace(reqs[5].ctx, category=poison, title="标题" * 100,
                                               likes=("😀" * 60,) * 3), profile_version=5)
        results = [f.result(120) for f in [engine.submit(r) for r in reqs]]
    finally:
        engine.stop()
    assert [r.user_id for r in results] == [r.user_id for r in reqs]
    assert all(r.text for r in results)

    class FailsOnOne:
        version = "v1"

        def run(self, batch: list[CopyRequest]) -> list[str]:
            if any(r.user_id == "bad" for r in batch):
                raise IndexError("index out of range in self")
            return [r.user_id for r in batch]

    from engine.batching import BatchConfig, BatchingEngine

    eng: BatchingEngine[Any, Any] = BatchingEngine(FailsOnOne(), BatchConfig(max_batch_size=32, max_wait_ms=50))
    eng.start()
    try:
        futs = [eng.submit(CopyRequest(u, reqs[0].ctx)) for u in ["a", "b", "bad", "c"]]
        done = []
        for f in futs:
            try:
                done.append(f.result(30))
            except IndexError:
                done.append("error")
    finally:
        eng.stop()
    assert done == ["a", "b", "error", "c"]
