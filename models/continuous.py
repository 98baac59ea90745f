"""Iteration-level ("continuous") decoding: prompts join a running decode, finished rows leave it.

:func:`models.generate.decode` runs one batch from prefill to the last EOS: a prompt that arrives a
step later waits for the whole batch. :class:`ContinuousDecoder` keeps one running batch of rows
(``k`` rows per prompt, the candidates) and three operations, the scheduler step of vLLM's engine:

* :meth:`~ContinuousDecoder.admit` prefills newcomers (one left-padded batch of their own; the keys and
  values of a prefix shared with a recently prefilled prompt are reused, :mod:`models.prefix_cache`), samples
  their first token (the style token, under each prompt's own first-token bias) and appends their
  rows to the batch: they take part from the next :meth:`~ContinuousDecoder.step` on.
* :meth:`~ContinuousDecoder.step`: one token for every row (one forward over the whole batch), then
  sampling; a row that sampled EOS (or reached ``max_new_tokens``) feeds EOS once more, for the CTR
  head's hidden state, and leaves; a prompt whose ``k`` rows all left comes back as a
  :class:`FinishedGroup`.
* :meth:`~ContinuousDecoder.drop` removes a prompt's rows at once (its deadline passed).

The KV cache is preallocated and static: ``max_prompts`` prompt slots (doubled if ever exceeded),
each owning ``k`` row slots. A prompt's keys/values are kept once per prompt slot, right-aligned
in the slot's prompt columns (room for the first prompts, then for the longest the positions allow;
the rest masked),
as in :mod:`models.cascade`; the slot's ``k`` rows write their generated ones after them,
interleaved. A step reads a window of the prompt columns as wide as the longest prompt decoding
(``Lc``: a view, so it follows the running batch at no cost), row ``j``'s position ``c`` in window
column ``Lc + c * k + j``, so a step's attention is one call per layer: the slot's ``k`` queries over its
``Lc + t * k`` columns, each row masked to its prompt and its own columns (one SDPA call instead of
the two-part softmax of the cascade step: a sixth of a batch-1 step fewer on a CPU). Rows join at
different steps, so every row has its own write column and position (``glen``, ``pos``). A
newcomer takes the lowest free prompt slot and writes its prefill there: nothing else is copied
(appending to or compacting the whole cache at every admission cost a third of a step at 128
rows). Before a step the highest prompts move into the slots freed below them (a few MB), and
the step runs the used slots only; once ``skip_rows`` rows of those slots have left (a prompt's
candidates end at different steps), it computes only the rows still decoding. The sampling
(:func:`models.drafts.emit_tokens`: top-k, then top-p on the survivors, as
:func:`models.generate.sampling_distribution`) gives a row the distribution of the static decode
(greedy decodes are the same tokens, tested). On a CPU the step's forward is TorchScript
(:mod:`models.scripted`); at small batches a step is speculative (:meth:`ContinuousDecoder._spec_step`).

``static_shapes=True`` (the CUDA path) runs all slots and attends over all ``max_new_tokens + 1``
columns every step: the step's shapes never change and no length is read back to the host.
``shape_buckets=True`` (the compiled CPU path) attends over all columns too but runs the used slots
rounded up to a power of two: ``log2(max_prompts) + 1`` shapes, each compiled once
(:meth:`ContinuousDecoder.compile`, :meth:`ContinuousDecoder.warmup`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models import cascade, cpu_emit, cpu_ops, scripted
from models.drafts import NGramDrafts, emit_into_rows
from models.drafts import warm as drafts_warm
from models.generate import autocast_for
from models.linears import linears
from models.prefix_cache import PrefixCache, stack_kv
from models.sequences import left_pad, positions_from_mask

MAX_DRAFTS = 8  # drafts a row gets at most in a step (a lone row's; the n-gram table chains its guesses)


@dataclass(frozen=True)
class Prefilled:
    """Prompts prefilled for :meth:`ContinuousDecoder.admit`: keys/values per layer (P, H, L, dh), the
    valid columns (P, L), last positions (P,) and first logits (P, V), left-padded to the longest (L)."""

    rows: list[list[int]]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor
    last_pos: torch.Tensor
    logits: torch.Tensor


@dataclass
class FinishedGroup:
    """The ``k`` rows of one admitted prompt, in slot order."""

    gid: int
    tokens: list[list[int]]  # generated ids per row, EOS/stop excluded
    logprob: list[float]
    sample_logprob: list[float]
    finished: list[bool]  # ended by EOS (False: truncated at max_new_tokens)
    eos_hidden: torch.Tensor | None  # (k, d) final hidden state at EOS, when want_hidden


class ContinuousDecoder:
    """A running batch of sampled rows over a GPT-2 trunk (``models.cascade.supports(model)``)."""

    def __init__(
        self,
        model: Any,
        *,
        eos_id: int,
        pad_id: int,
        k: int = 1,
        max_new_tokens: int = 48,
        temperature: float = 0.9,
        top_k: int = 50,
        top_p: float = 0.95,
        seed: int = 0,
        want_hidden: bool = False,
        stop_mask: torch.Tensor | None = None,
        max_prompts: int = 32,
        static_shapes: bool = False,
        shape_buckets: bool = False,
        weights: str = "fp32",
        drafts: NGramDrafts | None = None,
        draft_depth: int = 3,
        spec_rows: int = 256,
        spec_places: int = 28,
        first_drafts: int | None = 1,
        prefix: PrefixCache | None = None,
    ) -> None:
        trunk = cascade._trunk(model)
        lm = cascade._lm_weight(model, trunk) if trunk is not None else None
        if trunk is None or lm is None or not cascade.supports(model):
            raise TypeError("ContinuousDecoder needs a GPT-2 trunk (see models.cascade.supports)")
        self.model, self.trunk, self.lm_weight = model, trunk, lm
        self.blocks: list[Any] = list(trunk.h)
        self.lin = linears(trunk, lm, weights)
        self.norms = cascade.norms(trunk)
        cfg = trunk.config
        self.n_head = int(cfg.n_head)
        self.head_dim = int(cfg.n_embd) // self.n_head
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.tanh_gelu = cfg.activation_function in cascade._TANH_GELUS
        self.n_layer = len(self.blocks)
        self.n_positions = int(trunk.wpe.weight.shape[0])
        self.device = lm.device
        self.vocab = int(lm.shape[0])
        self.eos_id, self.pad_id, self.k = int(eos_id), int(pad_id), int(k)
        self.max_new = int(max_new_tokens)
        self.cap = self.max_new + 1  # generated columns per row: every token fed, EOS included
        # speculative steps (dynamic shapes only): up to draft_depth guessed tokens per row from `drafts`, while
        # rows x (1 + depth) <= spec_rows (a small batch: on a CPU a product's time grows with its rows)
        self.drafts = drafts if not (static_shapes or shape_buckets) else None
        self.depth = max(0, int(draft_depth)) if self.drafts is not None else 0
        self.spec_rows = int(spec_rows)
        # a step with few rows left decoding (a request's last candidates) gives each more drafts, up to
        # MAX_DRAFTS, as many as keep its places (live rows x (1 + drafts)) within spec_places (0: off)
        self.spec_places = max(0, int(spec_places)) if self.depth else 0
        # ... except in a row's first step after the token sampled from its prompt (the style token): candidates open
        # differently by design, so few of those guesses are kept (None: no cap; docs/generation.md)
        self.first_drafts = None if first_drafts is None else max(0, int(first_drafts))
        self.room = self.cap + max(self.depth, MAX_DRAFTS if self.spec_places else 0)  # drafts may go past the cap
        self._tail_w = self.drafts.n if self.drafts is not None else 0  # prompt tokens a row keeps for its drafts
        self.prefix = prefix  # keys/values of prompts prefilled before (models/prefix_cache.py)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.want_hidden = want_hidden
        self.stop = stop_mask.to(self.device) if stop_mask is not None else None
        self._stop_np = self.stop.numpy() if self.stop is not None and self.device.type == "cpu" else None
        self.static_shapes = static_shapes
        self.shape_buckets = shape_buckets and not static_shapes
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(int(seed))
        self.n_prompts = max(1, int(max_prompts))  # prompt slots
        self.prompt_gid: list[int] = [-1] * self.n_prompts  # gid per prompt slot, -1: free
        self.lcap = 0  # prompt columns allocated
        self.plen: list[int] = [0] * self.n_prompts  # prompt tokens per prompt slot (its last plen prompt columns)
        # per layer (2, P, H, lcap + room * k, dh): keys [0] and values [1] of a prompt slot, its prompt's in
        # its last prompt columns (right-aligned), then its k rows' generated ones interleaved
        self.kv: list[torch.Tensor] = []
        # what a step reads (Lc, the caches and p_bias it was taken from, their views from the last Lc prompt columns)
        self._win: tuple[int, list[torch.Tensor], torch.Tensor, list[torch.Tensor], torch.Tensor] | None = None
        # a step computes only the rows still decoding when at least this many rows of its slots have left
        # (gathering them costs two small ops a layer: worth it at large batches, not for a lone request)
        self.skip_rows = 8
        self.p_bias = torch.zeros(0)  # (P, 1, 1, lcap): 0 on a prompt's tokens, the dtype's min elsewhere
        self._neg = 0.0
        self._rows_alloc(self.n_prompts * self.k)
        # rows that left, by gid: slot -> (tokens, logprob, sample logprob, ended by EOS, hidden at EOS)
        self._left: dict[int, dict[int, tuple[list[int], float, float, bool, torch.Tensor | None]]] = {}
        self._done: list[int] = []  # gids whose k rows all left, not yet reported
        self._fwd: Callable[..., tuple[torch.Tensor, torch.Tensor]] = self._forward
        # on a CPU the step's forward runs as one TorchScript function (models/scripted.py)
        self._script = scripted.step_forward() if self.device.type == "cpu" and self.tanh_gelu else None
        if self._script is not None and scripted.prefill_forward() is None:  # both scripted, or neither
            self._script = None
        # ... its attention (each place over its prompt's and its own row's columns only, not the slot's every
        # column masked) and GELU as compiled loops (models/cpu_ops.py)
        self._fused = self._script is not None and cpu_ops.available()
        # prefill() may run on another thread while step() runs: on a CPU (the other core); on a GPU both would
        # share the stream, and a CUDA graph's capture must not see another thread's work
        self.prefill_concurrent = self.device.type == "cpu"
        ln = [a for pair in self.norms[0] for a in pair] + [self.norms[1]]
        self._ln = ([a[1] for a in ln], [a[2] for a in ln], [float(a[3]) for a in ln])

    # ------------------------------------------------------------------ state
    def _rows_alloc(self, n: int) -> None:
        dev = self.device
        self.row_p = torch.arange(n, device=dev) // self.k  # prompt slot of each row
        self.row_j = torch.arange(n, device=dev) % self.k  # its place among the slot's k rows
        self.pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.glen = torch.zeros(n, dtype=torch.long, device=dev)
        self.ntok = torch.zeros(n, dtype=torch.long, device=dev)
        self.pending = torch.zeros(n, dtype=torch.long, device=dev)
        self.alive = torch.zeros(n, dtype=torch.bool, device=dev)
        self.closing = torch.zeros(n, dtype=torch.bool, device=dev)
        self.fin = torch.zeros(n, dtype=torch.bool, device=dev)
        self.ban = torch.zeros((n, self.vocab), dtype=torch.float32, device=dev)
        self.tokens = torch.full((n, self.max_new), -1, dtype=torch.long, device=dev)
        self.tail = torch.zeros((n, self._tail_w), dtype=torch.long, device=dev)  # its prompt's last tokens (the
        self.tail_len = torch.zeros(n, dtype=torch.long, device=dev)  # drafts' first context) and how many
        self.lp = torch.zeros(n, dtype=torch.float64, device=dev)
        self.slp = torch.zeros(n, dtype=torch.float64, device=dev)
        # on a CPU, host arrays that are these tensors (views: compiled loops read and write the state in place)
        self._views = {name: getattr(self, name).numpy() for name in self._ROW_STATE} if dev.type == "cpu" else {}

    _PLANNED = ("alive", "closing", "ntok", "pos", "glen", "pending", "tokens", "tail", "tail_len")

    def _host_state(self, n: int) -> dict[str, np.ndarray]:
        """The rows' state a step's plan reads, as host arrays (the CPU's views; a CUDA decoder's
        first ``n`` rows copied)."""
        if self._views:
            return self._views
        return {name: getattr(self, name)[:n].cpu().numpy() for name in self._PLANNED}

    def _grow_prompts(self, need: int) -> None:
        """Double the prompt slots until ``need`` more are free (rare: the engine admits at most max_prompts)."""
        free = self.prompt_gid.count(-1)
        if free >= need:
            return
        old_p, old_n = self.n_prompts, self.n_prompts * self.k
        new_p = old_p
        while new_p - (old_p - free) < need:
            new_p *= 2
        keep = {name: getattr(self, name) for name in self._ROW_STATE}
        self._rows_alloc(new_p * self.k)
        for name, t in keep.items():
            getattr(self, name)[:old_n] = t
        self.n_prompts = new_p
        self.prompt_gid += [-1] * (new_p - old_p)
        self.plen += [0] * (new_p - old_p)
        if self.kv:
            self.kv = [torch.cat([t, t.new_zeros((2, new_p - old_p, *t.shape[2:]))], 1) for t in self.kv]
            self.p_bias = torch.cat([self.p_bias, self.p_bias.new_full((new_p - old_p, *self.p_bias.shape[1:]),
                                                                       self._neg)])

    def _widen(self, length: int, dtype: torch.dtype) -> None:
        """Room for prompts of ``length`` tokens: the cache is allocated at the first admission for
        the first prompts (fixed shapes: for the longest prompt the positions allow next to
        ``max_new_tokens``), and the first longer prompt widens it to that room at once (one copy)."""
        if self.kv and length <= self.lcap:
            return
        dev, p, h, dh = self.device, self.n_prompts, self.n_head, self.head_dim
        room = max(length, self.n_positions - self.max_new)
        if not self.kv:
            self._neg = float(torch.finfo(dtype).min)
            self.lcap = room if self.static_shapes or self.shape_buckets else length
            self.kv = [torch.zeros((2, p, h, self.lcap + self.room * self.k, dh), dtype=dtype, device=dev)
                       for _ in range(self.n_layer)]
            self.p_bias = torch.full((p, 1, 1, self.lcap), self._neg, dtype=dtype, device=dev)
            return
        self.kv = [_pad_prompt(t, room - self.lcap) for t in self.kv]
        self.p_bias = torch.cat([self.p_bias.new_full((p, 1, 1, room - self.lcap), self._neg), self.p_bias], -1)
        self.lcap = room

    @property
    def lc(self) -> int:
        """Prompt columns a step reads: the longest prompt decoding (all of them with fixed shapes)."""
        if self.static_shapes or self.shape_buckets:
            return self.lcap
        return max((self.plen[p] for p, g in enumerate(self.prompt_gid) if g >= 0), default=1)

    def _window(self) -> tuple[int, list[torch.Tensor], torch.Tensor]:
        """(Lc, every layer's cache from the last Lc prompt columns on, p_bias's last Lc columns): views."""
        lc, w = self.lc, self._win
        if w is None or w[0] != lc or w[1] is not self.kv or w[2] is not self.p_bias:
            s = self.lcap - lc
            w = self._win = (lc, self.kv, self.p_bias, [t[:, :, :, s:] for t in self.kv], self.p_bias[..., s:])
        return w[0], w[3], w[4]

    @property
    def live_rows(self) -> int:
        return int(self.alive.sum())

    def gids(self) -> list[int]:
        """Prompts admitted and not yet reported or dropped."""
        return list(self._left)

    # ------------------------------------------------------------------ the blocks
    def _layers(self, x: torch.Tensor, attend: Any) -> torch.Tensor:
        return cascade.CascadeStepper._layers(self, x, attend)  # type: ignore[arg-type]

    def _prefill(self, rows: Sequence[Sequence[int]], reuse: Sequence[tuple[int, torch.Tensor | None]] | None = None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values per layer (P, H, L, dh), valid (P, L), last positions (P,), logits (P, V)), the
        rows left-padded to the longest (L). ``reuse[i]`` = (c, keys/values (2, layers, H, >= c, dh)): row
        ``i``'s first ``c`` tokens' (:class:`models.prefix_cache.PrefixCache`); only its other tokens are
        computed (the last ``len - c`` columns of its row), attending to those."""
        cs = [c for c, _ in reuse] if reuse is not None else [0] * len(rows)
        width = max(len(r) for r in rows)
        ids, mask = left_pad([r[c:] for r, c in zip(rows, cs, strict=True)], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        n, length = ids.shape  # the computed block: the last `length` columns
        dev = self.device
        pos = positions_from_mask(mask) + torch.tensor(cs, device=dev)[:, None]
        lens = torch.tensor([len(r) for r in rows], device=dev)
        cols = torch.arange(width, device=dev)
        valid = cols[None, :] >= (width - lens)[:, None]
        at = cols[width - length:]  # the computed columns
        allowed = ((at[:, None] >= cols[None, :])[None] & valid[:, None, :]) | (at[:, None] == cols[None, :])[None]
        allowed = allowed[:, None]
        past: torch.Tensor | None = None  # reused keys/values in their columns (2, layers, P, H, width, dh)
        cached = torch.zeros((n, width), dtype=torch.bool, device=dev)
        if any(cs):
            past = torch.zeros((2, self.n_layer, n, self.n_head, width, self.head_dim), device=dev)
            for i, (c, kv) in enumerate(reuse or []):
                if c and kv is not None:
                    lo = width - len(rows[i])
                    past[:, :, i, :, lo:lo + c] = kv[:, :, :, :c].to(device=dev, dtype=past.dtype)
                    cached[i, lo:lo + c] = True
        if self._script is not None:  # the same operations as one TorchScript function (models/scripted.py)
            tr, lin = self.trunk, self.lin
            keys, values, logits = scripted.prefill_forward()(
                ids, pos, allowed, past, cached[:, None, :, None] if past is not None else None, self.n_head,
                tr.wte.weight, tr.wpe.weight, *self._ln, list(lin.packed), list(lin.weights), list(lin.biases),
                self._fused)
            return keys, values, valid, pos[:, -1], logits
        keys = []
        values = []

        def attend(layer: int, qkv: torch.Tensor) -> torch.Tensor:
            q, key, value = qkv.view(n, length, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
            if width > length:
                key = torch.cat([key.new_zeros((n, self.n_head, width - length, self.head_dim)), key], 2)
                value = torch.cat([value.new_zeros((n, self.n_head, width - length, self.head_dim)), value], 2)
            if past is not None:
                here = cached[:, None, :, None]
                key = torch.where(here, past[0, layer].to(key.dtype), key)
                value = torch.where(here, past[1, layer].to(value.dtype), value)
            keys.append(key)
            values.append(value)
            o = F.scaled_dot_product_attention(q, key, value, attn_mask=allowed)
            return o.transpose(1, 2).reshape(n * length, -1)

        tr = self.trunk
        x = (tr.wte(ids) + tr.wpe(pos)).reshape(n * length, -1)
        h = self._layers(x, attend).view(n, length, -1)[:, -1]
        return keys, values, valid, pos[:, -1], self.lin.lm(h)

    # ------------------------------------------------------------------ admit
    @torch.inference_mode()
    def prefill(self, prompt_rows: Sequence[Sequence[int]]) -> Prefilled:
        """The prompts' keys, values and first logits, for :meth:`admit`. Reads the weights and the
        prefix cache (locked) only, never the running batch: safe on another thread while :meth:`step`
        runs (the engine prefills arrivals on a second core while the batch decodes)."""
        rows = [list(r) for r in prompt_rows]
        reuse = [self.prefix.lookup(r) for r in rows] if self.prefix is not None else None
        with autocast_for(self.device):
            keys, values, valid, last_pos, logits = self._prefill(rows, reuse)
        if self.prefix is not None and reuse is not None:
            self.prefix.count(sum(c for c, _ in reuse), sum(len(r) for r in rows) - sum(c for c, _ in reuse))
            for i, r in enumerate(rows):
                if reuse[i][0] < len(r) - 1:  # not yet cached
                    self.prefix.store(r, stack_kv([t[i][:, valid[i]] for t in keys],
                                                  [t[i][:, valid[i]] for t in values]))
        return Prefilled(rows, keys, values, valid, last_pos, logits)

    @torch.inference_mode()
    def admit(self, gids: Sequence[int], prompt_rows: Sequence[Sequence[int]], first_bias: torch.Tensor,
              ban: torch.Tensor, prefilled: Prefilled | None = None) -> None:
        """Add prompts ``gids`` (ids of the caller's choosing, unique among those admitted and not
        reported): ``first_bias`` (P, V) float added to the first token's logits (-inf: not allowed;
        the style tokens and the shopper's style tilt), ``ban`` (P, V) bool ids never sampled after
        the first. ``prefilled``: :meth:`prefill` of these prompts, done before (else done here)."""
        if not gids:
            return
        if len(gids) != len(prompt_rows) or first_bias.shape[0] != len(gids) or ban.shape[0] != len(gids):
            raise ValueError("gids, prompt_rows, first_bias and ban differ in length")
        if any(int(g) in self._left for g in gids):
            raise ValueError("a gid is already decoding")
        if prefilled is not None and prefilled.rows != [list(r) for r in prompt_rows]:
            raise ValueError("prefilled for other prompts")
        k, dev, n_new = self.k, self.device, len(gids)
        pre = prefilled if prefilled is not None else self.prefill(prompt_rows)
        keys, values, valid, last_pos, logits = pre.keys, pre.values, pre.valid, pre.last_pos, pre.logits
        length = valid.shape[1]
        self._grow_prompts(n_new)
        self._widen(length, keys[0].dtype)
        slots = [p for p, g in enumerate(self.prompt_gid) if g < 0][:n_new]
        ps = torch.tensor(slots, dtype=torch.long, device=dev)
        lo, hi = self.lcap - length, self.lcap  # right-aligned: each prompt's last token in the last column
        for layer in range(self.n_layer):
            self.kv[layer][0, ps, :, lo:hi] = keys[layer].to(self.kv[layer].dtype)
            self.kv[layer][1, ps, :, lo:hi] = values[layer].to(self.kv[layer].dtype)
        bias = torch.full((n_new, self.lcap), self._neg, dtype=self.p_bias.dtype, device=dev)
        bias[:, lo:].masked_fill_(valid, 0.0)
        self.p_bias[ps] = bias[:, None, None, :]
        rows = (ps[:, None] * k + torch.arange(k, device=dev)).reshape(-1)
        self.pos[rows] = last_pos.repeat_interleave(k)
        self.glen[rows] = 0
        self.ntok[rows] = 0
        self.alive[rows] = True
        self.closing[rows] = False
        self.fin[rows] = False
        row_ban = torch.zeros((n_new, self.vocab), dtype=torch.float32, device=dev)
        row_ban[ban.to(dev)[:, : self.vocab]] = float("-inf")
        self.ban[rows] = row_ban.repeat_interleave(k, 0)
        self.tokens[rows] = -1
        self.lp[rows] = 0.0
        self.slp[rows] = 0.0
        for slot, g, prompt in zip(slots, gids, prompt_rows, strict=True):
            self.prompt_gid[slot] = int(g)
            self.plen[slot] = len(prompt)
            self._left[int(g)] = {}
            if self._tail_w:
                tail = [int(x) for x in prompt[-self._tail_w:]]
                self.tail[slot * k:(slot + 1) * k, :len(tail)] = torch.tensor(tail, dtype=torch.long)
                self.tail_len[slot * k:(slot + 1) * k] = len(tail)
        # the first token: from the prefill's logits, under each prompt's first-token bias
        first = logits.float() + first_bias.to(device=dev, dtype=torch.float32)[:, : logits.shape[-1]]
        self._sample_rows(rows, first.repeat_interleave(k, 0) if k > 1 else first, add_ban=False)

    # ------------------------------------------------------------------ step
    def _sample_rows(self, rows: torch.Tensor, logits: torch.Tensor, add_ban: bool = True) -> None:
        """Sample the next token of ``rows`` (all live, not closing) from ``logits`` (len(rows), V)."""
        if rows.numel() == 0:
            return
        place = torch.arange(rows.numel(), device=rows.device)[:, None]
        closing = self._emit_rows(rows, logits, place, rows.new_zeros((rows.numel(), 0)), False, add_ban)[2]
        if not self.want_hidden:
            self._retire(rows[closing])

    def _emit_rows(self, rows: torch.Tensor, logits: torch.Tensor, place: torch.Tensor, drafts: torch.Tensor,
                   advance: bool, ban: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``rows`` (m live rows) emit their tokens from the logits at ``place`` (m, qn: rows of
        ``logits``), their bans added (``ban``): a plain draw (qn = 1) or their kept guesses
        (``drafts`` (m, qn - 1)) and one draw (:func:`models.drafts.speculative_pick`); an ending
        token (EOS or stop) ends the row (closing: the CTR read comes next). ``advance``: the tokens
        before the last emitted one were fed in this step (positions and columns move on). Returns
        (guesses kept, index of the ending token (qn: none), closing) per row."""
        m, qn = place.shape
        u = torch.rand((m, qn), generator=self.gen, device=self.device)
        if self._views:  # one compiled loop over the state's host views (models/cpu_emit.py)
            v = self._views
            return cpu_emit.emit_views(
                rows.contiguous().numpy(), logits, place.contiguous().numpy(), v["ban"] if ban else None,
                drafts.contiguous().numpy(), u.numpy(),
                self.temperature, self.top_k, self.top_p, self.eos_id, self._stop_np, advance, self.max_new, v["lp"],
                v["slp"], v["tokens"], v["ntok"], v["pending"], v["pos"], v["glen"], v["fin"], v["closing"])
        state = (self.max_new, self.lp, self.slp, self.tokens, self.ntok, self.pending, self.pos, self.glen, self.fin,
                 self.closing)
        x = logits.float()[place]
        if ban:
            x = x + self.ban[rows][:, None]
        return emit_into_rows(rows, x, drafts, u, self.temperature, self.top_k, self.top_p, self.eos_id, self.stop,
                              advance, *state)

    def _retire(self, rows: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """Rows ``rows`` leave: their outputs move to ``_left`` (``hidden``: theirs at EOS, in order);
        a prompt whose last row left frees its slot."""
        if rows.numel() == 0:
            return
        self.alive[rows] = False
        self.closing[rows] = False
        toks = self.tokens[rows].tolist()
        lps, slps, fins = self.lp[rows].tolist(), self.slp[rows].tolist(), self.fin[rows].tolist()
        ends = self.pending[rows].tolist()
        tails, tail_lens = self.tail[rows].tolist(), self.tail_len[rows].tolist()
        h = hidden.float() if hidden is not None else None
        for i, r in enumerate(rows.tolist()):
            p, slot = divmod(r, self.k)
            gid = self.prompt_gid[p]
            left = self._left.get(gid)
            if left is None:  # dropped
                continue
            mine = [t for t in toks[i] if t >= 0]
            left[slot] = (mine, lps[i], slps[i], fins[i], None if h is None else h[i])
            # the row's n-grams, its ending token (EOS or stop) included: every candidate while the table is young,
            # then one per prompt (learning is ~0.05 ms a row on the engine thread: docs/generation.md)
            if self.drafts is not None and (slot == 0 or self.drafts.young):
                self.drafts.learn(tails[i][:tail_lens[i]] + mine + ([ends[i]] if fins[i] else []))
            if len(left) == self.k:
                self._done.append(gid)
                self.prompt_gid[p] = -1

    def _forward(self, feed: torch.Tensor, pos: torch.Tensor, col: torch.Tensor, t: int,
                 rows: torch.Tensor | None = None, per_row: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's forward over rows ``feed`` (R,): final hidden states and logits (:meth:`compile`);
        with ``rows`` (ascending indices) only those rows are computed and returned, in that order.

        Row ``r`` writes its key/value at column ``Lc + col[r] * k + j`` of its prompt slot and
        attends to its prompt and to its own columns up to there: one attention call per layer,
        the ``k`` queries of a prompt slot over its ``Lc + t * k`` columns (the prompt read once).
        ``per_row`` > 1 (a speculative step): ``feed`` holds that many consecutive tokens per row
        (its token, then its drafts), each at its own position and column."""
        # the whole cache, no window: fixed shapes (what torch.compile traces), or the fused step (columns by index)
        whole = self.static_shapes or self.shape_buckets or self._fused
        lc, kv, p_bias = (self.lcap, self.kv, self.p_bias) if whole else self._window()
        if self._script is not None:
            tr, lin = self.trunk, self.lin
            return self._script(feed, pos, col, t, rows, per_row, self.row_p, self.row_j, p_bias, kv,
                                lc, self.k, self._neg, self.scale, self.n_head, tr.wte.weight, tr.wpe.weight,
                                *self._ln, list(lin.packed), list(lin.weights), list(lin.biases), self._fused)
        n, k = feed.shape[0], self.k
        hi, width = n // (k * per_row), lc + t * k
        rows_p, rows_j = self.row_p[:n // per_row], self.row_j[:n // per_row]
        if per_row > 1:
            rows_p, rows_j = rows_p.repeat_interleave(per_row), rows_j.repeat_interleave(per_row)
        write = lc + col * k + rows_j
        cc = torch.arange(t * k, device=feed.device)
        mine = ((cc % k)[None, :] == rows_j[:, None]) & ((cc // k)[None, :] <= col[:, None])  # (R, t*k)
        gen = torch.zeros(mine.shape, dtype=p_bias.dtype, device=feed.device).masked_fill_(~mine, self._neg)
        kq = k * per_row  # queries per prompt slot
        mask = torch.cat([p_bias[:hi].expand(hi, 1, kq, lc), gen.view(hi, 1, kq, t * k)], -1)
        h_, dh = self.n_head, self.head_dim
        grid: torch.Tensor | None = None
        if rows is not None:
            feed, pos, rows_p, write = feed[rows], pos[rows], rows_p[rows], write[rows]
            sel = mask.view(n, width)[rows]
            if hi == 1:  # one slot: its computed places are its queries, in order
                kq = rows.numel()
                mask = sel.view(1, 1, kq, width)
            else:
                # the computed places packed slot by slot into as many queries a slot as its most computes (the
                # others query nothing: zeros, their outputs dropped): a slot's attention costs what it computes
                slot = rows // kq
                counts = torch.bincount(slot, minlength=hi)
                kq = int(counts.max())
                grid = slot * kq + torch.arange(rows.numel(), device=feed.device) - (counts.cumsum(0) - counts)[slot]
                mask = sel.new_zeros((hi * kq, width)).index_copy_(0, grid, sel).view(hi, 1, kq, width)

        def attend(layer: int, qkv: torch.Tensor) -> torch.Tensor:
            cache = kv[layer]
            cache[:, rows_p, :, write] = qkv[:, 1:].to(cache.dtype)  # (R, 2, H, dh): this step's key and value
            q = qkv[:, 0]
            if grid is not None:
                q = q.new_zeros((hi * kq, h_, dh)).index_copy_(0, grid, q)
            q = q.view(hi, kq, h_, dh).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, cache[0, :hi, :, :width], cache[1, :hi, :, :width],
                                               attn_mask=mask, scale=self.scale)
            o = o.transpose(1, 2).reshape(hi * kq, -1)
            return o if grid is None else o.index_select(0, grid)

        with autocast_for(self.device):
            x = self.trunk.wte(feed) + self.trunk.wpe(pos)
            h = self._layers(x, attend)
            return h, self.lin.lm(h)

    def compile(self, **kw: Any) -> None:
        """``torch.compile`` the step's forward (static shapes only: one graph for all steps)."""
        if not (self.static_shapes or self.shape_buckets):
            raise ValueError("compile() needs static_shapes or shape_buckets")
        # fbgemm's packed int8 weights are opaque to dynamo: the compiled step multiplies on the fp32 weights
        self.lin = linears(self.trunk, self.lm_weight, "fp32")
        self._script = None  # dynamo compiles the eager forward
        self._fused = False
        import torch._dynamo.config as dynamo_config

        # one graph per shape and per decoder (a hot swap makes a new one): more than dynamo's default 8
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), 256))
        self._fwd = torch.compile(self._forward, dynamic=False, **kw)

    def buckets(self) -> list[int]:
        """The prompt-slot counts a step runs with (one compiled graph each)."""
        if self.static_shapes:
            return [self.n_prompts]
        if not self.shape_buckets:
            return list(range(1, self.n_prompts + 1))
        out, b = [], 1
        while b < self.n_prompts:
            out.append(b)
            b *= 2
        return [*out, self.n_prompts]

    @torch.inference_mode()
    def warmup(self) -> None:
        """Before any request is admitted: the caches at their full width, the CPU sampling loop and
        the draft table's compiled, and the step's forward run once per shape (compiles them all)
        where shapes are fixed."""
        if bool(self.alive.any()):
            raise RuntimeError("warmup() on a decoder with rows")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self._widen(self.n_positions - self.max_new, dtype)
        if self.device.type == "cpu":
            cpu_emit.warm()  # the sampling loop compiled (or loaded from its disk cache) now
        if self._fused:
            cpu_ops.warm()
        if self.drafts is not None:
            drafts_warm()
        for b in (self.buckets() if self.static_shapes or self.shape_buckets else []):
            n = b * self.k
            z = torch.zeros(n, dtype=torch.long, device=self.device)
            self._fwd(z, z, z, self.cap)

    _ROW_STATE = ("pos", "glen", "ntok", "pending", "alive", "closing", "fin", "ban", "tokens", "tail", "tail_len",
                  "lp", "slp")

    def _defrag(self) -> int:
        """Move the highest prompts into the free slots below them (their prompt and row caches, a few
        MB at most), so the used slots are ``0 .. n-1`` and a step runs no empty slot; returns n."""
        used = [p for p, g in enumerate(self.prompt_gid) if g >= 0]
        free = [p for p, g in enumerate(self.prompt_gid[: len(used)]) if g < 0]
        tops = [p for p in used if p >= len(used)]
        if free:
            k = self.k
            src = torch.tensor(tops, dtype=torch.long, device=self.device)
            dst = torch.tensor(free, dtype=torch.long, device=self.device)
            rs = (src[:, None] * k + torch.arange(k, device=self.device)).reshape(-1)
            rd = (dst[:, None] * k + torch.arange(k, device=self.device)).reshape(-1)
            for layer in range(self.n_layer):
                self.kv[layer][:, dst] = self.kv[layer][:, src]
            self.p_bias[dst] = self.p_bias[src]
            for name in self._ROW_STATE:
                t = getattr(self, name)
                t[rd] = t[rs]
            self.alive[rs] = False
            self.closing[rs] = False
            for a, b in zip(free, tops, strict=True):
                self.prompt_gid[a], self.prompt_gid[b] = self.prompt_gid[b], -1
                self.plen[a] = self.plen[b]
        return len(used)

    @torch.inference_mode()
    def step(self) -> list[FinishedGroup]:
        """One token for every live row; returns the prompts that finished (all ``k`` rows left)."""
        out = self._collect()
        if not bool(self.alive.any()):
            return out
        if self.static_shapes:
            hi = self.n_prompts
        else:
            hi = self._defrag()
            if self.shape_buckets:
                hi = next(b for b in self.buckets() if b >= hi)
        n = hi * self.k
        if self.drafts is not None and self.spec_rows // n >= 2 and self._spec_step(n, min(self.depth + 1,
                                                                               self.spec_rows // n)):
            return out + self._collect()
        alive, closing = self.alive[:n], self.closing[:n]
        feed = torch.where(closing, torch.full_like(self.pending[:n], self.eos_id), self.pending[:n])
        col = self.glen[:n].clamp(max=self.cap - 1)
        t = self.cap if self.static_shapes or self.shape_buckets else int(col[alive].max()) + 1
        pos = (self.pos[:n] + 1).clamp(max=self.n_positions - 1)
        at: torch.Tensor | None = None  # where each row's outputs are, when only the rows still decoding run
        if not (self.static_shapes or self.shape_buckets) and n - int(alive.sum()) >= self.skip_rows:
            # candidates that ended wait for the others of their prompt: computing them is ~1/6 of a full step
            rows = alive.nonzero().squeeze(1)
            h, logits = self._forward(feed, pos, col, t, rows)
            at = torch.full((n,), -1, dtype=torch.long, device=feed.device)
            at[rows] = torch.arange(rows.numel(), device=feed.device)
        else:
            h, logits = self._fwd(feed, pos, col, t)
        self.pos[:n] += alive.long()
        self.glen[:n] += alive.long()
        ending = (closing & alive).nonzero().squeeze(1)
        self._retire(ending, h[ending if at is None else at[ending]] if self.want_hidden else None)
        live = (self.alive[:n] & ~self.closing[:n]).nonzero().squeeze(1)
        self._sample_rows(live, logits[live if at is None else at[live]])
        return out + self._collect()

    def _spec_step(self, n: int, qn: int) -> bool:
        """A speculative step over the first ``n`` rows: each live row feeds its token and up to
        ``qn - 1`` drafts (:class:`~models.drafts.NGramDrafts`), then keeps the longest prefix of
        drafts its own sampling accepts plus one sampled token (speculative sampling: a draft ``x``
        at a position whose sampling distribution is ``p`` is kept with probability ``p(x)``; the
        first one refused is replaced by a draw from ``p`` without ``x``; after the last kept one,
        a draw from ``p``): every row's tokens come from the distribution of :meth:`step`'s. The
        step is as deep as its longest draft, and only the live rows' tokens and their own drafts
        are computed (and a closing row's EOS). False (nothing done) when no row has a draft."""
        assert self.drafts is not None
        dev = self.device
        # the step is planned on the host in one compiled loop (a few rows: a tensor operation each would cost more)
        st = self._host_state(n)
        plan = self.drafts.plan_step(n, st["alive"], st["closing"], st["ntok"], st["pos"], st["glen"], st["pending"],
                                     st["tokens"], st["tail"], st["tail_len"], qn - 1, self.spec_places, MAX_DRAFTS,
                                     self.max_new, self.n_positions, self.room, self.eos_id, self.vocab,
                                     first=self.first_drafts)
        qn = plan.feed.shape[1]
        if qn == 1:  # no row has a guess
            return False

        def dev_t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(dev)

        every = plan.need.shape[0] == n * qn
        h, logits = self._forward(dev_t(plan.feed.reshape(-1)), dev_t(plan.pos.reshape(-1)),
                                  dev_t(plan.col.reshape(-1)), plan.t, None if every else dev_t(plan.need), per_row=qn)
        if plan.ending.size:  # rows that fed EOS for their CTR read
            self._retire(dev_t(plan.ending), h[dev_t(plan.src[plan.ending, 0])] if self.want_hidden else None)
        m = plan.live.shape[0]
        if m == 0:
            return True
        live, place = dev_t(plan.live), dev_t(plan.place)  # place: where each live place's outputs are in h, logits
        acc, first_end, closing_now = self._emit_rows(live, logits, place, dev_t(plan.guesses), advance=True)
        acc_n = _host(acc)
        self.drafts.observe(int(plan.lens.sum()), int(acc_n.sum()))
        if self.want_hidden:  # an EOS among the kept guesses was fed in this step: its hidden state is the CTR read
            fe = _host(first_end)
            nxt = np.minimum(fe + 1, qn - 1)
            now = np.flatnonzero((fe < acc_n) & (plan.feed[plan.live, nxt] == self.eos_id))
            if now.size:
                at_now = dev_t(now)
                self._retire(live[at_now], h[place[at_now, first_end[at_now] + 1]])
        else:
            self._retire(live[closing_now])
        return True

    def _collect(self) -> list[FinishedGroup]:
        out = []
        for gid in self._done:
            left = self._left.pop(gid, None)
            if left is None:
                continue
            rows = [left[j] for j in range(self.k)]
            hidden = [r[4] for r in rows if r[4] is not None]
            out.append(FinishedGroup(
                gid=gid, tokens=[r[0] for r in rows], logprob=[r[1] for r in rows],
                sample_logprob=[r[2] for r in rows], finished=[r[3] for r in rows],
                eos_hidden=torch.stack(hidden) if len(hidden) == self.k else None,
            ))
        self._done = []
        return out

    @torch.inference_mode()
    def drop(self, gids: Sequence[int]) -> None:
        """Remove prompts ``gids`` now (their rows stop at once, their slots are free; nothing is
        reported for them)."""
        want = {int(g) for g in gids} & set(self._left)
        if not want:
            return
        for g in want:
            del self._left[g]
        self._done = [g for g in self._done if g not in want]
        for p, g in enumerate(self.prompt_gid):
            if g in want:
                self.prompt_gid[p] = -1
                self.alive[p * self.k:(p + 1) * self.k] = False
                self.closing[p * self.k:(p + 1) * self.k] = False


def _host(t: torch.Tensor) -> np.ndarray:
    """``t`` as a host array (a view of a CPU tensor)."""
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


def _pad_prompt(t: torch.Tensor, extra: int) -> torch.Tensor:
    """(2, P, H, C, dh) -> (2, P, H, extra + C, dh): zero prompt columns in front."""
    return torch.cat([t.new_zeros((*t.shape[:3], extra, t.shape[4])), t], 3)
