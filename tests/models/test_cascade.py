"""The shared-prefix decode step (models/cascade.py) against the model's own forward."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from models import cascade
from models.cascade import CascadeStepper
from models.generate import _CachedStepper, generate_candidates
from models.sequences import left_pad, positions_from_mask
from tests.models.conftest import make_student

VOCAB, PAD = 60, 0


def _gpt2_lm(**overrides: Any) -> GPT2LMHeadModel:
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=3, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD, initializer_range=0.2, **overrides)
    return GPT2LMHeadModel(cfg).eval()


def _models() -> dict[str, Any]:
    return {"student": make_student(VOCAB, PAD, seed=3), "gpt2": _gpt2_lm()}


def _prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (7, 3, 5)]  # left padding
    ids, mask = left_pad(rows, PAD)
    return ids, mask, positions_from_mask(mask)


@pytest.mark.parametrize("name", ["student", "gpt2"])
def test_steps_match_the_models_own_forward(name: str) -> None:
    """Prefill, steps past the reserved length (buffers grow), then rows dropped: a whole prompt
    and one row of another. Logits and final hidden states agree with the generic step."""
    model = _models()[name]
    ids, mask, pos = _prompts()
    k = 3
    with torch.no_grad():
        ref = _CachedStepper(model, ids, mask, pos, k, 2)
        cas = CascadeStepper(model, ids, mask, pos, k, 2)
        assert cas.logits.shape == (9, VOCAB)
        torch.testing.assert_close(cas.logits, ref.logits, atol=1e-5, rtol=1e-5)
        g = torch.Generator().manual_seed(9)
        for step in range(7):
            if step == 3:  # rows 3..5 are prompt 1's: all gone; row 7 of prompt 2 gone
                keep = torch.tensor([0, 1, 2, 6, 8])
                ref.select(keep)
                cas.select(keep)
                assert cas.n_prompts == 2
                torch.testing.assert_close(cas.logits, ref.logits, atol=1e-5, rtol=1e-5)
            toks = torch.randint(1, VOCAB, (ref.logits.shape[0],), generator=g)
            a = ref.step(toks, want_hidden=True)
            b = cas.step(toks, want_hidden=True)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=f"step {step}")
            if name == "student":  # the generic step returns the hidden state for models with a CTR head
                assert ref.hidden is not None and cas.hidden is not None
                torch.testing.assert_close(cas.hidden, ref.hidden, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_runs_and_stays_close() -> None:
    """CUDA decodes under bf16 autocast; the same mixed-dtype path, here on the CPU."""
    model = make_student(VOCAB, PAD, seed=3)
    ids, mask, pos = _prompts()
    toks = torch.randint(1, VOCAB, (6,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = CascadeStepper(model, ids, mask, pos, 2, 4)
        full.step(toks, want_hidden=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = CascadeStepper(model, ids, mask, pos, 2, 4)
            half.step(toks, want_hidden=True)
            half.select(torch.tensor([0, 3, 4]))
            half.step(toks[:3], want_hidden=True)
    assert half.pk[0].dtype == torch.bfloat16
    assert half.logits.shape == (3, VOCAB) and torch.isfinite(half.logits).all()
    assert half.hidden is not None and half.hidden.shape[0] == 3
    full.select(torch.tensor([0, 3, 4]))
    full.step(toks[:3], want_hidden=True)
    assert (half.logits.float() - full.logits).abs().max() < 0.1 * full.logits.abs().max()


def test_supports_only_the_gpt2_trunks_it_reproduces() -> None:
    assert cascade.supports(make_student(VOCAB, PAD))
    assert cascade.supports(_gpt2_lm())
    assert not cascade.supports(_gpt2_lm(scale_attn_by_inverse_layer_idx=True))
    assert not cascade.supports(_gpt2_lm(reorder_and_upcast_attn=True))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    assert not cascade.supports(llama)
    with pytest.raises(TypeError):
        ids, mask, pos = _prompts()
        CascadeStepper(llama, ids, mask, pos, 1, 4)


def test_candidates_are_those_of_the_generic_step(tiny_student, toy_tokenizer, small_corpus,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampled candidates (tokens, log-probs, CTR at EOS) do not depend on which step ran."""
    prompts = [r.prompt for r in small_corpus.heldout[:4]]
    fast = generate_candidates(tiny_student, toy_tokenizer, prompts, k=3, max_new_tokens=10, seed=4)
    monkeypatch.setattr(cascade, "supports", lambda model: False)
    slow = generate_candidates(tiny_student, toy_tokenizer, prompts, k=3, max_new_tokens=10, seed=4)
    for gf, gs in zip(fast, slow, strict=True):
        for a, b in zip(gf, gs, strict=True):
            assert a.token_ids == b.token_ids
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert a.ctr == pytest.approx(b.ctr, abs=1e-5)


def test_gelu_tanh_is_gpt2s_gelu_at_every_row_count() -> None:
    for rows in (4, 32, 128):
        x = torch.randn(rows, 64) * 3
        torch.testing.assert_close(cascade.gelu_tanh(x.clone()), torch.nn.functional.gelu(x, approximate="tanh"),
                                   atol=2e-6, rtol=1e-5)
