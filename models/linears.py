"""The decode's matrix products over a GPT-2 trunk: fp32 on the weights, or int8 packed for fbgemm.

:func:`linears` gives, per block, ``qkv``, ``attn_proj``, ``fc`` and ``mlp_proj`` (``x -> x W + b``)
and the LM head (``h -> logits``) of a model, built once per model and weights state (cached; a
weight changed in place or replaced is seen and packed again). ``weights="int8"`` packs each
weight per output channel to int8 (``torch.ops.quantized.linear_prepack``, fbgemm) and quantizes
the activations per call (dynamic, 7-bit range: safe without VNNI); the layer norms, attention,
GELU, the CTR head and the sampling stay fp32. On this CPU the decode is bound by reading the
weights (fp32: 21.6 MB a step, more than the L3), so a quarter of the bytes is what speeds it up
(docs/generation.md). CPU only; where fbgemm is missing or packing fails, fp32 (logged once).
"""

from __future__ import annotations

import logging
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

Weights = Literal["fp32", "int8"]
Linear = Callable[[torch.Tensor], torch.Tensor]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Linears:
    """``blocks[i] = (qkv, attn_proj, fc, mlp_proj)`` of block ``i``; ``lm`` the LM head. ``packed``
    (int8: the packed weights, blocks' four each then the LM head's) or ``weights`` / ``biases``
    (fp32: (in, out) weights and biases in that order; the LM head's bias a zero) are what the
    products use, for a caller that runs them itself (models/scripted.py)."""

    kind: str
    blocks: tuple[tuple[Linear, Linear, Linear, Linear], ...]
    lm: Linear
    packed: tuple[Any, ...] = ()
    weights: tuple[torch.Tensor, ...] = ()
    biases: tuple[torch.Tensor, ...] = ()


def int8_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def _fp32(w_in_out: torch.Tensor, bias: torch.Tensor | None) -> tuple[Linear, Any]:
    if bias is None:
        return (lambda x: torch.mm(x, w_in_out)), (w_in_out, w_in_out.new_zeros(w_in_out.shape[1]))
    return (lambda x: torch.addmm(bias, x, w_in_out)), (w_in_out, bias)


def _int8(w_in_out: torch.Tensor, bias: torch.Tensor | None) -> tuple[Linear, Any]:
    w = w_in_out.detach().t().contiguous().float()  # (out, in)
    scale = (w.abs().amax(1).clamp_min(1e-12) / 127.0).double()
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch; the packed op is what we use
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())
    op = torch.ops.quantized.linear_dynamic.default  # the overload: the packet re-checks its arguments per call
    return (lambda x: op(x, packed, True)), packed


def _build(trunk: Any, lm_weight: torch.Tensor, kind: str) -> Linears:
    make = _int8 if kind == "int8" else _fp32
    made = [make(w, bias) for b in trunk.h for w, bias in (
        (b.attn.c_attn.weight, b.attn.c_attn.bias), (b.attn.c_proj.weight, b.attn.c_proj.bias),
        (b.mlp.c_fc.weight, b.mlp.c_fc.bias), (b.mlp.c_proj.weight, b.mlp.c_proj.bias))]
    made.append(make(lm_weight.t(), None))
    fns = [f for f, _ in made]
    blocks = tuple((fns[i], fns[i + 1], fns[i + 2], fns[i + 3]) for i in range(0, len(fns) - 1, 4))
    raw = [r for _, r in made]
    if kind == "int8":
        return Linears(kind, blocks, fns[-1], packed=tuple(raw))
    return Linears(kind, blocks, fns[-1], weights=tuple(w for w, _ in raw), biases=tuple(b for _, b in raw))


_cache: weakref.WeakKeyDictionary[Any, dict[str, tuple[tuple[Any, ...], Linears]]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_warned: set[str] = set()


def _state(trunk: Any, lm_weight: torch.Tensor) -> tuple[Any, ...]:
    """Identity and in-place version of every weight the products read."""
    ts = [p for b in trunk.h for p in (b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
                                       b.attn.c_proj.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias,
                                       b.mlp.c_proj.weight, b.mlp.c_proj.bias)]
    ts.append(lm_weight)
    return tuple((id(t), t._version) for t in ts)


def linears(trunk: Any, lm_weight: torch.Tensor, weights: str = "fp32") -> Linears:
    """The products of ``trunk`` + ``lm_weight`` with ``weights`` (``int8``: CPU tensors only, else fp32)."""
    kind = "int8" if weights == "int8" and lm_weight.device.type == "cpu" and int8_available() else "fp32"
    if weights == "int8" and kind != "int8" and lm_weight.device.type == "cpu" and "fbgemm" not in _warned:
        _warned.add("fbgemm")
        log.warning("int8 decode weights need torch's fbgemm engine; decoding with fp32 weights")
    state = _state(trunk, lm_weight)
    with _lock:
        hit = _cache.get(trunk, {}).get(kind)
        if hit is not None and hit[0] == state:
            return hit[1]
    try:
        built = _build(trunk, lm_weight, kind)
    except (RuntimeError, AttributeError) as exc:  # a torch without the quantized ops
        if kind != "int8":
            raise
        if "pack" not in _warned:
            _warned.add("pack")
            log.warning("int8 decode weights failed to pack (%s); decoding with fp32 weights", exc)
        return linears(trunk, lm_weight, "fp32")
    with _lock:
        _cache.setdefault(trunk, {})[kind] = (state, built)
    return built
