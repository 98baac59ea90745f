"""Iteration-level ("continuous") decoding: prompts join a running decode, finished rows leave it.

:func:`models.generate.decode` runs one batch from prefill to the last EOS: a prompt that arrives a
step later waits for the whole batch. :class:`ContinuousDecoder` keeps one running batch of rows
(``k`` rows per prompt, the candidates) and three operations, the scheduler step of vLLM's engine:

* :meth:`~ContinuousDecoder.admit` prefills newcomers (one left-padded batch of their own), samples
  their first token (the style token, under each prompt's own first-token bias) and appends their
  rows to the batch: they take part from the next :meth:`~ContinuousDecoder.step` on.
* :meth:`~ContinuousDecoder.step`: one token for every row (one forward over the whole batch), then
  sampling; a row that sampled EOS (or reached ``max_new_tokens``) feeds EOS once more, for the CTR
  head's hidden state, and leaves; a prompt whose ``k`` rows all left comes back as a
  :class:`FinishedGroup`.
* :meth:`~ContinuousDecoder.drop` removes a prompt's rows at once (its deadline passed).

The KV layout is the cascade one (:mod:`models.cascade`): the prompt's keys/values once per prompt
(padded to the longest prompt of the batch, the padding masked), the generated ones per row in a
preallocated buffer of ``max_new_tokens + 1`` columns. Rows joined at different steps, so every
row has its own write column and position (``glen``, ``pos``) and attends only to the columns it
wrote. Rows that left stay in the tensors (masked, their outputs ignored) until a quarter of the
batch is gone or newcomers are appended; then the batch is compacted in one copy. The sampling is
:func:`models.generate._sample` (top-k, then top-p on the survivors), so a row sees the same
distribution as in the static decode.

``static_shapes=True`` (the CUDA path) attends over all ``max_new_tokens + 1`` columns every step
instead of the columns written so far, so the step's shapes depend only on the number of rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from models import cascade
from models.generate import _sample, autocast_for
from models.sequences import left_pad, positions_from_mask


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
        compact_fraction: float = 0.25,
        static_shapes: bool = False,
    ) -> None:
        trunk = cascade._trunk(model)
        lm = cascade._lm_weight(model, trunk) if trunk is not None else None
        if trunk is None or lm is None or not cascade.supports(model):
            raise TypeError("ContinuousDecoder needs a GPT-2 trunk (see models.cascade.supports)")
        self.model, self.trunk, self.lm_weight = model, trunk, lm
        self.blocks: list[Any] = list(trunk.h)
        cfg = trunk.config
        self.n_head = int(cfg.n_head)
        self.head_dim = int(cfg.n_embd) // self.n_head
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.tanh_gelu = cfg.activation_function in cascade._TANH_GELUS
        self.n_layer = len(self.blocks)
        self.device = lm.device
        self.vocab = int(lm.shape[0])
        self.eos_id, self.pad_id, self.k = int(eos_id), int(pad_id), int(k)
        self.max_new = int(max_new_tokens)
        self.cap = self.max_new + 1  # generated columns per row: every token fed, EOS included
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.want_hidden = want_hidden
        self.stop = stop_mask.to(self.device) if stop_mask is not None else None
        self.compact_fraction = compact_fraction
        self.static_shapes = static_shapes
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(int(seed))
        self._dtype: torch.dtype | None = None
        self._empty()

    # ------------------------------------------------------------------ state
    def _empty(self) -> None:
        dev = self.device
        self.pk: list[torch.Tensor] = []  # (P, H, Lp, dh) per layer
        self.pv: list[torch.Tensor] = []
        self.p_bias: torch.Tensor | None = None  # (P, 1, 1, Lp)
        self.prompt_gid: list[int] = []  # gid of each prompt
        self.sk: list[torch.Tensor] = []  # (N, H, cap, dh) per layer
        self.sv: list[torch.Tensor] = []
        z = torch.zeros(0, dtype=torch.long, device=dev)
        self.row_prompt, self.row_slot, self.pos, self.glen, self.ntok = z, z.clone(), z.clone(), z.clone(), z.clone()
        self.pending = z.clone()
        self.alive = torch.zeros(0, dtype=torch.bool, device=dev)
        self.closing = self.alive.clone()
        self.fin = self.alive.clone()
        self.ban = torch.zeros((0, self.vocab), dtype=torch.float32, device=dev)
        self.tokens = torch.zeros((0, self.max_new), dtype=torch.long, device=dev)
        self.lp = torch.zeros(0, dtype=torch.float64, device=dev)
        self.slp = self.lp.clone()
        self.hidden_out: torch.Tensor | None = None  # (N, d)
        self._done: list[int] = []  # prompts (indices) whose rows all left, not yet reported
        self._t = 0  # generated columns attended this step
        self._gen_bias = torch.zeros((0, 1, 0), device=dev)

    @property
    def n_rows(self) -> int:
        """Rows in the tensors (live or waiting for compaction)."""
        return int(self.alive.shape[0])

    @property
    def live_rows(self) -> int:
        return int(self.alive.sum())

    def gids(self) -> list[int]:
        """Prompts still decoding (admitted, not finished, not dropped)."""
        if not self.prompt_gid:
            return []
        counts = torch.bincount(self.row_prompt[self.alive], minlength=len(self.prompt_gid)).tolist()
        return [g for g, c in zip(self.prompt_gid, counts, strict=True) if c > 0 and g >= 0]

    # ------------------------------------------------------------------ the blocks
    def _layers(self, x: torch.Tensor, attend: Any) -> torch.Tensor:
        return cascade.CascadeStepper._layers(self, x, attend)  # type: ignore[arg-type]

    def _prefill(self, rows: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                                torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values per layer (P, H, L, dh), p_bias (P, L) bool valid, last positions (P,), logits (P, V))."""
        ids, mask = left_pad(rows, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = positions_from_mask(mask)
        n, length = ids.shape
        valid = mask.bool()
        causal = torch.ones((length, length), dtype=torch.bool, device=self.device).tril()
        allowed = ((causal & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=self.device))[:, None]
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []

        def attend(layer: int, qkv: torch.Tensor) -> torch.Tensor:
            q, key, value = qkv.view(n, length, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
            keys.append(key.contiguous())
            values.append(value.contiguous())
            o = F.scaled_dot_product_attention(q, key, value, attn_mask=allowed)
            return o.transpose(1, 2).reshape(n * length, -1)

        tr = self.trunk
        x = (tr.wte(ids) + tr.wpe(pos)).reshape(n * length, -1)
        h = self._layers(x, attend).view(n, length, -1)[:, -1]
        return keys, values, valid, pos[:, -1], F.linear(h, self.lm_weight)

    # ------------------------------------------------------------------ admit
    @torch.no_grad()
    def admit(self, gids: Sequence[int], prompt_rows: Sequence[Sequence[int]], first_bias: torch.Tensor,
              ban: torch.Tensor) -> None:
        """Add prompts ``gids`` (ids of the caller's choosing, >= 0, unique among live prompts):
        ``first_bias`` (P, V) float added to the first token's logits (-inf: not allowed; the style
        tokens and the shopper's style tilt), ``ban`` (P, V) bool ids never sampled after the first."""
        if not gids:
            return
        if len(gids) != len(prompt_rows) or first_bias.shape[0] != len(gids) or ban.shape[0] != len(gids):
            raise ValueError("gids, prompt_rows, first_bias and ban differ in length")
        k, dev = self.k, self.device
        with autocast_for(dev):
            keys, values, valid, last_pos, logits = self._prefill(prompt_rows)
        self._compact(force=True)
        n_new = len(gids)
        dtype = keys[0].dtype
        self._dtype = dtype
        neg = torch.finfo(dtype).min
        bias_new = torch.zeros(valid.shape, dtype=dtype, device=dev).masked_fill_(~valid, neg)[:, None, None, :]
        if self.p_bias is None or not self.pk:
            self.pk, self.pv, self.p_bias = keys, values, bias_new
        else:
            width = max(self.pk[0].shape[2], keys[0].shape[2])

            self.pk = [torch.cat([_pad_len(a, width), _pad_len(b, width)]) for a, b in zip(self.pk, keys,
                                                                                             strict=True)]
            self.pv = [torch.cat([_pad_len(a, width), _pad_len(b, width)]) for a, b in zip(self.pv, values,
                                                                                             strict=True)]
            self.p_bias = torch.cat([_pad_bias(self.p_bias, width, neg), _pad_bias(bias_new, width, neg)])
        p0 = len(self.prompt_gid)
        self.prompt_gid.extend(int(g) for g in gids)
        n_rows = n_new * k
        d = self.n_head * self.head_dim
        new_sk = [torch.zeros((n_rows, self.n_head, self.cap, self.head_dim), dtype=dtype, device=dev)
                  for _ in range(self.n_layer)]
        self.sk = new_sk if not self.sk else [torch.cat([a, b]) for a, b in zip(self.sk, new_sk, strict=True)]
        new_sv = [torch.zeros_like(t) for t in new_sk]
        self.sv = new_sv if not self.sv else [torch.cat([a, b]) for a, b in zip(self.sv, new_sv, strict=True)]
        rp = (torch.arange(n_new, device=dev) + p0).repeat_interleave(k)
        self.row_prompt = torch.cat([self.row_prompt, rp])
        self.row_slot = torch.cat([self.row_slot, torch.arange(k, device=dev).repeat(n_new)])
        self.pos = torch.cat([self.pos, last_pos.repeat_interleave(k)])
        zeros = torch.zeros(n_rows, dtype=torch.long, device=dev)
        self.glen = torch.cat([self.glen, zeros])
        self.ntok = torch.cat([self.ntok, zeros])
        row_ban = torch.zeros((n_new, self.vocab), dtype=torch.float32, device=dev)
        row_ban[ban.to(dev)[:, : self.vocab]] = float("-inf")
        self.ban = torch.cat([self.ban, row_ban.repeat_interleave(k, 0)])
        self.tokens = torch.cat([self.tokens, torch.full((n_rows, self.max_new), -1, dtype=torch.long, device=dev)])
        self.lp = torch.cat([self.lp, torch.zeros(n_rows, dtype=torch.float64, device=dev)])
        self.slp = torch.cat([self.slp, torch.zeros(n_rows, dtype=torch.float64, device=dev)])
        f = torch.zeros(n_rows, dtype=torch.bool, device=dev)
        self.alive = torch.cat([self.alive, ~f])
        self.closing = torch.cat([self.closing, f])
        self.fin = torch.cat([self.fin, f.clone()])
        self.pending = torch.cat([self.pending, zeros.clone()])
        if self.want_hidden:
            hz = torch.zeros((n_rows, d), dtype=torch.float32, device=dev)
            self.hidden_out = hz if self.hidden_out is None else torch.cat([self.hidden_out, hz])
        # the first token: from the prefill's logits, under each prompt's first-token bias
        first = logits.float() + first_bias.to(device=dev, dtype=torch.float32)[:, : logits.shape[-1]]
        rows = torch.arange(self.n_rows - n_rows, self.n_rows, device=dev)
        self._sample_rows(rows, first.repeat_interleave(k, 0) if k > 1 else first, add_ban=False)

    # ------------------------------------------------------------------ step
    def _sample_rows(self, rows: torch.Tensor, logits: torch.Tensor, add_ban: bool = True) -> None:
        """Sample the next token of ``rows`` (all live, not closing) from ``logits`` (len(rows), V)."""
        if rows.numel() == 0:
            return
        x = logits.float()
        if add_ban:
            x = x + self.ban[rows]
        tok, tok_lp, tok_slp = _sample(x, self.temperature, self.top_k, self.top_p, self.gen)
        ends = tok == self.eos_id
        if self.stop is not None:
            ends = ends | self.stop[tok]
        self.lp[rows] += tok_lp.double()
        self.slp[rows] += tok_slp.double()
        keep = ~ends
        self.tokens[rows[keep], self.ntok[rows[keep]]] = tok[keep]
        self.ntok[rows] += keep.long()
        self.fin[rows[ends]] = True
        self.pending[rows] = tok
        closing = ends | (self.ntok[rows] >= self.max_new)  # truncated rows: EOS is forced for the CTR read
        self.closing[rows] = closing
        if not self.want_hidden:
            self._retire(rows[closing])

    def _retire(self, rows: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        self.alive[rows] = False
        self.closing[rows] = False
        prompts = torch.unique(self.row_prompt[rows])
        left = torch.bincount(self.row_prompt[self.alive], minlength=len(self.prompt_gid))
        for p in prompts.tolist():
            if int(left[p]) == 0 and self.prompt_gid[p] >= 0:
                self._done.append(p)

    def _attend(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        q, key, value = qkv.unbind(1)  # (N, H, dh)
        n = q.shape[0]
        rows = torch.arange(n, device=q.device)
        col = self.glen.clamp(max=self.cap - 1)
        self.sk[layer][rows, :, col] = key
        self.sv[layer][rows, :, col] = value
        t = self._t
        sk, sv = self.sk[layer][:, :, :t], self.sv[layer][:, :, :t]
        q = q * self.scale
        assert self.p_bias is not None
        pk, pv = self.pk[layer], self.pv[layer]
        s_pre = self._rows(torch.matmul(self._grid(q), pk.transpose(-1, -2)) + self.p_bias)
        s_gen = (sk * q[:, :, None, :]).sum(-1) + self._gen_bias
        p = torch.softmax(torch.cat([s_pre, s_gen], -1).float(), -1)
        p_pre, p_gen = p.split([pk.shape[2], t], -1)
        o_pre = self._rows(torch.matmul(self._grid(p_pre.to(pv.dtype)), pv))
        o_gen = torch.matmul(p_gen[:, :, None, :].to(sv.dtype), sv).squeeze(2)
        return (o_pre + o_gen).reshape(n, -1)

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        _, h, m = x.shape
        g = x.new_zeros((len(self.prompt_gid), h, self.k, m))
        g[self.row_prompt, :, self.row_slot] = x
        return g

    def _rows(self, g: torch.Tensor) -> torch.Tensor:
        return g[self.row_prompt, :, self.row_slot]

    @torch.no_grad()
    def step(self) -> list[FinishedGroup]:
        """One token for every live row; returns the prompts that finished (all ``k`` rows left)."""
        out = self._collect()
        if not bool(self.alive.any()):
            self._empty()
            return out
        self._compact()
        feed = torch.where(self.closing, torch.full_like(self.pending, self.eos_id), self.pending)
        col = self.glen.clamp(max=self.cap - 1)
        self._t = self.cap if self.static_shapes else int(col.max()) + 1
        cols = torch.arange(self._t, device=self.device)
        neg = torch.finfo(self._dtype or torch.float32).min
        self._gen_bias = torch.zeros((self.n_rows, 1, self._t), dtype=self._dtype or torch.float32,
                                     device=self.device).masked_fill_((cols[None, :] > col[:, None])[:, None], neg)
        with autocast_for(self.device):
            pos = (self.pos + 1).clamp(max=int(self.trunk.wpe.weight.shape[0]) - 1)
            h = self._layers(self.trunk.wte(feed) + self.trunk.wpe(pos), self._attend)
            logits = F.linear(h, self.lm_weight)
        self.pos = self.pos + self.alive.long()
        self.glen = self.glen + self.alive.long()
        closing = (self.closing & self.alive).nonzero().squeeze(1)
        if self.want_hidden and closing.numel():
            assert self.hidden_out is not None
            self.hidden_out[closing] = h[closing].float()
        self._retire(closing)
        live = (self.alive & ~self.closing).nonzero().squeeze(1)
        self._sample_rows(live, logits[live])
        return out + self._collect()

    def _collect(self) -> list[FinishedGroup]:
        if not self._done:
            return []
        out = []
        k = self.k
        for p in self._done:
            gid = self.prompt_gid[p]
            if gid < 0:
                continue
            rows = (self.row_prompt == p).nonzero().squeeze(1)
            rows = rows[torch.argsort(self.row_slot[rows])]
            if rows.numel() != k:  # cannot happen: a prompt's rows leave the tensors together
                raise RuntimeError(f"prompt {gid} has {rows.numel()} rows, not {k}")
            toks = self.tokens[rows].tolist()
            out.append(FinishedGroup(
                gid=gid, tokens=[[t for t in r if t >= 0] for r in toks], logprob=self.lp[rows].tolist(),
                sample_logprob=self.slp[rows].tolist(), finished=self.fin[rows].tolist(),
                eos_hidden=None if self.hidden_out is None else self.hidden_out[rows].clone(),
            ))
            self.prompt_gid[p] = -1  # reported: its rows are compacted away
        self._done = []
        return out

    # ------------------------------------------------------------------ drop / compact
    def drop(self, gids: Sequence[int]) -> None:
        """Remove prompts ``gids`` now (their rows stop at once; nothing is reported for them)."""
        want = set(int(g) for g in gids)
        if not want:
            return
        idx = [p for p, g in enumerate(self.prompt_gid) if g in want]
        if not idx:
            return
        for p in idx:
            self.prompt_gid[p] = -1
        gone = torch.isin(self.row_prompt, torch.tensor(idx, device=self.device))
        self.alive &= ~gone
        self.closing &= ~gone
        self._done = [p for p in self._done if self.prompt_gid[p] >= 0]

    def _compact(self, force: bool = False) -> None:
        """Drop left rows (and prompts without rows) from the tensors when enough are gone."""
        n = self.n_rows
        if n == 0:
            return
        dead = n - self.live_rows
        keep_prompt_rows = self.alive.clone()
        # a prompt reported or dropped loses its rows; a prompt whose rows all left but not yet reported keeps them
        pending = set(self._done)
        if pending:
            keep_prompt_rows |= torch.isin(self.row_prompt, torch.tensor(sorted(pending), device=self.device))
        dead = n - int(keep_prompt_rows.sum())
        if dead == 0 or (not force and dead < self.compact_fraction * n):
            return
        keep = keep_prompt_rows.nonzero().squeeze(1)
        self.sk = [s.index_select(0, keep) for s in self.sk]
        self.sv = [s.index_select(0, keep) for s in self.sv]
        for name in ("row_slot", "pos", "glen", "ntok", "pending", "alive", "closing", "fin", "ban", "tokens",
                     "lp", "slp"):
            setattr(self, name, getattr(self, name).index_select(0, keep))
        if self.hidden_out is not None:
            self.hidden_out = self.hidden_out.index_select(0, keep)
        rp = self.row_prompt.index_select(0, keep)
        live = torch.unique(rp)
        remap = torch.full((len(self.prompt_gid),), -1, dtype=torch.long, device=self.device)
        remap[live] = torch.arange(live.shape[0], device=self.device)
        self.row_prompt = remap[rp]
        self.pk = [t.index_select(0, live) for t in self.pk]
        self.pv = [t.index_select(0, live) for t in self.pv]
        if self.p_bias is not None:
            self.p_bias = self.p_bias.index_select(0, live)
        lv = live.tolist()
        old_gid = self.prompt_gid
        self.prompt_gid = [old_gid[p] for p in lv]
        rm = remap.tolist()
        self._done = [rm[p] for p in self._done]


def _pad_len(t: torch.Tensor, width: int) -> torch.Tensor:
    """(P, H, L, dh) -> (P, H, width, dh), zeros appended."""
    extra = width - t.shape[2]
    if extra <= 0:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], t.shape[1], extra, t.shape[3]))], 2)


def _pad_bias(b: torch.Tensor, width: int, neg: float) -> torch.Tensor:
    """(P, 1, 1, L) -> (P, 1, 1, width), masked columns appended."""
    extra = width - b.shape[-1]
    if extra <= 0:
        return b
    return torch.cat([b, b.new_full((b.shape[0], 1, 1, extra), neg)], -1)
