"""The committed default student: present, small, loadable, and it writes usable copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.styles import STYLES, classify_style
from models.corpus import CorpusConfig, build_corpus
from models.generate import generate_candidates, score_ctr, style_distribution
from models.paths import shipped_student_dir
from models.student import LoadedStudent, load_student
from models.text.context import CopyContext, build_prompt, context_from_features
from models.text.filter import check_copy


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


def test_shipped_student_writes_on_product_copy_that_passes_the_filter(
    shipped: LoadedStudent, heldout_contexts: list[CopyContext]
) -> None:
    ctxs = heldout_contexts[:12]
    groups = generate_candidates(shipped.model, shipped.tokenizer, [build_prompt(c) for c in ctxs], k=2, seed=0)
    cands = [(c, cand) for c, g in zip(ctxs, groups, strict=True) for cand in g]
    passed = [cand for c, cand in cands if check_copy(cand.text, c).ok]
    assert len(passed) >= 0.75 * len(cands)
    # the style token the model chose is the style a reader sees in the text
    agree = sum(classify_style(cand.text) == cand.style for cand in passed)
    assert agree >= 0.8 * len(passed)


def test_persona_moves_the_style_distribution(shipped: LoadedStudent, heldout_contexts: list[CopyContext]) -> None:
    ctx = next(c for c in heldout_contexts if c.discount_pct and c.reviews >= 20)
    cheap = ctx.with_persona(user="returning", price_sensitivity="high", engagement="lapsed")
    new = ctx.with_persona(user="new", price_sensitivity="unknown", engagement="cold")
    d_cheap, d_new = style_distribution(shipped.model, shipped.tokenizer, [build_prompt(cheap), build_prompt(new)])
    assert d_cheap["discount"] > d_new["discount"]
    assert d_new["social_proof"] > d_cheap["social_proof"]


def test_ctr_head_prefers_on_product_copy(shipped: LoadedStudent, heldout_contexts: list[CopyContext]) -> None:
    """Copy about another product (the corpus's mismatch rows) scores below copy about this one, over
    held-out products on average."""
    ctxs = heldout_contexts[:40]
    prompts, copies = [], []
    for i, a in enumerate(ctxs):
        b = next(c for c in ctxs[i + 1 :] + ctxs[:i] if c.category != a.category)
        prompts += [build_prompt(a)] * 2
        copies += [f"Meet the {a.title}, yours for ${a.price:,.2f}.", f"Meet the {b.title}, yours for ${b.price:,.2f}."]
    p = score_ctr(shipped.model, shipped.tokenizer, prompts, copies)
    own, other = p[0::2], p[1::2]
    assert all(0.0 < x < 1.0 for x in p)
    assert sum(own) > sum(other)
