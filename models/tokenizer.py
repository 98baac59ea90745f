"""Tokenizers: the teacher's byte-level BPE, and the student's *trimmed* copy of it.

The student shares the teacher's tokenizer so that logit distillation and a per-token
perplexity comparison are possible, but SmolLM2's 49,152-token embedding matrix would dwarf a
few-million-parameter trunk. :func:`trim_tokenizer` keeps only the tokens the corpus (and the
catalog) uses, closed under BPE merges, plus the 256 byte symbols and the special tokens:

* merges are a subset of the teacher's, in the same order, so any word whose teacher
  tokenization uses only kept tokens is tokenized *identically* (every merge BPE applied to it is
  kept, and the highest-priority applicable merge at each step is unchanged);
* any other text still round-trips losslessly, in smaller pieces (the byte symbols are kept);
* ids are renumbered densely in the teacher's order; ``vocab_map`` maps student id -> teacher id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from core.styles import STYLE_TOKENS
from models.sequences import EOS_TOKEN

UNK_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"


def wrap_fast(tok: Tokenizer) -> Any:
    """A transformers fast tokenizer around a ``tokenizers.Tokenizer`` with livecopy's specials
    (EOS = pad = ``<|im_end|>``)."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        unk_token=UNK_TOKEN if tok.token_to_id(UNK_TOKEN) is not None else None,
        bos_token=BOS_TOKEN if tok.token_to_id(BOS_TOKEN) is not None else None,
        additional_special_tokens=list(STYLE_TOKENS),
        clean_up_tokenization_spaces=False,
    )
    fast.padding_side = "right"
    return fast


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a model directory (``tokenizer.json``)."""
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def _merge_pair(m: Any) -> tuple[str, str]:
    if isinstance(m, str):
        a, b = m.split(" ", 1)
        return a, b
    return str(m[0]), str(m[1])


def trim_tokenizer(
    teacher: Tokenizer, texts: Iterable[str], extra_specials: Sequence[str] = ()
) -> tuple[Tokenizer, list[int]]:
    """A smaller BPE tokenizer that tokenizes ``texts`` exactly like ``teacher``.

    Returns ``(tokenizer, vocab_map)`` with ``vocab_map[student_id] == teacher_id``.
    """
    spec = json.loads(teacher.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError("only BPE teacher tokenizers can be trimmed")
    vocab: dict[str, int] = model["vocab"]
    merges = [_merge_pair(m) for m in model["merges"]]
    made_by: dict[str, tuple[str, str]] = {}
    for a, b in merges:
        made_by.setdefault(a + b, (a, b))
    added = {t["content"]: t for t in spec.get("added_tokens", [])}

    used: set[str] = set()
    batch: list[str] = []

    def flush() -> None:
        for enc in teacher.encode_batch(batch, add_special_tokens=False):
            used.update(enc.tokens)
        batch.clear()

    for t in texts:
        batch.append(t)
        if len(batch) >= 4096:
            flush()
    if batch:
        flush()

    keep: set[str] = set()
    stack = [t for t in used if t in vocab]
    while stack:
        t = stack.pop()
        if t in keep:
            continue
        keep.add(t)
        if t in made_by:
            stack.extend(made_by[t])
    keep.update(c for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab)
    specials = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, *STYLE_TOKENS, *extra_specials]
    for s in specials:
        if s in vocab or s in added:
            keep.add(s)

    teacher_id = {**vocab, **{k: v["id"] for k, v in added.items()}}
    ordered = sorted(keep, key=lambda t: teacher_id[t])
    new_vocab = {t: i for i, t in enumerate(ordered)}
    new_merges = [[a, b] for a, b in merges if a in new_vocab and b in new_vocab and (a + b) in new_vocab]
    model = dict(model)
    model["vocab"] = {t: i for t, i in new_vocab.items()}
    model["merges"] = new_merges
    if model.get("unk_token") not in new_vocab:
        model["unk_token"] = None
    spec["model"] = model
    new_added = []
    for content, entry in added.items():
        if content in new_vocab:
            e = dict(entry)
            e["id"] = new_vocab[content]
            new_added.append(e)
    spec["added_tokens"] = sorted(new_added, key=lambda e: e["id"])
    tok = Tokenizer.from_str(json.dumps(spec))
    return tok, [teacher_id[t] for t in ordered]


def vocab_map_from(student_tok: Any, teacher_tok: Any) -> list[int]:
    """student id -> teacher id by token string (the tokenizers share token strings)."""
    n = len(student_tok)
    toks = student_tok.convert_ids_to_tokens(list(range(n)))
    ids = teacher_tok.convert_tokens_to_ids(toks)
    missing = [t for t, i in zip(toks, ids, strict=True) if i is None]
    if missing:
        raise ValueError(f"{len(missing)} student tokens are not in the teacher vocabulary, e.g. {missing[:5]}")
    return [int(i) for i in ids]
