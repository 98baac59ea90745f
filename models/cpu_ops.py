"""The CPU decode step's attention (with its cache write) and tanh-GELU as compiled loops (numba), as torch ops.

:func:`register` defines ``torch.ops.livecopy.attend`` (each computed place attends to its prompt's
columns and its own row's, nothing else) and ``torch.ops.livecopy.gelu_tanh_``, which the
TorchScript step (models/scripted.py) calls between its int8 products. Why and what it gained:
docs/generation.md.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.cpu_emit import compiled

log = logging.getLogger(__name__)


@compiled(fastmath=True, error_model="numpy", inline="always")
def _exp_le0(x: np.float32) -> np.float32:  # pragma: no cover (compiled)
    """exp(x) for x <= 0 (float32; x clamped at -30, where exp is below 1e-13): (its Taylor series to
    degree 8 at x / 64) ** 64, relative error ~1e-7: arithmetic only, so the loops calling it run a
    vector of lanes at a time."""
    a = max(x, np.float32(-30.0)) * np.float32(0.015625)
    e = np.float32(1 / 720) + a * (np.float32(1 / 5040) + a * np.float32(1 / 40320))
    e = np.float32(1.0) + a * (np.float32(1.0) + a * (np.float32(0.5) + a * (np.float32(1 / 6) + a * (
        np.float32(1 / 24) + a * (np.float32(1 / 120) + a * e)))))
    e = e * e
    e = e * e
    e = e * e
    e = e * e
    e = e * e
    return e * e


@compiled(fastmath=True, error_model="numpy")
def _gelu_tanh(x: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``x`` (flat) in place: x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3)), which is tanh-GELU,
    the sigmoid from exp(-|z|)."""
    one = np.float32(1.0)
    c1 = np.float32(1.5957691216057308)
    c3 = np.float32(0.0713548162726009)
    for i in range(x.shape[0]):
        v = x[i]
        z = v * (c1 + c3 * v * v)
        e = _exp_le0(z if z < np.float32(0.0) else -z)
        r = one / (one + e)
        x[i] = v * (r if z >= np.float32(0.0) else e * r)


@compiled(fastmath=True, error_model="numpy")
def _attend(qkv, cache, p_bias, slot, row_j, col, lcap, k, scale, out):  # pragma: no cover (compiled)
    """Places ``i`` (``qkv`` (m, 3, H, D)) of prompt slot ``slot[i]``, its row ``row_j[i]`` at the
    row's column ``col[i]``: write the key and value at cache column ``lcap + col * k + row_j``, then
    ``out[i]`` (m, H * D) = softmax over the slot's prompt columns (``p_bias[slot] == 0``: a
    right-aligned run up to ``lcap``) and the row's columns ``0..col[i]`` of q . key * scale, times
    the values. False (nothing written) when an index is out of range."""
    m, nh, dh = qkv.shape[0], qkv.shape[2], qkv.shape[3]
    ps, cols = cache.shape[1], cache.shape[3]
    if (cache.shape[4] != dh or cache.shape[2] != nh or slot.shape[0] != m
            or row_j.shape[0] != m or col.shape[0] != m or out.shape[0] != m or out.shape[1] != nh * dh
            or p_bias.shape[0] != ps or p_bias.shape[1] != lcap or lcap > cols):
        return False
    cmax = 0
    for i in range(m):
        if slot[i] < 0 or slot[i] >= ps or row_j[i] < 0 or row_j[i] >= k or col[i] < 0:
            return False
        if lcap + col[i] * k + row_j[i] >= cols:
            return False
        cmax = max(cmax, col[i])
    for i in range(m):
        w = lcap + col[i] * k + row_j[i]
        p = slot[i]
        for h in range(nh):
            for d in range(dh):
                cache[0, p, h, w, d] = qkv[i, 1, h, d]
                cache[1, p, h, w, d] = qkv[i, 2, h, d]
    q = np.empty((m, dh), np.float32)
    s = np.empty((m, lcap + cmax + 1), np.float32)
    acc = np.empty(dh, np.float32)
    i0 = 0
    while i0 < m:  # the places of one slot (consecutive) share its prompt's columns
        p = slot[i0]
        i1 = i0 + 1
        while i1 < m and slot[i1] == p:
            i1 += 1
        nq = i1 - i0
        lo = lcap
        for c in range(lcap):
            if p_bias[p, c] == 0:
                lo = c
                break
        npr = lcap - lo
        for h in range(nh):
            keys = cache[0, p, h]
            vals = cache[1, p, h]
            qh = q[:nq]
            for i in range(nq):
                for d in range(dh):
                    qh[i, d] = qkv[i0 + i, 0, h, d] * scale
            sp = np.dot(qh, keys[lo:lcap].T) if npr else np.zeros((nq, 0), np.float32)
            for i in range(nq):
                j, c = row_j[i0 + i], col[i0 + i]
                si = s[i]
                for t in range(npr):
                    si[t] = sp[i, t]
                qi = qh[i]
                for t in range(c + 1):
                    kr = keys[lcap + t * k + j]
                    acc_s = np.float32(0.0)
                    for d in range(dh):
                        acc_s += qi[d] * kr[d]
                    si[npr + t] = acc_s
                n = npr + c + 1
                mx = si[0]
                for t in range(n):
                    mx = max(mx, si[t])
                tot = np.float32(0.0)
                for t in range(n):
                    e = _exp_le0(si[t] - mx)
                    si[t] = e
                    tot += e
                inv = np.float32(1.0) / tot
                for t in range(n):
                    si[t] *= inv
                for t in range(npr):
                    sp[i, t] = si[t]
            op = np.dot(sp, vals[lo:lcap]) if npr else np.zeros((nq, dh), np.float32)
            for i in range(nq):
                j, c = row_j[i0 + i], col[i0 + i]
                si = s[i]
                for d in range(dh):
                    acc[d] = op[i, d]
                for t in range(c + 1):
                    vr = vals[lcap + t * k + j]
                    e = si[npr + t]
                    for d in range(dh):
                        acc[d] += e * vr[d]
                for d in range(dh):
                    out[i0 + i, h * dh + d] = acc[d]
        i0 = i1
    return True


def attend(qkv: Tensor, cache: Tensor, p_bias: Tensor, slot: Tensor, row_j: Tensor, col: Tensor, lcap: int, k: int,
           scale: float) -> Tensor:
    """``torch.ops.livecopy.attend``: see :func:`_attend`; ``qkv`` (m, 3 * H * D), ``cache`` a layer's
    (2, P, H, C, D) (written), ``p_bias`` (P, 1, 1, lcap). Returns (m, H * D)."""
    m, nh, dh = qkv.shape[0], cache.shape[2], cache.shape[4]
    if not cache.is_contiguous() or cache.dtype != torch.float32:
        raise ValueError("attend: the cache must be one contiguous float32 tensor (the decoder's CPU cache)")
    out = torch.empty((m, nh * dh), dtype=torch.float32)
    # contiguous arrays of these types: the one signature warm() compiled (another would compile on a request's time)
    ok = _attend(qkv.reshape(m, 3, nh, -1).contiguous().numpy(), cache.numpy(),
                 p_bias.reshape(p_bias.shape[0], -1).contiguous().numpy(), slot.contiguous().numpy(),
                 row_j.contiguous().numpy(), col.contiguous().numpy(), int(lcap), int(k), np.float32(scale),
                 out.numpy())
    if not ok:
        raise IndexError("attend: a place's slot, row or column is outside the cache")
    return out


def gelu_tanh_(x: Tensor) -> Tensor:
    """``torch.ops.livecopy.gelu_tanh_``: tanh-GELU of ``x`` (contiguous float32) in place."""
    _gelu_tanh(x.view(-1).numpy())
    return x


_LIB: list[Any] = []  # the library object must outlive its registrations


@functools.cache
def register() -> bool:
    """Define the ops (once per process); False where they cannot be (then the dense path runs)."""
    try:
        lib = torch.library.Library("livecopy", "DEF")
        lib.define("attend(Tensor qkv, Tensor(a!) cache, Tensor p_bias, Tensor slot, Tensor row_j, Tensor col, "
                   "int lcap, int k, float scale) -> Tensor")
        lib.define("gelu_tanh_(Tensor(a!) x) -> Tensor(a!)")
        lib.impl("attend", attend, "CPU")
        lib.impl("gelu_tanh_", gelu_tanh_, "CPU")
    except (RuntimeError, AttributeError):  # already defined by another copy of this module, or an old torch
        return hasattr(torch.ops.livecopy, "attend") and hasattr(torch.ops.livecopy, "gelu_tanh_")
    _LIB.append(lib)
    return True


@functools.cache
def available() -> bool:
    """The ops registered and their loops compiled (numba's matrix product calls BLAS through
    SciPy); False, logged once, where not: the decoder then runs torch's attention and GELU."""
    if not register():
        return False
    try:
        warm()
    except Exception as exc:  # any failure means: the dense path
        log.warning("the CPU step's compiled attention is unavailable (%s: %s); using torch's", type(exc).__name__,
                    exc)
        return False
    return True


def warm() -> None:
    """Compile the loops now (or load them from numba's disk cache), not on a request's time."""
    x = torch.zeros(16)
    gelu_tanh_(x)
    cache = torch.zeros((2, 1, 1, 4, 64))
    attend(torch.zeros((1, 3 * 64)), cache, torch.zeros((1, 1, 1, 2)), torch.zeros(1, dtype=torch.long),
           torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 2, 1, 0.125)
