"""The CPU decoder's sampling and row-state writes as one compiled loop (numba).

:func:`emit_into_rows` is :func:`models.drafts.emit_into_rows` (the reference, which CUDA decoders
run) for CPU tensors: the same top-k then top-p distribution, the same speculative pick with the
same uniform draws, the same writes into the rows' state. It computes only the places a row
reaches (a refused guess ends the row's step): one top-k pass and one log-normaliser pass over
each, instead of ~150 tensor operations over all of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

_FULL_SORT = 64  # a top-k wider than this (or none: top_k <= 0) sorts the whole row


def compiled(**kw: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit`` releasing the GIL, its machine code cached on disk (next to this file, else in
    the user's cache) where a directory is writable; else compiled once per process."""
    def wrap(fn: Callable[..., Any]) -> Any:
        try:
            return numba.njit(cache=True, nogil=True, **kw)(fn)
        except RuntimeError:  # no writable cache directory (a read-only install without a home)
            return numba.njit(nogil=True, **kw)(fn)
    return wrap


@compiled()
def _top(row: np.ndarray, k: int, vals: np.ndarray, idx: np.ndarray) -> int:  # pragma: no cover (compiled)
    """``row``'s ``k`` largest values, descending, into ``vals`` / ``idx`` (ties: the lower id
    first); returns how many (``k``, or the row's length)."""
    if k > _FULL_SORT:
        order = np.argsort(-row, kind="mergesort")
        n = min(k, row.shape[0])
        for c in range(n):
            idx[c] = order[c]
            vals[c] = row[order[c]]
        return n
    n = 0
    thr = -np.inf
    for j in range(row.shape[0]):
        v = row[j]
        if n < k or v > thr:
            p = n if n < k else k - 1
            while p > 0 and vals[p - 1] < v:
                vals[p] = vals[p - 1]
                idx[p] = idx[p - 1]
                p -= 1
            vals[p] = v
            idx[p] = j
            if n < k:
                n += 1
            if n == k:
                thr = vals[k - 1]
    return n


@compiled(fastmath=True)
def _log_norm(row: np.ndarray, mx: float) -> float:  # pragma: no cover (compiled)
    """log(sum(exp(row))) given ``row``'s max ``mx``, to float64 rounding: each exp(x), x clamped at
    -40 (~4e-18, below any float32 sum's rounding), as exp(x / 64) ** 64 with exp(x / 64) on
    [-0.625, 0] by its Taylor series to degree 10 (error < 1e-12): arithmetic alone, so the loop
    runs four lanes at a time (a libm exp per element is 3.5x slower; torch's logsumexp, over every
    place a step computed instead of the ones a row reaches, ~2x)."""
    s = 0.0
    for j in range(row.shape[0]):
        y = max(np.float64(row[j]) - mx, -40.0) * 0.015625
        p = 1.0 + y * (1.0 + y * (0.5 + y * (1 / 6 + y * (1 / 24 + y * (1 / 120 + y * (
            1 / 720 + y * (1 / 5040 + y * (1 / 40320 + y * (1 / 362880 + y / 3628800)))))))))
        p = p * p
        p = p * p
        p = p * p
        p = p * p
        p = p * p
        p = p * p
        s += p
    return mx + math.log(s)


@compiled()
def _emit(rows, logits, place, ban, drafts, u, temperature, k, top_p, eos, stop, advance, max_new,
          lp, slp, tokens, ntok, pending, pos, glen, fin, closing, acc_out, end_out, ending_out):  # pragma: no cover
    """The loop (:func:`emit_views`); False, with nothing read or written, when an index it would
    follow is out of range (it reads and writes without bounds checks)."""
    m, qn = place.shape
    v = logits.shape[1]
    d = qn - 1
    n = lp.shape[0]
    if (rows.shape[0] != m or drafts.shape[0] != m or drafts.shape[1] != d or u.shape[0] != m or u.shape[1] != qn
            or stop.shape[0] < v or ban.shape[1] != v or acc_out.shape[0] != m):
        return False
    for i in range(m):
        if rows[i] < 0 or rows[i] >= n or (ban.shape[0] > 0 and rows[i] >= ban.shape[0]):
            return False
        for j in range(qn):
            if place[i, j] < 0 or place[i, j] >= logits.shape[0]:
                return False
        for j in range(d):
            if drafts[i, j] >= v:
                return False
    row = np.empty(v, np.float32)
    vals = np.empty(k, np.float32)
    idx = np.empty(k, np.int64)
    pr = np.empty(k, np.float64)
    em = np.empty(qn, np.int64)
    pe = np.empty(qn, np.float64)
    lps = np.empty(qn, np.float64)
    for i in range(m):
        acc = 0
        for j in range(qn):
            row[:] = logits[place[i, j]]
            if ban.shape[0] > 0:
                row += ban[rows[i]]
            # the sampling distribution: top-k after temperature, then top-p on the survivors
            if temperature <= 0:
                best = 0
                for t in range(v):
                    if row[t] > row[best]:
                        best = t
                nk = 1
                idx[0] = best
                pr[0] = 1.0
                mx = np.float64(row[best])
            else:
                nk = _top(row, k, vals, idx)
                mx = np.float64(vals[0])
                z = 0.0
                for c in range(nk):
                    pr[c] = math.exp((np.float64(vals[c]) - vals[0]) / temperature)
                    z += pr[c]
                if top_p < 1.0:
                    before = 0.0
                    kept = 0.0
                    for c in range(nk):
                        p = pr[c] / z
                        if before < top_p:
                            kept += pr[c]
                        else:
                            pr[c] = 0.0
                        before += p
                    z = kept
                for c in range(nk):
                    pr[c] /= z
            lse = _log_norm(row, mx)  # the log-likelihood's normaliser (T = 1)
            g = drafts[i, j] if j < d else -1
            pg = 0.0
            if g >= 0:
                for c in range(nk):
                    if idx[c] == g:
                        pg = pr[c]
            if j < d and u[i, j] < pg:  # the guess is kept
                em[j] = g
                pe[j] = pg
                lps[j] = row[g] - lse
                acc += 1
                continue
            # a draw (inverse CDF with the last draw) from the distribution without the refused guess
            rest = 0.0
            for c in range(nk):
                if idx[c] != g:
                    rest += pr[c]
            drop = g if rest > 0 else -2  # p(guess) was 1 up to rounding: draw from all of it
            if drop == -2:
                rest = 0.0
                for c in range(nk):
                    rest += pr[c]
            target = u[i, d] * rest
            cum = 0.0
            below = 0
            for c in range(nk):
                if idx[c] != drop:
                    cum += pr[c]
                if cum < target:
                    below += 1
            choice = min(below, nk - 1)
            em[j] = idx[choice]
            pe[j] = pr[choice]
            lps[j] = row[idx[choice]] - lse
            break
        n_emit = acc + 1
        has_end = False
        first_end = qn
        for j in range(acc + 1):  # an ending token (EOS or stop) among the emitted ones ends the row there
            if em[j] == eos or stop[em[j]]:
                has_end = True
                first_end = j
                n_emit = j + 1
                break
        n_keep = n_emit - 1 if has_end else n_emit
        r = rows[i]
        a = 0.0
        b = 0.0
        for j in range(n_emit):
            a += lps[j]
            if temperature > 0:
                b += math.log(max(pe[j], 1e-30))
        lp[r] += a
        slp[r] += b
        for j in range(min(n_keep, tokens.shape[1] - ntok[r])):  # (the decoder never drafts past max_new)
            tokens[r, ntok[r] + j] = em[j]
        ntok[r] += n_keep
        pending[r] = em[n_emit - 1]
        if advance:
            pos[r] += n_emit
            glen[r] += n_emit
        fin[r] = fin[r] or has_end
        ending = has_end or ntok[r] >= max_new  # truncated rows: EOS is forced for the CTR read
        closing[r] = ending
        acc_out[i] = acc
        end_out[i] = first_end
        ending_out[i] = ending
    return True


def emit_views(rows: np.ndarray, logits: Tensor, place: np.ndarray, ban: np.ndarray | None, drafts: np.ndarray,
               u: np.ndarray, temperature: float, top_k: int, top_p: float, eos: int, stop: np.ndarray | None,
               advance: bool, max_new: int, lp: np.ndarray, slp: np.ndarray, tokens: np.ndarray, ntok: np.ndarray,
               pending: np.ndarray, pos: np.ndarray, glen: np.ndarray, fin: np.ndarray,
               closing: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`emit_into_rows` on host arrays (the decoder's state as views of its CPU tensors, updated
    in place; ``logits`` a CPU tensor): what a decoder step calls, without a conversion per argument."""
    m, v = place.shape[0], logits.shape[1]
    k = top_k if 0 < top_k < v else v
    acc, first_end = np.empty(m, np.int64), np.empty(m, np.int64)
    ending = np.empty(m, np.bool_)
    ok = _emit(rows, logits.float().contiguous().numpy(), place, _none(v) if ban is None else ban, drafts, u,
               float(temperature), k, float(top_p), int(eos), _no_stop(v) if stop is None else stop, bool(advance),
               int(max_new), lp, slp, tokens, ntok, pending, pos, glen, fin, closing, acc, first_end, ending)
    if not ok:
        raise ValueError("emit_into_rows: rows, places, guesses, bans or stop mask out of range")
    return torch.from_numpy(acc), torch.from_numpy(first_end), torch.from_numpy(ending)


def emit_into_rows(rows: Tensor, logits: Tensor, place: Tensor, ban: Tensor | None, drafts: Tensor, u: Tensor,
                   temperature: float, top_k: int, top_p: float, eos: int, stop: Tensor | None, advance: bool,
                   max_new: int, lp: Tensor, slp: Tensor, tokens: Tensor, ntok: Tensor, pending: Tensor, pos: Tensor,
                   glen: Tensor, fin: Tensor, closing: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`models.drafts.emit_into_rows` on CPU tensors for ``x = logits[place] + ban[rows][:, None]``
    (``place`` (m, qn): rows of ``logits`` (·, V); ``ban`` (·, V) by decoder row, or None), read
    where they are; the state tensors (contiguous) updated in place. The same results. The loop
    reads and writes without bounds checks, so it checks the indices it follows first (ValueError:
    nothing read or written)."""
    return emit_views(rows.contiguous().numpy(), logits, place.contiguous().numpy(),
                      None if ban is None else ban.numpy(), drafts.contiguous().numpy(), u.float().contiguous().numpy(),
                      temperature, top_k, top_p, eos, None if stop is None else stop.numpy(), advance, max_new,
                      lp.numpy(), slp.numpy(), tokens.numpy(), ntok.numpy(), pending.numpy(), pos.numpy(), glen.numpy(),
                      fin.numpy(), closing.numpy())


def warm() -> None:
    """Compile the loop now (~6 s the first time on a 2-core host; ~0.4 s loading it from the disk
    cache), not on a request's time: :meth:`models.continuous.ContinuousDecoder.warmup` calls it."""
    v, m, qn = 8, 1, 2
    state = [torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64),
             torch.full((m, qn), -1, dtype=torch.long), torch.zeros(m, dtype=torch.long),
             torch.zeros(m, dtype=torch.long), torch.zeros(m, dtype=torch.long), torch.zeros(m, dtype=torch.long),
             torch.zeros(m, dtype=torch.bool), torch.zeros(m, dtype=torch.bool)]
    emit_into_rows(torch.zeros(m, dtype=torch.long), torch.zeros((m * qn, v)), torch.arange(m * qn).view(m, qn), None,
                   torch.zeros((m, qn - 1), dtype=torch.long), torch.zeros((m, qn)), 1.0, 4, 0.9, 0, None, True, qn,
                   *state)


@functools.cache
def _no_stop(v: int) -> np.ndarray:
    return np.zeros(v, np.bool_)


@functools.cache
def _none(v: int) -> np.ndarray:
    return np.zeros((0, v), np.float32)
