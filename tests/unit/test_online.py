"""Online trainer (tiny real student), its worker processor on the in-memory Kafka, the model
registry (lineage, promote, rollback) and the off-policy estimators."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from core.contracts import ModelVersion
from core.metrics import TrainerMetrics
from core.settings import TopicSettings, TrainerSettings
from core.styles import STYLES
from core.wire import Record, Topics
from models.registry import Registry, RegistryError
from models.student import ModelMeta
from models.training.offpolicy import estimate
from models.training.online import OnlineTrainer, is_heldout, row_of
from services.workers.trainer import TrainerProcessor
from tests.copygen import save_tiny_student
from tests.fakes import FakeCluster, FakeProducer
from tests.feedback_data import feedback_records, probe_prompts, style_ctr

FAV = STYLES[2]


def trainer_settings(tmp: Path, **over: object) -> TrainerSettings:
    base: dict[str, object] = {"registry_dir": tmp / "registry", "mode": "full", "batch_size": 32, "lr": 1e-2,
                               "eval_every": 6, "min_heldout": 20, "heldout_fraction": 0.15, "gate_z": 0.0}
    base.update(over)
    return TrainerSettings.model_validate(base)


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    torch.set_num_threads(1)
    return save_tiny_student(tmp_path / "base", "0.9.0", seed=1)


def favoured_share(t: OnlineTrainer, prompts: list[str]) -> float:
    return sum(p[FAV] for p in t.style_probs(prompts)) / len(prompts)


def favoured_score_gap(t: OnlineTrainer) -> float:
    """Mean CTR score of favoured-style copies minus that of the others, on fresh records."""
    recs = feedback_records(120, style_ctr(FAV), seed=77)
    from models.text.context import build_prompt, context_from_features

    prompts = [build_prompt(context_from_features(r.features)) for r in recs]
    scores = t.score(prompts, [r.template or r.text for r in recs], [r.style for r in recs])
    fav = [s for s, r in zip(scores, recs, strict=True) if r.style == FAV]
    other = [s for s, r in zip(scores, recs, strict=True) if r.style != FAV]
    return sum(fav) / len(fav) - sum(other) / len(other)


def test_clicked_style_gets_likelier_and_scores_higher_and_a_version_is_published(
        tmp_path: Path, base_dir: Path) -> None:
    t = OnlineTrainer(base_dir, trainer_settings(tmp_path))
    assert t.serving_version == "0.9.0"
    prompts = probe_prompts(16)
    share0, gap0 = favoured_share(t, prompts), favoured_score_gap(t)
    recs = feedback_records(1500, style_ctr(FAV), seed=1)
    published = []
    for i in range(0, len(recs), 100):
        rep = t.update(recs[i:i + 100] + recs[max(0, i - 10):i])  # with re-deliveries
        assert rep.duplicates == min(i, 10)
        mv = t.maybe_publish()
        if mv is not None:
            published.append(mv)
    share1, gap1 = favoured_share(t, prompts), favoured_score_gap(t)
    assert share1 > share0 + 0.1, (share0, share1)
    assert gap1 > gap0 + 0.002, (gap0, gap1)
    assert published, t.last_eval
    last = published[-1]
    reg = Registry(tmp_path / "registry", last.name)
    assert reg.current() == last.version
    assert reg.lineage(last.version)[-1] == "0.9.0"
    assert ModelMeta.read(Path(last.path)).parent_version == last.parent_version
    assert {"heldout_ctr_logloss", "kl_to_parent", "ope_snips", "ope_ips"} <= set(last.metrics)
    assert last.metrics["heldout_ctr_logloss"] <= last.metrics["parent_heldout_ctr_logloss"]
    # A restarted trainer resumes from what serves.
    assert OnlineTrainer(base_dir, trainer_settings(tmp_path)).serving_version == last.version


def test_gate_refuses_and_says_why(tmp_path: Path, base_dir: Path) -> None:
    t = OnlineTrainer(base_dir, trainer_settings(tmp_path, min_heldout=10_000))
    t.update(feedback_records(300, style_ctr(FAV), seed=2))
    assert t.maybe_publish(force_eval=True) is None
    assert t.last_eval is not None and not t.last_eval.publish
    assert "min_heldout" in t.last_eval.reasons[0] and t.last_eval.codes == ["heldout_small"]
    t2 = OnlineTrainer(base_dir, trainer_settings(tmp_path / "b", max_kl=0.0, lr=0.05))
    t2.update(feedback_records(300, style_ctr(FAV), seed=2))
    assert t2.maybe_publish(force_eval=True) is None
    assert t2.last_eval is not None and any("max_kl" in r for r in t2.last_eval.reasons) and "kl" in t2.last_eval.codes
    assert Registry(tmp_path / "b" / "registry", "livecopy-student").current() == "0.9.0"


def test_processor_trains_publishes_announces_and_rejects_bad_records(tmp_path: Path, base_dir: Path) -> None:
    topics = Topics.from_settings(TopicSettings())
    cluster = FakeCluster()
    for name, n in topics.partition_counts().items():
        cluster.create(name, n)
    producer = FakeProducer(cluster)
    trainer = OnlineTrainer(base_dir, trainer_settings(tmp_path, eval_every=2, logloss_tolerance=10.0, max_kl=2.0))
    metrics = TrainerMetrics("trainer", CollectorRegistry())
    proc = TrainerProcessor(trainer, producer, topics, metrics)
    recs = [Record(topics.feedback, 0, i, r.copy_id.encode(), r.model_dump_json().encode())
            for i, r in enumerate(feedback_records(400, style_ctr(FAV), seed=3))]
    recs.append(Record(topics.feedback, 0, 999, b"x", b"not json"))
    producer.fail_deliveries = True
    from stream.kafka_io import TransientError

    with pytest.raises(TransientError):
        proc.process(recs)
    assert trainer.published and proc.unannounced  # published, announcement pending
    producer.fail_deliveries = False
    out = proc.process(recs)  # the retried batch: duplicates for the trainer, the announcement goes out
    assert [r.offset for r, _ in out.rejected] == [999]
    ups = [ModelVersion.model_validate_json(m.value() or b"") for m in cluster.records(topics.model_updates)]
    assert [u.version for u in ups] == [mv.version for mv in trainer.published]
    assert all(Path(u.path).is_dir() and u.parent_version for u in ups)
    # every gate decision is counted for Prometheus (one evaluation per publication here)
    published = metrics.registry.get_sample_value("livecopy_trainer_gate_decisions_total",
                                                  {"decision": "published", "reason": "none"})
    assert published == len(trainer.published) > 0


def test_registry_promote_rollback_and_lineage(tmp_path: Path, base_dir: Path) -> None:
    reg = Registry(tmp_path / "reg", "livecopy-student")
    reg.import_base(base_dir, "0.9.0")
    for v, parent in (("v2", "0.9.0"), ("v3", "v2")):
        save_tiny_student(reg.path_of(v), v, seed=2)
        reg.add(v, parent, {"m": 1.0}, promote=True)
    assert reg.current() == "v3" and reg.lineage("v3") == ["v3", "v2", "0.9.0"]
    assert reg.rollback().version == "v2" and reg.current() == "v2"
    assert reg.promote("v3").version == "v3"
    assert reg.rollback(to="0.9.0").action == "rollback" and reg.current() == "0.9.0"
    with pytest.raises(RegistryError):
        reg.rollback()  # the base has no parent
    with pytest.raises(RegistryError):
        reg.promote("nope")
    status = {v.version: v.status for v in reg.versions()}
    assert status == {"0.9.0": "serving", "v2": "retired", "v3": "retired"}
    assert [h["action"] for h in reg.history()] == ["import", "promote", "promote", "rollback", "promote", "rollback"]


def test_offpolicy_estimates() -> None:
    # logging uniform over 2 actions (p=0.5); new policy always picks action A (ratio 2 on A, 0 on B)
    rewards = [1, 0, 1, 1, 0, 0]  # A, A, A, B, B, B (A clicked 2/3, B 1/3)
    ratios = [2.0, 2.0, 2.0, 0.0, 0.0, 0.0]
    e = estimate(rewards, ratios)
    assert e.logged_ctr == 0.5
    assert math.isclose(e.ips, 4 / 6) and math.isclose(e.snips, 2 / 3) and math.isclose(e.ess, 3.0)
    c = estimate([1, 0], [50.0, 1.0], clip=10)
    assert c.clipped == 1 and c.max_ratio == 50.0 and math.isclose(c.snips, 10 / 11)
    assert estimate([], []).n == 0
    with pytest.raises(ValueError):
        estimate([1], [-1.0])


def test_heldout_split_is_stable() -> None:
    ids = [f"imp-{i}" for i in range(5000)]
    share = sum(is_heldout(i, 0.1) for i in ids) / len(ids)
    assert 0.08 < share < 0.12 and [is_heldout(i, 0.1) for i in ids[:50]] == [is_heldout(i, 0.1) for i in ids[:50]]


def test_training_draws_from_the_trainers_own_rng_not_the_global_one(tmp_path: Path, base_dir: Path) -> None:
    recs = feedback_records(200, style_ctr(FAV), seed=3)

    def trained(where: str, spend_global: bool) -> list[torch.Tensor]:
        torch.manual_seed(123)
        before = torch.get_rng_state()
        t = OnlineTrainer(base_dir, trainer_settings(tmp_path / where), seed=5)
        assert torch.equal(torch.get_rng_state(), before)  # constructing it leaves the process's RNG alone
        if spend_global:
            torch.rand(1000)  # someone else in the process draws in between
        after_spend = torch.get_rng_state()
        assert t.update(recs).steps >= 4
        assert torch.equal(torch.get_rng_state(), after_spend)  # and so does training (dropout)
        return [p.detach().clone() for p in t.model.parameters()]

    quiet, busy = trained("a", False), trained("b", True)
    assert all(torch.equal(a, b) for a, b in zip(quiet, busy, strict=True))  # same seed, same dropout masks


@pytest.mark.parametrize("poison", [
    {"product": {"reviews": float("inf")}},  # int(inf): what a 1e400 in the JSON becomes
    {"raw": ["not", "a", "mapping"]},
    {"product": "not a mapping"},
    {"v": 99},
])
def test_a_record_whose_features_cannot_rebuild_the_prompt_is_skipped_not_raised(poison: dict[str, object]) -> None:
    good = feedback_records(1, style_ctr(FAV), seed=3)[0]
    features = {**good.features, **poison}
    if isinstance(poison.get("product"), dict):
        features["product"] = {**good.features["product"], **poison["product"]}  # type: ignore[dict-item]
    assert row_of(good) is not None
    assert row_of(good.model_copy(update={"features": features})) is None


def test_a_promotion_whose_announcement_was_cut_off_is_announced_by_the_next_trainer(tmp_path: Path,
                                                                                     base_dir: Path) -> None:
    topics = Topics.from_settings(TopicSettings())
    cluster = FakeCluster()
    for name, n in topics.partition_counts().items():
        cluster.create(name, n)
    cfg = trainer_settings(tmp_path, eval_every=2, logloss_tolerance=10.0, max_kl=2.0)
    producer = FakeProducer(cluster)
    first = TrainerProcessor(OnlineTrainer(base_dir, cfg), producer, topics)
    assert first.unannounced == []  # a fresh registry's base serves from the start: nothing to announce
    recs = [Record(topics.feedback, 0, i, r.copy_id.encode(), r.model_dump_json().encode())
            for i, r in enumerate(feedback_records(400, style_ctr(FAV), seed=3))]
    producer.fail_deliveries = True
    from stream.kafka_io import TransientError

    with pytest.raises(TransientError):
        first.process(recs)
    promoted = first.trainer.published[-1]
    assert Registry(cfg.registry_dir, cfg.model_name).current() == promoted.version
    # the trainer stops here; generators never heard of `promoted`. The next one announces it first.
    producer.fail_deliveries = False
    second = TrainerProcessor(OnlineTrainer(base_dir, cfg), producer, topics)
    assert [mv.version for mv in second.unannounced] == [promoted.version]
    second.announce_pending()
    ups = [ModelVersion.model_validate_json(m.value() or b"") for m in cluster.records(topics.model_updates)]
    assert [(u.version, u.action) for u in ups] == [(promoted.version, "promote")]
    assert TrainerProcessor(OnlineTrainer(base_dir, cfg), producer, topics).unannounced == []


def test_the_registry_knows_whether_its_serving_version_was_announced(tmp_path: Path, base_dir: Path) -> None:
    reg = Registry(tmp_path / "reg", "livecopy-student")
    reg.import_base(base_dir, "0.9.0")
    assert reg.unannounced() is None  # the imported base serves from the start
    (reg.path_of("v2")).mkdir(parents=True)
    (reg.path_of("v2") / "config.json").write_text("{}")
    reg.add("v2", "0.9.0", {}, promote=True)
    mv = reg.unannounced()
    assert mv is not None and (mv.version, mv.action) == ("v2", "promote")
    reg.mark_announced("v2")
    assert reg.unannounced() is None
    reg.rollback()
    back = reg.unannounced()
    assert back is not None and (back.version, back.action) == ("0.9.0", "rollback")


# -- head mode (the default): refit of the CTR head, its posterior and the style policy on embeddings


def test_head_mode_publishes_heads_on_the_parents_trunk_and_serving_tilts_to_the_clicked_style(
        tmp_path: Path, base_dir: Path) -> None:
    from core.settings import CopySettings
    from engine.executor import load_executor
    from engine.policy import POSTERIOR_FILE
    from models.student import load_student, trunk_of
    from models.style_policy import STYLE_POLICY_FILE
    from models.text.context import context_from_features

    cfg = trainer_settings(tmp_path, mode="head", refit_every=250, logloss_tolerance=0.02, head_min_steps=200)
    t = OnlineTrainer(base_dir, cfg)
    gap0 = favoured_score_gap(t)
    recs = feedback_records(1500, style_ctr(FAV), seed=4)
    published = []
    for i in range(0, len(recs), 100):
        rep = t.update(recs[i:i + 100])
        assert rep.duplicates == 0 and rep.skipped == 0
        mv = t.maybe_publish()
        if mv is not None:
            published.append(mv)
    assert t.refits >= 4 and published, t.last_eval
    last = published[-1]
    path = Path(last.path)
    assert (path / STYLE_POLICY_FILE).exists() and (path / POSTERIOR_FILE).exists()
    meta = ModelMeta.read(path)
    assert meta.training["kind"] == "online-head" and trunk_of(meta) == "0.9.0"
    assert Registry(cfg.registry_dir, cfg.model_name).lineage(last.version)[-1] == "0.9.0"
    base, new = load_student(base_dir), load_student(path)
    assert all(torch.equal(a, b) for a, b in zip(base.model.transformer.parameters(),
                                                 new.model.transformer.parameters(), strict=True))
    assert not torch.equal(base.model.ctr_head.out.weight, new.model.ctr_head.out.weight)
    assert favoured_score_gap(t) > gap0 + 0.02
    # the generator loads the version's style policy and tilts the style tokens towards the clicked style
    ex = load_executor(path, CopySettings(device="cpu"))
    assert ex.style_policy is not None and ex.trunk == "0.9.0"
    biases = [ex.style_policy.bias(context_from_features(r.features)) for r in feedback_records(30, style_ctr(FAV),
                                                                                                 seed=9)]
    top = sum(max(b, key=lambda st: b[st]) == FAV for b in biases)
    assert top >= 24, biases  # the clicked style first in most contexts (a tiny random trunk: not all)
    mean = {st: sum(b[st] for b in biases) / len(biases) for st in STYLES}
    assert max(mean, key=lambda st: mean[st]) == FAV, mean
    assert {"heldout_ctr_logloss", "kl_to_parent", "ope_snips"} <= set(last.metrics)


def test_head_mode_reads_the_logged_embedding_of_its_trunk_and_recomputes_any_other(
        tmp_path: Path, base_dir: Path) -> None:
    import numpy as np

    from core.contracts import Embedding

    t = OnlineTrainer(base_dir, trainer_settings(tmp_path, mode="head", refit_every=10_000, heldout_fraction=0.0))
    d = t.model.config.n_embd
    recs = feedback_records(30, style_ctr(FAV), seed=5)
    logged = np.linspace(-1, 1, d)
    same = [r.model_copy(update={"embedding": Embedding.pack(logged, "0.9.0")}) for r in recs[:10]]
    other = [r.model_copy(update={"embedding": Embedding.pack(logged, "another-trunk")}) for r in recs[10:20]]
    wrong = [r.model_copy(update={"embedding": Embedding.pack(logged[:3], "0.9.0")}) for r in recs[20:]]
    t.update(same + other + wrong)
    rows = {r.impression_id: r for r in t._window}
    want = Embedding.pack(logged, "x").vector()
    assert all(np.array_equal(rows[r.impression_id].embedding, want) for r in same)
    for r in other + wrong:  # recomputed by this trunk
        e = rows[r.impression_id].embedding
        assert e is not None and e.shape == (d,) and not np.allclose(e, want)
    again = t.update([*recs[:10], recs[0].model_copy(update={"impression_id": "fresh"})])
    assert again.duplicates == 10 and again.records == 11


def test_the_copy_record_keeps_the_embedding_and_the_api_never_shows_it() -> None:
    import numpy as np
    import orjson

    from core.contracts import Embedding, GeneratedCopy
    from services.api.copy import CopyService
    from stream.access.keys import ApiKey

    v = np.arange(8, dtype=np.float32) / 8
    e = Embedding.pack(v, "2.0.0")
    assert np.array_equal(e.vector(), v) and e.dtype == "float16"
    doc = GeneratedCopy(copy_id="c-1", user_id="u", product_id="p", text="t", model="m", model_version="2",
                        score=0.5, policy="thompson", created_at="2026-01-01T00:00:00Z", features={"a": 1},
                        embedding=e)
    body = doc.model_dump_json().encode()
    assert GeneratedCopy.model_validate_json(body).embedding == e
    for scopes in (("copy",), ("copy", "debug")):
        key = ApiKey(key_id="k", name="k", scopes=scopes, created_ms=0)
        shown = orjson.loads(CopyService._for(key, body))
        assert "embedding" not in shown and ("features" in shown) == ("debug" in scopes)


def test_the_gate_allows_a_candidate_within_the_noise_of_the_held_out_slice() -> None:
    from models.training.online import _paired_se

    y = [True, False] * 200
    serv = [0.6, 0.4] * 200
    same = _paired_se(serv, serv, y)
    assert same == 0.0
    noisy = _paired_se([0.62, 0.41, 0.58, 0.39] * 100, serv, y)
    assert 0.0 < noisy < 0.01 and math.isnan(_paired_se([0.5], [0.5], [True]))
