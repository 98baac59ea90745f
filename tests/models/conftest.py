"""Fixtures of the models tests: a small deterministic corpus, a toy byte-level BPE tokenizer
trained on it (with the livecopy special tokens), and tiny random models. No network, no GGUF."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from core.styles import STYLE_TOKENS
from models.corpus import Corpus, CorpusConfig, build_corpus
from models.sequences import EOS_TOKEN
from models.student import StudentConfig, StudentModel
from models.tokenizer import BOS_TOKEN, UNK_TOKEN, wrap_fast


@pytest.fixture(scope="session")
def small_corpus() -> Corpus:
    return build_corpus(CorpusConfig(max_products=80, per_product=6))


def train_toy_bpe(texts: list[str], vocab_size: int = 1200) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in STYLE_TOKENS])
    return tok


@pytest.fixture(scope="session")
def toy_raw_tokenizer(small_corpus: Corpus) -> Tokenizer:
    texts = [r.prompt for r in small_corpus.train] + [r.copy for r in small_corpus.train]
    return train_toy_bpe(texts)


@pytest.fixture(scope="session")
def toy_tokenizer(toy_raw_tokenizer: Tokenizer):
    return wrap_fast(toy_raw_tokenizer)


def make_student(vocab_size: int, eos: int, seed: int = 0) -> StudentModel:
    torch.manual_seed(seed)
    cfg = StudentConfig.small(vocab_size, n_embd=32, n_layer=2, n_head=2, ctr_hidden=8, dropout=0.0,
                              eos_token_id=eos, pad_token_id=eos, n_positions=256)
    return StudentModel(cfg).eval()


@pytest.fixture(scope="session")
def tiny_student(toy_tokenizer) -> StudentModel:
    return make_student(len(toy_tokenizer), toy_tokenizer.convert_tokens_to_ids(EOS_TOKEN))


@pytest.fixture(scope="session")
def toy_teacher_dir(tmp_path_factory: pytest.TempPathFactory, toy_raw_tokenizer: Tokenizer) -> Iterator[Path]:
    """A tiny random Llama saved like a fine-tuned teacher (safetensors + tokenizer.json)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.student import ModelMeta
    from models.teacher import save_teacher

    torch.manual_seed(0)
    n = toy_raw_tokenizer.get_vocab_size(with_added_tokens=True)
    eos = toy_raw_tokenizer.token_to_id(EOS_TOKEN)
    cfg = LlamaConfig(vocab_size=n, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=eos, pad_token_id=eos, bos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("teacher")
    save_teacher(model, toy_raw_tokenizer, out, ModelMeta(name="toy-teacher", version="t1"))
    yield out
