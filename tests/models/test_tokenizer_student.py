from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from core.styles import STYLE_TOKENS
from models.corpus import Corpus
from models.sequences import EOS_TOKEN, encode_pairs, encode_text, special_ids
from models.student import (
    META_FILE,
    LoadedStudent,
    ModelMeta,
    StudentModel,
    load_student,
    save_student,
)
from models.tokenizer import load_tokenizer, trim_tokenizer, vocab_map_from, wrap_fast


def test_trimmed_tokenizer_tokenizes_corpus_like_the_teacher(
    toy_raw_tokenizer: Tokenizer, small_corpus: Corpus
) -> None:
    texts = [r.copy for r in small_corpus.train[:150]] + [r.prompt for r in small_corpus.train[:150]]
    trimmed, vmap = trim_tokenizer(toy_raw_tokenizer, texts)
    assert trimmed.get_vocab_size() < toy_raw_tokenizer.get_vocab_size()
    for t in texts:
        mine = [vmap[i] for i in trimmed.encode(t, add_special_tokens=False).ids]
        assert mine == toy_raw_tokenizer.encode(t, add_special_tokens=False).ids
    # unseen text still round-trips (smaller pieces), including non-ASCII
    for t in ("Zyxwvut quixotic gadget, crème brûlée 🍮 — 12.5% off!", "\u00e9t\u00e9 \u2603"):
        ids = trimmed.encode(t, add_special_tokens=False).ids
        assert trimmed.decode(ids) == t
    for s in (*STYLE_TOKENS, EOS_TOKEN):
        assert trimmed.token_to_id(s) is not None


def test_vocab_map_by_token_string(toy_raw_tokenizer: Tokenizer, small_corpus: Corpus) -> None:
    trimmed, vmap = trim_tokenizer(toy_raw_tokenizer, [r.copy for r in small_corpus.train[:50]])
    assert vocab_map_from(wrap_fast(trimmed), wrap_fast(toy_raw_tokenizer)) == vmap


def test_encode_pairs_masks_the_prompt(toy_tokenizer) -> None:
    b = encode_pairs(toy_tokenizer, ["p one\n", "a longer prompt here\n"], ["Copy A.", "B"], styles=["eco", None])
    sid = special_ids(toy_tokenizer)
    p0 = len(encode_text(toy_tokenizer, ["p one\n"])[0])
    assert (b["labels"][0, :p0] == -100).all()
    assert b["input_ids"][0, p0].item() == sid.styles["eco"] == b["labels"][0, p0].item()
    assert b["input_ids"][1, b["style_index"][1] + 1].item() == sid.styles["practical"]  # classified
    for i in range(2):
        assert b["input_ids"][i, b["eos_index"][i]].item() == sid.eos
        assert b["attention_mask"][i].sum().item() == b["eos_index"][i].item() + 1
    lm_off = encode_pairs(toy_tokenizer, ["p\n"], ["x y z"], lm_mask=[False])
    assert (lm_off["labels"] == -100).all()


def test_save_load_round_trip(tmp_path: Path, tiny_student: StudentModel, toy_tokenizer) -> None:
    meta = ModelMeta(name="t", version="9.9.9", parent_version="9.9.8", data_hash="abc",
                     metrics={"heldout_copy_ppl": 3.2}, tokenizer={"type": "toy"})
    out = save_student(tiny_student, toy_tokenizer, tmp_path / "m", meta, storage_dtype=None)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", META_FILE} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert json.loads((out / "config.json").read_text())["model_type"] == "livecopy_student"
    ls = load_student(out)
    assert isinstance(ls, LoadedStudent) and ls.meta.version == "9.9.9" and ls.meta.parent_version == "9.9.8"
    assert ls.meta.metrics == {"heldout_copy_ppl": 3.2} and ls.meta.data_hash == "abc"
    b = encode_pairs(toy_tokenizer, ["hello\n"], ["A copy about a lamp."])
    with torch.no_grad():
        a = tiny_student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        c = ls.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        assert torch.equal(a, c)
        # the CTR head's small matmul may take another kernel on the loaded (mmapped) weights
        torch.testing.assert_close(tiny_student.ctr_logits(b["input_ids"], b["attention_mask"]),
                                   ls.model.ctr_logits(b["input_ids"], b["attention_mask"]), rtol=1e-5, atol=1e-7)
    assert load_tokenizer(out)("a lamp").input_ids == toy_tokenizer("a lamp").input_ids
    # fp16 storage (the shipped default) halves the file and stays close
    out16 = save_student(ls, None, tmp_path / "m16", storage_dtype=torch.float16)
    assert (out16 / "model.safetensors").stat().st_size < 0.6 * (out / "model.safetensors").stat().st_size
    ls16 = load_student(out16)
    assert next(ls16.model.parameters()).dtype == torch.float32
    with torch.no_grad():
        d = ls16.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.allclose(a, d, atol=2e-2)


def test_kv_cache_and_left_padding_match_the_full_forward(tiny_student: StudentModel) -> None:
    torch.manual_seed(3)
    ids = torch.randint(10, 200, (1, 12))
    with torch.no_grad():
        full = tiny_student(input_ids=ids).logits
        out = tiny_student(input_ids=ids[:, :8], use_cache=True)
        step = tiny_student(input_ids=ids[:, 8:9], past_key_values=out.past_key_values, use_cache=True)
        assert torch.allclose(step.logits[:, -1], full[:, 8], atol=1e-5)
        # the same row left-padded by 3 with position ids starting at 0 on the first real token
        pad = torch.cat([torch.zeros((1, 3), dtype=torch.long), ids], dim=1)
        mask = torch.cat([torch.zeros((1, 3), dtype=torch.long), torch.ones((1, 12), dtype=torch.long)], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        padded = tiny_student(input_ids=pad, attention_mask=mask, position_ids=pos).logits
    assert torch.allclose(padded[:, 3:], full, atol=1e-5)


def test_ctr_features_feed_the_ctr_logit(tiny_student: StudentModel, toy_tokenizer) -> None:
    b = encode_pairs(toy_tokenizer, ["p\n", "q q\n"], ["A lamp.", "A longer copy about a lamp."])
    with torch.no_grad():
        f = tiny_student.ctr_features(b["input_ids"], b["attention_mask"])
        logit = tiny_student.ctr_logits(b["input_ids"], b["attention_mask"])
        assert f.shape == (2, tiny_student.config.ctr_hidden)
        assert torch.allclose(tiny_student.ctr_head.out(f).squeeze(-1), logit, atol=1e-6)
        # default index is the last real token (EOS) for right padding
        at_eos = tiny_student.ctr_logits(b["input_ids"], b["attention_mask"], index=b["eos_index"])
    assert torch.allclose(at_eos, logit)


def test_parameter_split(tiny_student: StudentModel) -> None:
    split = tiny_student.num_parameters_split()
    assert split["total"] == sum(p.numel() for p in tiny_student.parameters())
    assert split["trunk"] > 0 and split["ctr_head"] > 0
    assert not any("lm_head" in n for n, _ in tiny_student.named_parameters())  # tied to wte


def test_missing_directory_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_student(tmp_path)
