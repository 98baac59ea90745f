"""The decode's products (models/linears.py): int8 packed weights beside fp32, and the per-model cache."""

from __future__ import annotations

import pytest
import torch

from models.cascade import CascadeStepper
from models.continuous import ContinuousDecoder
from models.linears import int8_available, linears
from models.paths import shipped_student_dir
from models.sequences import encode_text, left_pad, positions_from_mask, special_ids
from models.student import load_student

pytestmark = pytest.mark.skipif(not int8_available(), reason="torch without fbgemm: int8 falls back to fp32")

PROMPTS = [
    "Shopper: likes running, budget. Product: Trail Runner 2 by Stride, shoes, $89.99. Copy:",
    "Shopper: new visitor. Product: Organic Coffee Beans 1kg by Lavazza, coffee, $15.29. Copy:",
]


@pytest.fixture(scope="module")
def shipped() -> tuple[torch.nn.Module, object]:
    st = load_student(shipped_student_dir())
    return st.model.eval(), st.tokenizer


def _stepper(model: torch.nn.Module, tok: object, weights: str) -> CascadeStepper:
    sid = special_ids(tok)
    ids, mask = left_pad(encode_text(tok, PROMPTS), sid.pad)
    return CascadeStepper(model, ids, mask, positions_from_mask(mask), 2, 8, weights)


def test_int8_decode_stays_close_to_fp32_on_the_shipped_student(shipped: tuple[torch.nn.Module, object]) -> None:
    """Same greedy tokens step after step, next-token distributions within a small KL."""
    model, tok = shipped
    with torch.no_grad():
        f32, i8 = _stepper(model, tok, "fp32"), _stepper(model, tok, "int8")
        assert f32.lin.kind == "fp32" and i8.lin.kind == "int8"
        agree = total = 0
        kls = []
        for _ in range(8):
            lp32, lp8 = torch.log_softmax(f32.logits, -1), torch.log_softmax(i8.logits, -1)
            kls.append(float((lp32.exp() * (lp32 - lp8)).sum(-1).max()))
            nxt = f32.logits.argmax(-1)
            agree += int((i8.logits.argmax(-1) == nxt).sum())
            total += nxt.numel()
            f32.step(nxt, want_hidden=True)
            i8.step(nxt, want_hidden=True)  # teacher-forced on the fp32 tokens
        assert max(kls) < 0.05, kls
        assert agree / total >= 0.9
        assert f32.hidden is not None and i8.hidden is not None
        cos = torch.nn.functional.cosine_similarity(f32.hidden, i8.hidden, dim=-1)
        assert float(cos.min()) > 0.99  # what the CTR head reads at EOS
        ctr32, ctr8 = (torch.sigmoid(model.ctr_from_hidden(h)[0].float()) for h in (f32.hidden, i8.hidden))
        assert float((ctr32 - ctr8).abs().max()) < 0.01


def test_int8_is_not_fp32(shipped: tuple[torch.nn.Module, object]) -> None:
    """The int8 products really are quantized (not fp32 under another name)."""
    model, tok = shipped
    with torch.no_grad():
        a, b = _stepper(model, tok, "fp32"), _stepper(model, tok, "int8")
    diff = (a.logits - b.logits).abs().max()
    assert 1e-4 < float(diff) < 1.0


def test_packed_weights_follow_in_place_updates_and_are_built_once() -> None:
    """Packed once per weights state: the same object while nothing changed, a new one after an
    in-place update (an online fine-tune of the served model must not decode with stale weights)."""
    st = load_student(shipped_student_dir())
    trunk, lm = st.model.transformer, st.model.transformer.wte.weight
    first = linears(trunk, lm, "int8")
    assert linears(trunk, lm, "int8") is first
    assert linears(trunk, lm, "fp32") is not first
    x = torch.randn(3, trunk.config.n_embd)
    before = first.blocks[0][0](x)
    with torch.no_grad():
        trunk.h[0].attn.c_attn.weight.mul_(2.0)
    again = linears(trunk, lm, "int8")
    assert again is not first
    assert not torch.allclose(again.blocks[0][0](x), before, atol=1e-3)


def test_continuous_decoder_int8_finishes_every_prompt(shipped: tuple[torch.nn.Module, object]) -> None:
    model, tok = shipped
    sid = special_ids(tok)
    rows = encode_text(tok, PROMPTS)
    vocab = int(model.config.vocab_size)
    dec = ContinuousDecoder(model, eos_id=sid.eos, pad_id=sid.pad, k=3, max_new_tokens=30, seed=1,
                            want_hidden=True, max_prompts=2, weights="int8")
    first = torch.full((2, vocab), float("-inf"))
    first[:, sid.style_id_list] = 0.0
    dec.admit([0, 1], rows, first, torch.zeros((2, vocab), dtype=torch.bool))
    done = {}
    for _ in range(40):
        for g in dec.step():
            done[g.gid] = g
        if len(done) == 2:
            break
    assert sorted(done) == [0, 1]
    for g in done.values():
        assert g.eos_hidden is not None and g.eos_hidden.shape[0] == 3
        assert all(sid.style_of_id(t[0]) is not None for t in g.tokens)
