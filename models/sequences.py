"""Sequence format and batching shared by training, evaluation, serving and the online trainer.

A training sequence is ``prompt_ids + [<s:STYLE>] + copy_ids + [EOS]`` where the prompt (see
:func:`models.text.context.build_prompt`) and the copy are tokenized separately and concatenated, so
the same ids come out at training and at serving time. Labels are ``-100`` on the prompt; the
style token, the copy and EOS are learned. The CTR head reads the hidden state at EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.styles import STYLES, classify_style, style_token

IGNORE_INDEX = -100
EOS_TOKEN = "<|im_end|>"


@dataclass(frozen=True)
class SpecialIds:
    eos: int
    pad: int
    styles: dict[str, int]  # style -> token id

    @property
    def style_id_list(self) -> list[int]:
        return [self.styles[s] for s in STYLES]

    def style_of_id(self, token_id: int) -> str | None:
        for s, i in self.styles.items():
            if i == token_id:
                return s
        return None


def special_ids(tokenizer: Any) -> SpecialIds:
    """EOS, pad and style-token ids of a livecopy tokenizer (student or prepared teacher)."""
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    unk = getattr(tokenizer, "unk_token_id", None)
    if eos is None or (unk is not None and eos == unk and tokenizer.unk_token != EOS_TOKEN):
        raise ValueError(f"tokenizer has no {EOS_TOKEN} token; prepare it with models.teacher.add_livecopy_tokens")
    styles: dict[str, int] = {}
    for s in STYLES:
        tid = tokenizer.convert_tokens_to_ids(style_token(s))
        if tid is None or (unk is not None and tid == unk):
            raise ValueError(f"tokenizer lacks the style token {style_token(s)}")
        styles[s] = int(tid)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return SpecialIds(eos=int(eos), pad=int(pad), styles=styles)


def encode_text(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added."""
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    copies: Sequence[str],
    max_len: int = 160,
    styles: Sequence[str | None] | None = None,
    lm_mask: Sequence[bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded batch of ``prompt + <s:style> + copy + EOS``.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on the prompt and padding,
    and on every position of rows whose ``lm_mask`` is False: CTR-only rows), ``eos_index``
    (position of EOS per row, where the CTR head reads) and ``style_index`` (position whose
    logits predict the style token). ``styles`` default to :func:`classify_style` of each copy.
    Over-long rows lose copy tokens from the end (EOS is kept).
    """
    if len(prompts) != len(copies):
        raise ValueError("prompts and copies differ in length")
    sid = special_ids(tokenizer)
    st: list[str] = []
    for i in range(len(copies)):
        given = styles[i] if styles is not None else None
        st.append(given if given is not None else classify_style(copies[i]))
    return assemble(
        encode_text(tokenizer, prompts), encode_text(tokenizer, copies), [sid.styles[s] for s in st], sid,
        max_len=max_len, lm_mask=lm_mask,
    )


def assemble(
    prompt_ids: Sequence[Sequence[int]],
    copy_ids: Sequence[Sequence[int]],
    style_ids: Sequence[int],
    sid: SpecialIds,
    max_len: int = 160,
    lm_mask: Sequence[bool] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`encode_pairs` from already tokenized prompts and copies."""
    rows: list[list[int]] = []
    prompt_lens: list[int] = []
    for p, c, s in zip(prompt_ids, copy_ids, style_ids, strict=True):
        p = list(p[-(max_len - 2) :]) if len(p) > max_len - 2 else list(p)
        room = max_len - len(p) - 2
        c = list(c[: max(room, 0)])
        rows.append([*p, int(s), *c, sid.eos])
        prompt_lens.append(len(p))
    width = max(len(r) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), sid.pad, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    eos_index = torch.zeros(n, dtype=torch.long)
    style_index = torch.zeros(n, dtype=torch.long)
    for i, (r, pl) in enumerate(zip(rows, prompt_lens, strict=True)):
        t = torch.tensor(r, dtype=torch.long)
        input_ids[i, : len(r)] = t
        attention_mask[i, : len(r)] = 1
        if lm_mask is None or lm_mask[i]:
            labels[i, pl : len(r)] = t[pl:]
        eos_index[i] = len(r) - 1
        style_index[i] = max(pl - 1, 0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "eos_index": eos_index,
        "style_index": style_index,
    }


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` of token rows (for batched decoding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
