"""A lean decode step for GPT-2 trunks with shared-prefix ("cascade") attention.

``generate_candidates`` samples ``k`` candidates per prompt. Every candidate of a prompt attends
to the same prompt keys/values, so the generic path (repeat the prompt's cache ``k`` times, one
SDPA call over prompt + generated positions per row) reads the prompt's cache ``k`` times per
layer per step; at 32 prompts x 4 candidates on a CPU that attention was a third of the step.

:class:`CascadeStepper` keeps the prompt's keys/values once per prompt and the generated ones per
row. Attention at a step is one softmax over both parts: the prompt part as a small matrix
product of the prompt's ``k`` queries with its keys (read once), the generated part per row,
and the two value sums added. It runs the prefill (SDPA with a causal + left-padding mask) and
the GPT-2 blocks straight on the weights, without the per-call plumbing of the ``transformers``
modules, with the fused tanh GELU (``gelu_new`` is the same function).

Numerically it is the same model up to float rounding (the tests compare logits and hidden
states with the ``transformers`` forward). Only for trunks :func:`supports` accepts: GPT-2 blocks
without cross-attention or the attention-scaling variants; anything else takes the generic path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel, GPT2Model

from models.linears import linears

_TANH_GELUS = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


def _trunk(model: Any) -> GPT2Model | None:
    trunk = getattr(model, "transformer", None)
    return trunk if isinstance(trunk, GPT2Model) else None


def _lm_weight(model: Any, trunk: GPT2Model) -> torch.Tensor | None:
    if isinstance(model, GPT2LMHeadModel):
        return model.lm_head.weight if model.lm_head.bias is None else None
    if hasattr(model, "ctr_from_hidden"):  # the student: LM head tied to the embedding
        return trunk.wte.weight
    return None


def supports(model: Any) -> bool:
    """True when ``model`` is a GPT-2 trunk this step reproduces exactly (the student, GPT-2 LMs)."""
    trunk = _trunk(model)
    if trunk is None or _lm_weight(model, trunk) is None:
        return False
    cfg = trunk.config
    return not (
        getattr(cfg, "add_cross_attention", False)
        or getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
        or getattr(cfg, "reorder_and_upcast_attn", False)
        or not getattr(cfg, "scale_attn_weights", True)
    )


_GELU_K1 = 2.0 * math.sqrt(2.0 / math.pi)
_GELU_K3 = _GELU_K1 * 0.044715


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU. From 12 rows on, as ``x * sigmoid(2c(x + 0.044715 x^3))`` (the same
    function: 0.5(1 + tanh(z)) = sigmoid(2z)), in place: torch's CPU tanh is slow, 2.3x the time
    at 128 rows of 1,024 on this CPU; for fewer rows the fused kernel's one call wins."""
    if x.shape[0] < 12 or x.requires_grad:
        return F.gelu(x, approximate="tanh")
    y = x * x
    return y.mul_(_GELU_K3).add_(_GELU_K1).mul_(x).sigmoid_().mul_(x)


Norm = tuple[tuple[int, ...], torch.Tensor, torch.Tensor, float]


def norms(trunk: GPT2Model) -> tuple[list[tuple[Norm, Norm]], Norm]:
    """``F.layer_norm`` arguments (after ``x``) of each block's ``ln_1``, ``ln_2``, and of ``ln_f``."""
    def args(ln: Any) -> Norm:
        return tuple(ln.normalized_shape), ln.weight, ln.bias, ln.eps

    return [(args(b.ln_1), args(b.ln_2)) for b in trunk.h], args(trunk.ln_f)


class CascadeStepper:
    """Prefill ``ids`` (left-padded prompts, ``mask``, ``pos``), then decode ``k`` rows per
    prompt: rows ``i*k .. i*k+k-1`` belong to prompt ``i``. :meth:`step` feeds one token per
    current row; :meth:`select` keeps a subset of the current rows (finished ones dropped).
    ``logits`` holds the last logits per current row; ``hidden`` the last final hidden state
    (after ``ln_f``) when the step was asked for it."""

    def __init__(self, model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, k: int,
                 max_new: int, weights: str = "fp32") -> None:
        trunk = _trunk(model)
        lm = _lm_weight(model, trunk) if trunk is not None else None
        if trunk is None or lm is None:
            raise TypeError("CascadeStepper needs a GPT-2 trunk (see cascade.supports)")
        self.trunk, self.lm_weight = trunk, lm
        self.blocks: list[Any] = list(trunk.h)
        self.lin = linears(trunk, lm, weights)
        self.norms = norms(trunk)
        cfg = trunk.config
        self.n_head = int(cfg.n_head)
        self.head_dim = int(cfg.n_embd) // self.n_head
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.tanh_gelu = cfg.activation_function in _TANH_GELUS
        self.k = k
        self.cap = max_new
        self.pk: list[torch.Tensor] = []  # (P, H, Lp, dh) prompt keys/values, once per prompt
        self.pv: list[torch.Tensor] = []
        self.sk: list[torch.Tensor] = []  # (N, H, cap, dh) generated keys per row
        self.sv: list[torch.Tensor] = []  # (N, H, cap, dh) generated values per row
        self.t = 0  # generated positions written
        self.hidden: torch.Tensor | None = None
        self.logits = self._prefill(ids, mask, pos)
        n_prompts = ids.shape[0]
        self.pos = pos[:, -1].repeat_interleave(k, 0)
        self.row_prompt = torch.arange(n_prompts, device=ids.device).repeat_interleave(k)
        self.row_slot = torch.arange(k, device=ids.device).repeat(n_prompts)
        self.dense = True  # rows are the whole (prompt, slot) grid in order

    @property
    def n_prompts(self) -> int:
        return self.pk[0].shape[0]

    def _layers(self, x: torch.Tensor, attend: Any) -> torch.Tensor:
        """The GPT-2 blocks and ``ln_f`` over rows ``x`` (R, d); ``attend(layer, qkv (R, 3, H, dh))``
        returns the attention output (R, d)."""
        n = x.shape[0]
        for i, (b, (qkv, attn_proj, fc, mlp_proj), (ln1, ln2)) in enumerate(
                zip(self.blocks, self.lin.blocks, self.norms[0], strict=True)):
            o = attend(i, qkv(F.layer_norm(x, *ln1)).view(n, 3, self.n_head, self.head_dim))
            x = x + attn_proj(o)
            m = fc(F.layer_norm(x, *ln2))
            m = gelu_tanh(m) if self.tanh_gelu else b.mlp.act(m)
            x = x + mlp_proj(m)
        return F.layer_norm(x, *self.norms[1])

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Run the prompts, keep their keys/values, return the last position's logits per row."""
        n_prompts, length = ids.shape
        valid = mask.bool()
        causal = torch.ones((length, length), dtype=torch.bool, device=ids.device).tril()
        # a query sees earlier non-pad keys; a pad query sees itself (its output is never used)
        allowed = (causal & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=ids.device)
        allowed = allowed[:, None]  # (P, 1, L, L)
        tr = self.trunk

        def attend(layer: int, qkv: torch.Tensor) -> torch.Tensor:
            q, key, value = qkv.view(n_prompts, length, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
            self.pk.append(key.contiguous())
            self.pv.append(value.contiguous())
            o = F.scaled_dot_product_attention(q, key, value, attn_mask=allowed)
            return o.transpose(1, 2).reshape(n_prompts * length, -1)

        x = (tr.wte(ids) + tr.wpe(pos)).reshape(n_prompts * length, -1)
        h = self._layers(x, attend).view(n_prompts, length, -1)[:, -1]
        neg = torch.finfo(self.pk[0].dtype).min
        self.p_bias = torch.zeros(mask.shape, dtype=self.pk[0].dtype, device=ids.device)
        self.p_bias.masked_fill_(~valid, neg)
        self.p_bias = self.p_bias[:, None, None, :]  # (P, 1, 1, Lp): over heads and slots
        logits = self.lin.lm(h)
        return logits.repeat_interleave(self.k, 0) if self.k > 1 else logits

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, m) per row -> (P, H, k, m) per prompt (zeros where a row is gone)."""
        _, h, m = x.shape
        if self.dense:
            return x.view(self.n_prompts, self.k, h, m).transpose(1, 2)
        g = x.new_zeros((self.n_prompts, h, self.k, m))
        g[self.row_prompt, :, self.row_slot] = x
        return g

    def _rows(self, g: torch.Tensor) -> torch.Tensor:
        """(P, H, k, m) -> (N, H, m) for the current rows."""
        if self.dense:
            p, h, k, m = g.shape
            return g.transpose(1, 2).reshape(p * k, h, m)
        return g[self.row_prompt, :, self.row_slot]

    def _attend(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """Attention of each row's query over its prompt and its generated tokens."""
        q, key, value = qkv.unbind(1)  # (N, H, dh) each
        n = q.shape[0]
        if len(self.sv) <= layer:
            self.sk.append(key.new_empty((n, self.n_head, self.cap, self.head_dim)))
            self.sv.append(value.new_empty((n, self.n_head, self.cap, self.head_dim)))
        if self.t >= self.sv[layer].shape[2]:
            self.sk[layer] = torch.cat([self.sk[layer], torch.empty_like(self.sk[layer])], 2)
            self.sv[layer] = torch.cat([self.sv[layer], torch.empty_like(self.sv[layer])], 2)
        self.sk[layer][:, :, self.t] = key
        self.sv[layer][:, :, self.t] = value
        sk = self.sk[layer][:, :, : self.t + 1]
        sv = self.sv[layer][:, :, : self.t + 1]
        q = q * self.scale
        pk, pv = self.pk[layer], self.pv[layer]
        s_pre = self._rows(torch.matmul(self._grid(q), pk.transpose(-1, -2)) + self.p_bias)
        s_gen = (sk * q[:, :, None, :]).sum(-1)  # (N, H, T): a product-sum beats a batched GEMV here
        p = torch.softmax(torch.cat([s_pre, s_gen], -1).float(), -1)
        p_pre, p_gen = p.split([pk.shape[2], sv.shape[2]], -1)
        o_pre = self._rows(torch.matmul(self._grid(p_pre.to(pv.dtype)), pv))
        o_gen = torch.matmul(p_gen[:, :, None, :].to(sv.dtype), sv).squeeze(2)
        return (o_pre + o_gen).reshape(n, -1)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, want_hidden: bool) -> torch.Tensor:
        """Feed one token per current row; returns the next logits (N, V)."""
        self.pos = self.pos + 1
        h = self._layers(self.trunk.wte(tokens) + self.trunk.wpe(self.pos), self._attend)
        self.t += 1
        self.hidden = h if want_hidden else None
        self.logits = self.lin.lm(h)
        return self.logits

    def select(self, keep: torch.Tensor) -> None:
        """Keep rows ``keep`` (indices into the current rows, ascending); prompts with no row
        left drop their prompt cache."""
        self.sk = [s.index_select(0, keep) for s in self.sk]
        self.sv = [s.index_select(0, keep) for s in self.sv]
        self.pos, self.logits = self.pos[keep], self.logits[keep]
        self.row_prompt, self.row_slot = self.row_prompt[keep], self.row_slot[keep]
        self.dense = False
        live = torch.unique(self.row_prompt)
        if live.shape[0] < self.n_prompts:
            remap = torch.full((self.n_prompts,), -1, dtype=torch.long, device=live.device)
            remap[live] = torch.arange(live.shape[0], device=live.device)
            self.pk = [t.index_select(0, live) for t in self.pk]
            self.pv = [t.index_select(0, live) for t in self.pv]
            self.p_bias = self.p_bias.index_select(0, live)
            self.row_prompt = remap[self.row_prompt]
