"""The committed default student: present, small, loadable, and it writes usable copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.catalog import Product
from core.styles import STYLES, classify_style
from engine.executor import StudentExecutor
from models.corpus import CorpusConfig, build_corpus
from models.generate import generate_candidates, style_distribution
from models.paths import shipped_student_dir
from models.student import LoadedStudent, load_student
from models.text.context import CopyContext, build_prompt, context_from_features, product_context
from models.text.slots import SLOT_RE, SLOTS, available, slot_token, slots_in


@pytest.fixture(scope="module")
def shipped() -> LoadedStudent:
    return load_student(shipped_student_dir())


def test_shipped_checkpoint_is_small_and_self_describing(shipped: LoadedStudent) -> None:
    d = shipped_student_dir()
    size = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
    assert size <= 25 * 1024 * 1024
    assert not any(f.suffix in (".bin", ".pt", ".pkl") for f in d.iterdir())
    m = shipped.meta
    assert m.name == "livecopy-student" and m.version and m.data_hash
    assert {"heldout_copy_ppl", "ctr_auc_heldout"} <= set(m.metrics)
    assert m.styles == list(STYLES)


@pytest.fixture(scope="module")
def heldout_contexts() -> list[CopyContext]:
    corpus = build_corpus(CorpusConfig(max_products=300, per_product=1, teacher_share=0.0))
    return [context_from_features(r.features) for r in corpus.heldout if r.lm]


def test_shipped_student_writes_grounded_copy_that_passes_the_filter(
    shipped: LoadedStudent, heldout_contexts: list[CopyContext]
) -> None:
    ctxs = heldout_contexts[:12]
    groups = generate_candidates(shipped.model, shipped.tokenizer, [build_prompt(c) for c in ctxs], k=2, seed=0,
                                 slots_ok=[available(c) for c in ctxs])
    cands = [(c, cand) for c, g in zip(ctxs, groups, strict=True) for cand in g]
    shown = [(cand, *StudentExecutor.render(cand.text, c)) for c, cand in cands]
    passed = [(cand, text) for cand, text, res in shown if res.ok]
    assert len(passed) >= 0.9 * len(cands)
    assert all(SLOT_RE.search(cand.text) for cand, _ in passed)  # it writes slots, not facts
    # the style token the model chose is the style a reader sees in the text
    agree = sum(classify_style(text) == cand.style for cand, text in passed)
    assert agree >= 0.8 * len(passed)


def test_shipped_student_on_a_product_unlike_its_training_catalog(shipped: LoadedStudent) -> None:
    """A category, noun and brand it never saw, no reviews, no attributes: constrained decoding
    never writes a slot the record cannot fill, and the copy passes."""
    ctx = product_context(Product("aq-1", "Fluval Flex 57L Aquarium Kit", "pets/aquarium", "Fluval", 189.99,
                                  noun="aquarium kit"))
    assert not {"reviews", "rating", "discount", "attribute"} & available(ctx)
    ctxs = [ctx.with_persona(user=u) for u in ("new", "returning")] * 4
    groups = generate_candidates(shipped.model, shipped.tokenizer, [build_prompt(c) for c in ctxs], k=4, seed=1,
                                 slots_ok=[available(c) for c in ctxs])
    cands = [cand for g in groups for cand in g]
    assert not any(set(slots_in(c.text)) - available(ctx) for c in cands)
    ok = [StudentExecutor.render(c.text, ctx) for c in cands]
    assert sum(res.ok for _, res in ok) >= 0.9 * len(cands)
    assert len({text for text, res in ok if res.ok}) >= 8


def test_shipped_student_is_the_grounded_fine_tune(shipped: LoadedStudent) -> None:
    m = shipped.meta
    assert m.version == "2.2.0" and m.parent_version == "2.1.0"
    assert m.tokenizer["slots"] is True and m.training["kind"] == "student-finetune"
    assert all(slot_token(s) in shipped.tokenizer.get_vocab() for s in SLOTS)


def test_persona_moves_the_style_distribution(shipped: LoadedStudent, heldout_contexts: list[CopyContext]) -> None:
    ctx = next(c for c in heldout_contexts if c.discount_pct and c.reviews >= 20)
    cheap = ctx.with_persona(user="returning", price_sensitivity="high", engagement="lapsed")
    new = ctx.with_persona(user="new", price_sensitivity="unknown", engagement="cold")
    d_cheap, d_new = style_distribution(shipped.model, shipped.tokenizer, [build_prompt(cheap), build_prompt(new)])
    assert d_cheap["discount"] > d_new["discount"]
    assert d_new["social_proof"] > d_cheap["social_proof"]
