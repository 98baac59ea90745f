"""Batched, KV-cached sampling of candidate copies, and batched CTR scoring.

``generate_candidates`` prefills each prompt once and decodes all ``len(prompts) * k`` rows
together with a hand-written loop (no ``generate()`` overhead): left padding with per-row
position ids, top-k then top-p on the k survivors (never a sort of the whole vocabulary),
finished rows dropped from the batch as they accumulate. The step itself is
:class:`models.cascade.CascadeStepper` for GPT-2 trunks (the student): the prompt's keys/values
are kept once per prompt and its ``k`` candidates attend to them together; any other causal LM
takes :class:`_CachedStepper` (the model's forward over a KV cache repeated ``k`` times). The first
generated token is constrained to the style tokens, so every candidate carries its style and
``logprob`` includes log p(style | prompt). When the model has a CTR head, EOS is fed through the
trunk once more per row and the CTR probability and features at EOS come back with each
candidate (no second pass needed for scoring).

Works for the student and for any HF causal LM whose tokenizer has the livecopy special tokens
(the fine-tuned teacher). fp32 on CPU; bf16 autocast on CUDA. Deterministic under ``seed`` on a
given device.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from core.styles import STYLES, classify_style
from models import cascade
from models.cascade import CascadeStepper
from models.sequences import (
    SpecialIds,
    encode_pairs,
    encode_text,
    left_pad,
    positions_from_mask,
    special_ids,
)


@dataclass
class Candidate:
    """One sampled copy.

    ``logprob``: model log-likelihood of the generated tokens (style token, copy, EOS) under
    the constrained model distribution at temperature 1. ``sample_logprob``: log-probability of
    having sampled exactly this sequence with the sampling settings used (the propensity of the
    proposal). ``ctr`` / ``ctr_features``: the CTR head at EOS (None for models without one).
    """

    text: str
    style: str | None
    logprob: float
    token_ids: list[int]
    sample_logprob: float = 0.0
    finished: bool = True
    ctr: float | None = None
    ctr_features: np.ndarray | None = field(default=None, repr=False)
    hidden: np.ndarray | None = field(default=None, repr=False)  # the trunk's final hidden state at EOS


@dataclass
class DecodeOutput:
    tokens: list[list[int]]  # generated ids per row, EOS/stop excluded
    logprob: list[float]
    sample_logprob: list[float]
    finished: list[bool]
    eos_hidden: torch.Tensor | None  # (N, d) final hidden state at EOS, when requested


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _has_ctr(model: torch.nn.Module) -> bool:
    return hasattr(model, "ctr_from_hidden")


def _forward(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, want_hidden: bool
) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
    """Logits of the last position, the cache, and (student only) the last hidden state."""
    if _has_ctr(model):
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
            logits_to_keep=1, return_hidden=want_hidden,
        )
        hidden = out.hidden_states[:, -1] if want_hidden else None
        return out.logits[:, -1], out.past_key_values, hidden
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1], out.past_key_values, None


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer that reserves room for ``extra`` more positions at the prefill and then
    writes each step in place. ``DynamicLayer`` concatenates the whole cache with the new
    position at every step of every layer: at 128 rows x ~100 positions on a CPU that copy was
    ~70% of the decode time. Keys/values handed to attention are views of the buffer."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.extra = extra
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self._k is None or self._v is None or self.length + n > self._k.shape[-2]:
            self._grow(key_states, value_states, n)
        assert self._k is not None and self._v is not None
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, n: int) -> None:
        b, h, _, dk = key_states.shape
        cap = self.length + n + self.extra
        k = key_states.new_empty((b, h, cap, dk))
        v = value_states.new_empty((b, h, cap, value_states.shape[-1]))
        if self._k is not None and self._v is not None and self.length:
            k[:, :, : self.length] = self._k[:, :, : self.length]
            v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v

    def _set_buffers(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self._k, self._v = k, v
        self.keys, self.values = k[:, :, : self.length], v[:, :, : self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is not None and self._v is not None:
            self._set_buffers(self._k.repeat_interleave(repeats, dim=0), self._v.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None and self._v is not None:
            self._set_buffers(self._k[indices], self._v[indices])


def preallocated_cache(extra: int) -> DynamicCache:
    """A ``DynamicCache`` whose layers are :class:`PreallocatedLayer` (``extra`` spare positions)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = functools.partial(PreallocatedLayer, extra)  # type: ignore[assignment]
    return cache


class _CachedStepper:
    """The generic decode step: the model's own forward over a :func:`preallocated_cache`, the
    prompt's cache repeated ``k`` times (any HF causal LM). Same interface as
    :class:`models.cascade.CascadeStepper`."""

    def __init__(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, k: int,
                 max_new: int) -> None:
        self.model = model
        logits, self.cache, _ = _forward(model, ids, mask, pos, preallocated_cache(max_new), False)
        self.mask, self.pos = mask, pos[:, -1]
        if k > 1:
            logits = logits.repeat_interleave(k, 0)
            self.cache.batch_repeat_interleave(k)
            self.mask, self.pos = mask.repeat_interleave(k, 0), self.pos.repeat_interleave(k, 0)
        self.logits: torch.Tensor = logits
        self.hidden: torch.Tensor | None = None

    def step(self, tokens: torch.Tensor, want_hidden: bool) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        self.pos = self.pos + 1
        self.logits, self.cache, self.hidden = _forward(
            self.model, tokens[:, None], self.mask, self.pos[:, None], self.cache, want_hidden)
        return self.logits

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.mask, self.pos, self.logits = self.mask[keep], self.pos[keep], self.logits[keep]


def sampling_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                          nucleus_first: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` (N, V), the distribution a token is sampled from: (ids (N, m), their
    probabilities (N, m), descending; zeros past a row's nucleus), top-k after temperature, then
    top-p on the survivors (``temperature <= 0``: the argmax, probability 1). ``nucleus_first``: look
    for the nucleus among the top that many first (:func:`_nucleus_first`; a copy's nucleus is a few
    tokens, and a top-8 is 4x faster than a top-50 on a CPU: docs/generation.md); 0: off."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True), torch.ones((logits.shape[0], 1), device=logits.device)
    scaled = logits / temperature
    k = top_k if top_k > 0 and top_k < scaled.shape[-1] else scaled.shape[-1]  # TorchScript: no chained <
    if top_p < 1.0 and nucleus_first > 0 and k > nucleus_first:
        return _nucleus_first(scaled, k, top_p, nucleus_first)
    return _top_k_top_p(scaled, k, top_p)



def _top_k_top_p(scaled: torch.Tensor, k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    vals, idx = scaled.topk(k, dim=-1)  # sorted, descending
    probs = torch.softmax(vals, dim=-1)
    if top_p < 1.0:
        cum = probs.cumsum(-1)
        probs = probs * ((cum - probs) < top_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return idx, probs


def _nucleus_first(scaled: torch.Tensor, k: int, top_p: float, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_top_k_top_p` for rows whose nucleus provably lies in their top ``m`` (8), the others through it.

    A top-k token ``i`` is in the nucleus when the mass before it is below ``top_p * Z_k`` (``Z_k``:
    the top ``k``'s mass). Unknown ``Z_k`` lies between the top ``m``'s mass and the whole row's: a row
    whose top ``m`` hold ``top_p`` of the row, and whose tokens each fall in or out for both bounds, has
    the nucleus (and, renormalised, the probabilities) the top-``k`` path gives. Widths differ: the
    other rows come back padded with zero-probability entries to ``k`` columns."""
    vals, idx = scaled.topk(m, dim=-1)
    p = torch.exp(vals - torch.logsumexp(scaled, -1, keepdim=True))  # of the whole row's mass
    before = p.cumsum(-1) - p
    low = p.sum(-1, keepdim=True)  # Z_k's lower bound (the upper: 1)
    keep = before < top_p * low
    sure = (low.squeeze(1) >= top_p) & (keep | (before >= top_p)).all(-1)
    probs = p * keep
    probs = probs / probs.sum(-1, keepdim=True)
    if bool(sure.all()):
        return idx, probs
    rest = (~sure).nonzero().squeeze(1)
    idx_k, probs_k = _top_k_top_p(scaled[rest], k, top_p)
    out_idx = torch.zeros((scaled.shape[0], k), dtype=idx.dtype, device=idx.device)
    out_p = torch.zeros((scaled.shape[0], k), dtype=probs.dtype, device=probs.device)
    out_idx[:, :m], out_p[:, :m] = idx, probs
    out_idx[rest], out_p[rest] = idx_k, probs_k
    return out_idx, out_p


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, model logprob at T=1, sampling logprob) per row from masked logits (N, V)."""
    logp = torch.log_softmax(logits, dim=-1)
    if temperature <= 0:
        tok = logits.argmax(-1)
        return tok, logp.gather(1, tok[:, None]).squeeze(1), torch.zeros_like(tok, dtype=logp.dtype)
    idx, probs = sampling_distribution(logits, temperature, top_k, top_p)
    choice = torch.multinomial(probs, 1, generator=generator)
    tok = idx.gather(1, choice).squeeze(1)
    slp = probs.gather(1, choice).squeeze(1).clamp_min(1e-30).log()
    return tok, logp.gather(1, tok[:, None]).squeeze(1), slp


@torch.no_grad()
def decode(
    model: Any,
    prompt_rows: Sequence[Sequence[int]],
    *,
    eos_id: int,
    pad_id: int,
    k: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 0.9,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int = 0,
    first_allowed: Sequence[int] | None = None,
    banned: Sequence[int] | None = None,
    stop_mask: torch.Tensor | None = None,
    want_hidden: bool = False,
    compact_fraction: float = 0.25,
    first_bias_rows: torch.Tensor | None = None,
    banned_rows: torch.Tensor | None = None,
    weights: str = "fp32",
) -> DecodeOutput:
    """The decode loop. Rows ``i*k .. i*k+k-1`` of the result belong to prompt ``i``.

    ``first_allowed``: ids the first token must come from (the style tokens); ``banned``: ids
    never sampled after the first token; ``stop_mask``: bool (V,) of ids that end a row like EOS
    (e.g. newline tokens for a chat teacher); ``want_hidden``: feed EOS once more per row and
    return the final hidden state there; ``first_bias_rows``: (len(prompt_rows), V) logits added
    at the first token, per prompt (a shopper's style response); ``banned_rows``: bool
    (len(prompt_rows), V) ids never sampled after the first token, per prompt (the slots a record
    cannot fill); ``weights``: ``int8`` decodes a GPT-2 trunk on the CPU with int8 weights
    (:mod:`models.linears`).
    """
    device = _model_device(model)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    n_prompts = len(prompt_rows)
    n = n_prompts * k
    ids, mask = left_pad(prompt_rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    pos = positions_from_mask(mask)
    with autocast_for(device):
        # room for every new token plus the extra EOS pass of want_hidden
        stepper: CascadeStepper | _CachedStepper
        if cascade.supports(model):
            stepper = CascadeStepper(model, ids, mask, pos, k, max_new_tokens + 1, weights)
        else:
            stepper = _CachedStepper(model, ids, mask, pos, k, max_new_tokens + 1)
    logits = stepper.logits
    vocab = logits.shape[-1]
    first_bias = None
    if first_allowed is not None:
        first_bias = torch.full((vocab,), float("-inf"), device=device)
        first_bias[torch.tensor(list(first_allowed), device=device)] = 0.0
    if first_bias_rows is not None:
        rows_bias = first_bias_rows.to(device=device, dtype=torch.float32).repeat_interleave(k, 0)
        first_bias = rows_bias if first_bias is None else rows_bias + first_bias
    ban_bias = None
    if banned:
        ban_bias = torch.zeros((vocab,), device=device)
        ban_bias[torch.tensor([b for b in banned if b < vocab], device=device)] = float("-inf")
    rows_ban = None
    if banned_rows is not None:
        rows_ban = torch.zeros((n, vocab), device=device)
        rows_ban[banned_rows.to(device)[:, :vocab].repeat_interleave(k, 0)] = float("-inf")
    stop = stop_mask.to(device) if stop_mask is not None else None

    tokens = torch.full((n, max_new_tokens), -1, dtype=torch.long, device=device)
    lp = torch.zeros(n, dtype=torch.float64, device=device)
    slp = torch.zeros(n, dtype=torch.float64, device=device)
    finished_eos = torch.zeros(n, dtype=torch.bool, device=device)
    hidden_out: torch.Tensor | None = None
    active = torch.arange(n, device=device)  # original row of each current row
    done = torch.zeros(n, dtype=torch.bool, device=device)  # per current row

    for step in range(max_new_tokens):
        x = logits.float()
        if step == 0 and first_bias is not None:
            x = x + first_bias
        else:
            if ban_bias is not None:
                x = x + ban_bias
            if rows_ban is not None:
                x = x + rows_ban[active]
        tok, tok_lp, tok_slp = _sample(x, temperature, top_k, top_p, gen)
        live = ~done
        ends = tok == eos_id
        if stop is not None:
            ends = ends | stop[tok]
        ends = ends & live
        lp[active] += torch.where(live, tok_lp.double(), 0.0)
        slp[active] += torch.where(live, tok_slp.double(), 0.0)
        keep_tok = live & ~ends
        rows = active[keep_tok]
        tokens[rows, step] = tok[keep_tok]
        finished_eos[active[ends]] = True
        newly = ends.clone()
        if step == max_new_tokens - 1:
            newly = newly | (live & ~ends)  # truncated rows: EOS is forced for the CTR read
        done = done | newly
        if bool(done.all()) and not (want_hidden and bool(newly.any())):
            break
        feed = torch.where(done, torch.full_like(tok, eos_id), tok)
        with autocast_for(device):
            logits = stepper.step(feed, want_hidden)
        hidden = stepper.hidden
        if want_hidden and hidden is not None:
            if hidden_out is None:
                hidden_out = torch.zeros((n, hidden.shape[-1]), dtype=torch.float32, device=device)
            hidden_out[active[newly]] = hidden[newly].float()
        if bool(done.all()):
            break
        n_done = int(done.sum())
        if n_done and n_done >= compact_fraction * done.shape[0]:
            keep = (~done).nonzero().squeeze(1)
            stepper.select(keep)
            logits = stepper.logits
            active, done = active[keep], done[keep]

    out_tokens = [[int(t) for t in row if t >= 0] for row in tokens.tolist()]
    return DecodeOutput(
        tokens=out_tokens, logprob=lp.tolist(), sample_logprob=slp.tolist(),
        finished=finished_eos.tolist(), eos_hidden=hidden_out,
    )


@functools.lru_cache(maxsize=8)
def _slot_vocab(tokenizer: Any) -> tuple[dict[str, int], tuple[int, ...]]:
    """(slot name -> id, ids that spell a fact: a digit, a currency or percent sign, a brace) of a
    slotted tokenizer; ({}, ()) for one without slot tokens."""
    from models.text.slots import SLOTS, slot_token

    vocab = tokenizer.get_vocab()
    slots = {s: vocab[slot_token(s)] for s in SLOTS if slot_token(s) in vocab}
    if not slots:
        return {}, ()
    slot_ids = set(slots.values())
    spelled = []
    for tid in range(len(tokenizer)):
        if tid in slot_ids:
            continue
        text = tokenizer.decode([tid])
        if any(c.isdigit() or c in "$€£¥₹%{}" for c in text):
            spelled.append(tid)
    return slots, tuple(spelled)


def _banned_after_first(tokenizer: Any, sid: SpecialIds) -> list[int]:
    ids = set(sid.styles.values())
    for t in getattr(tokenizer, "all_special_ids", []) or []:
        if t != sid.eos:
            ids.add(int(t))
    ids.update(_slot_vocab(tokenizer)[1])  # a slotted model never spells a number: it writes a slot
    return sorted(ids)


def slot_bans(tokenizer: Any, slots_ok: Sequence[frozenset[str] | None], vocab: int) -> torch.Tensor | None:
    """Bool (len(slots_ok), vocab): per prompt, the slot tokens whose field the record lacks."""
    slots, _ = _slot_vocab(tokenizer)
    if not slots:
        return None
    ban = torch.zeros((len(slots_ok), vocab), dtype=torch.bool)
    for i, ok in enumerate(slots_ok):
        if ok is None:
            continue
        for name, tid in slots.items():
            if name not in ok and tid < vocab:
                ban[i, tid] = True
    return ban


def split_style(tokenizer: Any, token_ids: Sequence[int]) -> tuple[str | None, str]:
    """``(style, copy text)`` of a generated id sequence whose first token is a style token
    (style None when it is not); the text has no special tokens."""
    sid = special_ids(tokenizer)
    style = sid.style_of_id(int(token_ids[0])) if token_ids else None
    body = list(token_ids[1:]) if style is not None else list(token_ids)
    body = [t for t in body if t != sid.eos]
    return style, tokenizer.decode(body, skip_special_tokens=True).strip()


def request_biases(
    model: Any,
    tokenizer: Any,
    n: int,
    *,
    styles: Sequence[str] | None = None,
    style_bias: Sequence[Mapping[str, float] | None] | None = None,
    slots_ok: Sequence[frozenset[str] | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, what :func:`generate_candidates` constrains: (first-token bias (n, V) float: -inf
    outside ``styles``, plus the style tilt; banned after the first token (n, V) bool: special
    tokens, spelled numbers, the slots the record cannot fill). For :mod:`models.continuous`."""
    sid = special_ids(tokenizer)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    first = torch.full((n, vocab), float("-inf"))
    first[:, [sid.styles[s] for s in (styles or STYLES)]] = 0.0
    if style_bias is not None:
        for i, b in enumerate(style_bias):
            for name, v in (b or {}).items():
                first[i, sid.styles[name]] += float(v)
    ban = torch.zeros((n, vocab), dtype=torch.bool)
    ban[:, [b for b in _banned_after_first(tokenizer, sid) if b < vocab]] = True
    if slots_ok is not None:
        rows = slot_bans(tokenizer, slots_ok, vocab)
        if rows is not None:
            ban |= rows
    return first, ban


def generate_candidates(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    k: int = 4,
    max_new_tokens: int = 48,
    temperature: float = 0.9,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int = 0,
    *,
    styles: Sequence[str] | None = None,
    with_ctr: bool = True,
    style_bias: Sequence[Mapping[str, float] | None] | None = None,
    slots_ok: Sequence[frozenset[str] | None] | None = None,
    weights: str = "fp32",
) -> list[list[Candidate]]:
    """``k`` sampled candidates per prompt (``temperature=0``: greedy, identical candidates).

    ``styles`` restricts the first token to these styles (default: all). ``with_ctr`` reads the
    CTR head at EOS when the model has one. ``style_bias``: per prompt, logits added to the style
    tokens (p(style) tilted by exp(bias)); None entries leave a prompt as it is. ``slots_ok``:
    per prompt, the slots its record can fill (``models.text.slots.available``); the others are
    never sampled (a slotted model only). ``weights``: as :func:`decode`.
    """
    if not prompts:
        return []
    sid = special_ids(tokenizer)
    allowed = [sid.styles[s] for s in (styles or STYLES)]
    rows = encode_text(tokenizer, prompts)
    want_hidden = with_ctr and _has_ctr(model)
    bias_rows = None
    if style_bias is not None and any(b for b in style_bias):
        bias_rows = torch.zeros((len(prompts), int(model.get_input_embeddings().weight.shape[0])))
        for i, b in enumerate(style_bias):
            for name, v in (b or {}).items():
                bias_rows[i, sid.styles[name]] = float(v)
    out = decode(
        model, rows, eos_id=sid.eos, pad_id=sid.pad, k=k, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, first_allowed=allowed,
        banned=_banned_after_first(tokenizer, sid), want_hidden=want_hidden, first_bias_rows=bias_rows,
        banned_rows=None if slots_ok is None else slot_bans(
            tokenizer, slots_ok, int(model.get_input_embeddings().weight.shape[0])),
        weights=weights,
    )
    return candidates_from(model, tokenizer, out, len(prompts), k, want_hidden)


def candidates_from(model: Any, tokenizer: Any, out: DecodeOutput, n_prompts: int, k: int,
                    want_hidden: bool = True) -> list[list[Candidate]]:
    """The candidates of a decode (rows ``i*k .. i*k+k-1`` of prompt ``i``): text, style, CTR at EOS."""
    sid = special_ids(tokenizer)
    ctr_p: list[float] | None = None
    feats: np.ndarray | None = None
    hidden: np.ndarray | None = None
    if want_hidden and out.eos_hidden is not None and _has_ctr(model):
        hidden = out.eos_hidden.float().cpu().numpy()
        with torch.no_grad(), autocast_for(_model_device(model)):
            logit, f = model.ctr_from_hidden(out.eos_hidden.to(_model_device(model)))
        ctr_p = torch.sigmoid(logit.float()).tolist()
        feats = f.float().cpu().numpy()
    result: list[list[Candidate]] = []
    texts = tokenizer.batch_decode([t[1:] for t in out.tokens], skip_special_tokens=True)
    for i in range(n_prompts):
        group = []
        for j in range(k):
            r = i * k + j
            ids = out.tokens[r]
            style = sid.style_of_id(ids[0]) if ids else None
            group.append(
                Candidate(
                    text=texts[r].strip(), style=style, logprob=out.logprob[r], token_ids=ids,
                    sample_logprob=out.sample_logprob[r], finished=out.finished[r],
                    ctr=None if ctr_p is None else ctr_p[r],
                    ctr_features=None if feats is None else feats[r],
                    hidden=None if hidden is None else hidden[r],
                )
            )
        result.append(group)
    return result


def _chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


@torch.no_grad()
def score_ctr_with_features(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    copies: Sequence[str],
    styles: Sequence[str | None] | None = None,
    batch_size: int = 128,
) -> tuple[list[float], np.ndarray]:
    """CTR probabilities and CTR features of ``prompt + <s:style> + copy + EOS`` per pair.
    ``styles`` (or a None entry) default to :func:`classify_style` of the copy."""
    if len(prompts) != len(copies):
        raise ValueError("prompts and copies differ in length")
    device = _model_device(model)
    probs: list[float] = []
    feats: list[np.ndarray] = []
    for sl in _chunks(len(prompts), batch_size):
        st = [
            (styles[i] if styles is not None and styles[i] is not None else classify_style(copies[i]))
            for i in range(sl.start, sl.stop)
        ]
        b = encode_pairs(tokenizer, prompts[sl], copies[sl], styles=st)
        ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
        with autocast_for(device):
            out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, return_hidden=True)
            h = out.hidden_states[torch.arange(ids.shape[0], device=device), b["eos_index"].to(device)]
            logit, f = model.ctr_from_hidden(h)
        probs.extend(torch.sigmoid(logit.float()).tolist())
        feats.append(f.float().cpu().numpy())
    return probs, (np.concatenate(feats) if feats else np.zeros((0, 0), dtype=np.float32))


def score_ctr(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    copies: Sequence[str],
    styles: Sequence[str | None] | None = None,
    batch_size: int = 128,
) -> list[float]:
    """Predicted click probability of each (prompt, copy) pair, batched."""
    return score_ctr_with_features(model, tokenizer, prompts, copies, styles, batch_size)[0]


@torch.no_grad()
def style_distribution(model: Any, tokenizer: Any, prompts: Sequence[str]) -> list[dict[str, float]]:
    """p(style | prompt) per prompt: the model's first-token distribution over style tokens."""
    if not prompts:
        return []
    sid = special_ids(tokenizer)
    device = _model_device(model)
    ids, mask = left_pad(encode_text(tokenizer, prompts), sid.pad)
    ids, mask = ids.to(device), mask.to(device)
    with autocast_for(device):
        logits, _, _ = _forward(model, ids, mask, positions_from_mask(mask), None, False)
    style_ids = torch.tensor(sid.style_id_list, device=device)
    p = torch.softmax(logits.float()[:, style_ids], dim=-1).tolist()
    return [dict(zip(STYLES, row, strict=True)) for row in p]


def sequence_nll(
    model: Any, batch: dict[str, torch.Tensor], *, exclude_style: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed NLL (nats) and token count over labelled positions of an
    :func:`models.sequences.encode_pairs` batch (the style token excluded by default)."""
    device = _model_device(model)
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device).clone()
    if exclude_style:
        rows = torch.arange(ids.shape[0], device=device)
        labels[rows, batch["style_index"].to(device) + 1] = -100
    with autocast_for(device):
        logits = model(input_ids=ids, attention_mask=mask).logits
    logits = logits[:, :-1].float()
    tgt = labels[:, 1:]
    valid = tgt != -100
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.clamp_min(0).reshape(-1), reduction="none")
    nll = (nll.view(tgt.shape) * valid).sum(-1)
    return nll, valid.sum(-1)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    return math.exp(nll_sum / max(n_tokens, 1))
