"""The continuous decoder's step, prefill and sampling as TorchScript functions: no Python between their operations.

A CPU step of a few rows is ~100 small operations; called from Python each costs its dispatch, and
an int8 product, whose packed weight is a TorchScript object, costs most (the object crosses from
Python to C++ at every call). :func:`step_forward` is :meth:`models.continuous.ContinuousDecoder._forward`
and :func:`prefill_forward` the forward of its ``_prefill`` (the same operations in the same order:
tests compare them), compiled by ``torch.jit.script`` once per process, on first use. CPU only;
tanh-GELU trunks only (the others take the eager forwards). With ``fused`` the step attends and writes
its cache through ``torch.ops.livecopy.attend`` and both run their GELU through
``torch.ops.livecopy.gelu_tanh_`` (models/cpu_ops.py: compiled loops, registered before scripting).
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from models import cpu_ops

log = logging.getLogger(__name__)

def _lin(x: Tensor, i: int,
         packed: list[torch.classes.quantized.LinearPackedParamsBase],  # type: ignore[name-defined]
         w: list[Tensor], b: list[Tensor]) -> Tensor:
    """Product ``i``: int8 when ``packed`` is given, else fp32."""
    if len(packed) > 0:
        return torch.ops.quantized.linear_dynamic(x, packed[i], True)
    return torch.addmm(b[i], x, w[i])


def _forward(feed: Tensor, pos: Tensor, col: Tensor, t: int, rows: Tensor | None, per_row: int,
             row_p: Tensor, row_j: Tensor, p_bias: Tensor, kv: list[Tensor], lc: int, k: int, neg: float,
             scale: float, n_head: int, wte: Tensor, wpe: Tensor, ln_w: list[Tensor], ln_b: list[Tensor],
             eps: list[float],
             packed: list[torch.classes.quantized.LinearPackedParamsBase],  # type: ignore[name-defined]
             w: list[Tensor], b: list[Tensor], fused: bool = False) -> tuple[Tensor, Tensor]:
    """Arguments as the decoder holds them; products from ``packed`` (int8: 4 per block, then the LM
    head) or, when it is empty, from ``w`` / ``b`` (fp32, (in, out); the LM head's bias unused).
    ``fused``: ``kv`` and ``p_bias`` are the whole caches and ``lc`` their prompt columns (no window),
    and attention and GELU run as :mod:`models.cpu_ops`' loops."""
    if fused:
        return _fused_forward(feed, pos, col, rows, per_row, row_p, row_j, p_bias, kv, lc, k, scale, wte, wpe, ln_w,
                              ln_b, eps, packed, w, b)
    n = feed.shape[0]
    hi = n // (k * per_row)
    width = lc + t * k
    rp = row_p[:n // per_row]
    rj = row_j[:n // per_row]
    if per_row > 1:
        rp = rp.repeat_interleave(per_row)
        rj = rj.repeat_interleave(per_row)
    write = lc + col * k + rj
    cc = torch.arange(t * k, device=feed.device)
    mine = ((cc % k)[None, :] == rj[:, None]) & ((cc // k)[None, :] <= col[:, None])
    gen = torch.zeros(mine.shape, dtype=p_bias.dtype, device=feed.device).masked_fill_(~mine, neg)
    kq = k * per_row
    mask = torch.cat([p_bias[:hi].expand(hi, 1, kq, lc), gen.view(hi, 1, kq, t * k)], -1)
    d = wte.shape[1]
    dh = d // n_head
    grid: Tensor | None = None
    if rows is not None:
        feed, pos, rp, write = feed[rows], pos[rows], rp[rows], write[rows]
        mask = mask.view(n, width)[rows]
        if hi == 1:  # one slot: its computed places are its queries, in order
            kq = rows.shape[0]
            mask = mask.view(1, 1, kq, width)
        else:
            # the computed places packed slot by slot into kq queries a slot, as many as its most (zero queries past)
            slot = rows // kq
            counts = torch.bincount(slot, minlength=hi)
            start = counts.cumsum(0) - counts
            kq = int(counts.max().item())
            g = slot * kq + torch.arange(rows.shape[0], device=feed.device) - start[slot]
            mask = mask.new_zeros((hi * kq, width)).index_copy_(0, g, mask).view(hi, 1, kq, width)
            grid = g
    x = F.embedding(feed, wte) + F.embedding(pos, wpe)
    m = x.shape[0]
    for layer in range(len(kv)):
        j = 4 * layer
        h = F.layer_norm(x, [d], ln_w[2 * layer], ln_b[2 * layer], eps[2 * layer])
        qkv = _lin(h, j, packed, w, b).view(m, 3, n_head, dh)
        cache = kv[layer]
        cache[:, rp, :, write] = qkv[:, 1:].to(cache.dtype)
        q = qkv[:, 0]
        if grid is not None:
            q = q.new_zeros((hi * kq, n_head, dh)).index_copy_(0, grid, q)
        q = q.view(hi, kq, n_head, dh).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, cache[0, :hi, :, :width], cache[1, :hi, :, :width],
                                           attn_mask=mask, scale=scale)
        o = o.transpose(1, 2).reshape(hi * kq, d)
        if grid is not None:
            o = o.index_select(0, grid)
        x = x + _lin(o, j + 1, packed, w, b)
        h = F.layer_norm(x, [d], ln_w[2 * layer + 1], ln_b[2 * layer + 1], eps[2 * layer + 1])
        f = _lin(h, j + 2, packed, w, b)
        if m < 12:
            f = F.gelu(f, approximate="tanh")
        else:  # models.cascade.gelu_tanh: the same function through sigmoid (torch's CPU tanh is slow)
            y = f * f
            f = y.mul_(0.0713548162726009).add_(1.5957691216057308).mul_(f).sigmoid_().mul_(f)
        x = x + _lin(f, j + 3, packed, w, b)
    h = F.layer_norm(x, [d], ln_w[-1], ln_b[-1], eps[-1])
    return h, _lin(h, 4 * len(kv), packed, w, b)


def _fused_forward(feed: Tensor, pos: Tensor, col: Tensor, rows: Tensor | None, per_row: int, row_p: Tensor,
                   row_j: Tensor, p_bias: Tensor, kv: list[Tensor], lcap: int, k: int, scale: float, wte: Tensor,
                   wpe: Tensor, ln_w: list[Tensor], ln_b: list[Tensor], eps: list[float],
                   packed: list[torch.classes.quantized.LinearPackedParamsBase],  # type: ignore[name-defined]
                   w: list[Tensor], b: list[Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`_forward` with ``fused``: each computed place attends to its prompt's and its own row's
    columns only (``torch.ops.livecopy.attend``, which writes its key and value first), no mask."""
    n = feed.shape[0]
    rp = row_p[:n // per_row]
    rj = row_j[:n // per_row]
    if per_row > 1:
        rp = rp.repeat_interleave(per_row)
        rj = rj.repeat_interleave(per_row)
    if rows is not None:
        feed, pos, rp, rj, col = feed[rows], pos[rows], rp[rows], rj[rows], col[rows]
    d = wte.shape[1]
    x = F.embedding(feed, wte) + F.embedding(pos, wpe)
    for layer in range(len(kv)):
        j = 4 * layer
        h = F.layer_norm(x, [d], ln_w[2 * layer], ln_b[2 * layer], eps[2 * layer])
        o = torch.ops.livecopy.attend(_lin(h, j, packed, w, b), kv[layer], p_bias, rp, rj, col, lcap, k, scale)
        x = x + _lin(o, j + 1, packed, w, b)
        h = F.layer_norm(x, [d], ln_w[2 * layer + 1], ln_b[2 * layer + 1], eps[2 * layer + 1])
        x = x + _lin(torch.ops.livecopy.gelu_tanh_(_lin(h, j + 2, packed, w, b)), j + 3, packed, w, b)
    h = F.layer_norm(x, [d], ln_w[-1], ln_b[-1], eps[-1])
    return h, _lin(h, 4 * len(kv), packed, w, b)


def _prefill(ids: Tensor, pos: Tensor, allowed: Tensor, past: Tensor | None, cached: Tensor | None, n_head: int,
             wte: Tensor, wpe: Tensor, ln_w: list[Tensor], ln_b: list[Tensor], eps: list[float],
             packed: list[torch.classes.quantized.LinearPackedParamsBase],  # type: ignore[name-defined]
             w: list[Tensor], b: list[Tensor], fused: bool = False) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """:meth:`models.continuous.ContinuousDecoder._prefill`'s forward: prompts ``ids`` (P, L) at ``pos``,
    each query's ``allowed`` keys (P, 1, L, W), the keys/values ``past`` (2, layers, P, H, W, dh)
    reused where ``cached`` (P, 1, W, 1); the computed tokens are the last ``L`` columns. Returns the
    keys and values per layer (P, H, W, dh) and the last position's logits (P, V). ``fused``: the GELU
    through ``torch.ops.livecopy.gelu_tanh_``."""
    n, length = ids.shape[0], ids.shape[1]
    width = allowed.shape[-1]
    d = wte.shape[1]
    dh = d // n_head
    x = (F.embedding(ids, wte) + F.embedding(pos, wpe)).reshape(n * length, d)
    m = x.shape[0]
    keys: list[Tensor] = []
    values: list[Tensor] = []
    for layer in range(len(ln_w) // 2):
        j = 4 * layer
        h = F.layer_norm(x, [d], ln_w[2 * layer], ln_b[2 * layer], eps[2 * layer])
        qkv = _lin(h, j, packed, w, b).view(n, length, 3, n_head, dh).permute(2, 0, 3, 1, 4)
        q, key, value = qkv[0], qkv[1], qkv[2]
        if width > length:
            key = torch.cat([key.new_zeros((n, n_head, width - length, dh)), key], 2)
            value = torch.cat([value.new_zeros((n, n_head, width - length, dh)), value], 2)
        if past is not None and cached is not None:
            key = torch.where(cached, past[0, layer].to(key.dtype), key)
            value = torch.where(cached, past[1, layer].to(value.dtype), value)
        keys.append(key)
        values.append(value)
        o = F.scaled_dot_product_attention(q, key, value, attn_mask=allowed)
        x = x + _lin(o.transpose(1, 2).reshape(m, d), j + 1, packed, w, b)
        h = F.layer_norm(x, [d], ln_w[2 * layer + 1], ln_b[2 * layer + 1], eps[2 * layer + 1])
        f = _lin(h, j + 2, packed, w, b)
        if fused:
            f = torch.ops.livecopy.gelu_tanh_(f)
        elif m < 12:
            f = F.gelu(f, approximate="tanh")
        else:  # models.cascade.gelu_tanh
            y = f * f
            f = y.mul_(0.0713548162726009).add_(1.5957691216057308).mul_(f).sigmoid_().mul_(f)
        x = x + _lin(f, j + 3, packed, w, b)
    last = x.view(n, length, d)[:, -1]
    h = F.layer_norm(last, [d], ln_w[-1], ln_b[-1], eps[-1])
    return keys, values, _lin(h, 4 * len(keys), packed, w, b)


def _script(fn: Any) -> Any:
    try:
        with warnings.catch_warnings():  # deprecated in torch 2.x (still shipped): torch.compile cannot
            warnings.simplefilter("ignore")  # trace the packed int8 weights, so this is the fast CPU path
            return torch.jit.script(fn)
    except Exception as exc:  # any failure means: run eagerly
        log.warning("%s did not compile as TorchScript (%s: %s); running it eagerly", fn.__name__,
                    type(exc).__name__, exc)
        return None


@functools.cache
def step_forward() -> Any:
    """:func:`_forward` scripted (once per process; ~30 ms), or None where TorchScript cannot compile
    it (logged once; the decoder then runs its eager forward)."""
    cpu_ops.register()  # the ops it calls must exist when it compiles
    return _script(_forward)


@functools.cache
def prefill_forward() -> Any:
    """:func:`_prefill` scripted (once per process), or None (the decoder then prefills eagerly)."""
    cpu_ops.register()
    return _script(_prefill)
