"""Speculative decoding's parts: draft tokens from the n-grams of the copies decoded before
(bounded), and the rule that keeps or refuses them (:func:`speculative_pick`, :func:`emit_tokens`).

:class:`NGramDrafts` learns, from every finished row, which token most often followed each context
of 1 to ``n`` tokens, and proposes the next ``d`` tokens of a row by chaining its guesses (longest
context first). :class:`models.continuous.ContinuousDecoder` feeds them to the model with the row's
token and keeps those the model's own sampling accepts (exact in distribution: docs/generation.md).
A guess only changes how many tokens a step yields, never which copy comes out, so one table serves
every shopper. Bounded: at most ``max_contexts`` contexts (the least recently seen dropped),
``max_next`` counts each, in preallocated arrays compiled loops read and write (numba; 32,768
contexts: 5.5 MB). Contexts of up to 6 tokens:
on the shipped student, guesses from 2, 3, 4, 5, 6 and 8 tokens were kept 0.68, 0.70, 0.73,
0.75, 0.75, 0.75 of the time (batch-1 copies/s 12.4, 12.9, 13.2, 13.4, 13.8, 13.8).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from models.cpu_emit import compiled
from models.generate import sampling_distribution

_EMPTY = np.uint64(0)  # a free slot's key (a context's hash is never 0)
_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S1, _S2, _S3 = np.uint64(30), np.uint64(27), np.uint64(31)
_MAX_COUNT = 1 << 30  # a follower's count that halves its context's (counts are int32)


@compiled()
def _mix(h: np.uint64, token: np.int64) -> np.uint64:  # pragma: no cover (compiled)
    """The hash of a context one token longer (to the left): splitmix64 over ``h`` and ``token``."""
    z = (h ^ np.uint64(token + 1)) * _M1
    z = (z ^ (z >> _S1)) * _M2
    z = (z ^ (z >> _S2)) * _M3
    z = z ^ (z >> _S3)
    return z if z != _EMPTY else np.uint64(1)


@compiled()
def _slot(keys: np.ndarray, h: np.uint64) -> np.int64:  # pragma: no cover (compiled)
    """Where ``h`` is, or the free slot where it would go (linear probing; the table is never full)."""
    mask = np.uint64(keys.shape[0] - 1)
    i = h & mask
    while keys[i] != h and keys[i] != _EMPTY:
        i = (i + np.uint64(1)) & mask
    return np.int64(i)


@compiled()
def _find(keys: np.ndarray, ctx: np.ndarray) -> int:  # pragma: no cover (compiled)
    """The slot of context ``ctx`` (its tokens in order), or -1."""
    if ctx.shape[0] == 0:
        return -1
    h = _EMPTY
    for j in range(ctx.shape[0] - 1, -1, -1):
        h = _mix(h, ctx[j])
    s = _slot(keys, h)
    return s if keys[s] != _EMPTY else -1


@compiled()
def _learn(keys, seen, fol, cnt, best, toks, n, stamp, room):  # pragma: no cover (compiled)
    """Count every (context, next token) of ``toks``, adding at most ``room`` new contexts (the others
    skipped: the table keeps free slots); returns how many were added."""
    added = 0
    width = fol.shape[1]
    for i in range(1, toks.shape[0]):
        nxt = toks[i]
        h = _EMPTY
        for m in range(1, min(n, i) + 1):
            h = _mix(h, toks[i - m])
            s = _slot(keys, h)
            if keys[s] == _EMPTY:  # a new context
                if added >= room:
                    continue
                keys[s] = h
                seen[s] = stamp
                fol[s, 0] = nxt
                cnt[s, 0] = 1
                for c in range(1, width):
                    fol[s, c] = -1
                    cnt[s, c] = 0
                best[s] = nxt
                added += 1
                continue
            seen[s] = stamp
            at = -1
            used = 0
            for c in range(width):
                if fol[s, c] < 0:
                    break
                used += 1
                if fol[s, c] == nxt:
                    at = c
            if at < 0:
                if used == width:  # forget the rarest follower (the first seen of equals), the others move up
                    rare = 0
                    for c in range(1, width):
                        if cnt[s, c] < cnt[s, rare]:
                            rare = c
                    if fol[s, rare] == best[s]:
                        best[s] = nxt
                    for c in range(rare, width - 1):
                        fol[s, c] = fol[s, c + 1]
                        cnt[s, c] = cnt[s, c + 1]
                    used -= 1
                at = used
                fol[s, at] = nxt
                cnt[s, at] = 0
            cnt[s, at] += 1
            if cnt[s, at] >= _MAX_COUNT:  # halve the context's counts (int32; the order is kept)
                for c in range(width):
                    cnt[s, c] = (cnt[s, c] + 1) // 2
            if best[s] != nxt:
                b = 0
                for c in range(width):
                    if fol[s, c] == best[s]:
                        b = cnt[s, c]
                if cnt[s, at] > b:
                    best[s] = nxt
    return added


@compiled()
def _propose(keys, best, ctx, n, d, out):  # pragma: no cover (compiled)
    """Up to ``d`` guesses after ``ctx`` into ``out`` (a buffer of ``ctx``'s length + d, ``ctx`` first);
    returns how many."""
    length = ctx.shape[0]
    for j in range(length):
        out[j] = ctx[j]
    got = 0
    while got < d:
        end = length + got
        guess = -1
        h = _EMPTY
        for m in range(1, min(n, end) + 1):  # the longest context seen wins
            h = _mix(h, out[end - m])
            s = _slot(keys, h)
            if keys[s] != _EMPTY:
                guess = best[s]
        if guess < 0:
            break
        out[end] = guess
        got += 1
    return got


@compiled()
def _keep_recent(keys, seen, fol, cnt, best, keep, nkeys, nseen, nfol, ncnt, nbest):  # pragma: no cover
    """The ``keep`` most recently seen contexts into the empty arrays ``n*``; returns how many."""
    stamps = np.sort(seen[keys != _EMPTY])
    cut = stamps[max(stamps.shape[0] - keep, 0)] if stamps.shape[0] else 0
    room = keep - int(np.sum(stamps > cut))  # of those seen last at the cut, the first ones
    kept = 0
    for s in range(keys.shape[0]):
        if keys[s] == _EMPTY or seen[s] < cut:
            continue
        if seen[s] == cut:
            if room <= 0:
                continue
            room -= 1
        t = _slot(nkeys, keys[s])
        nkeys[t] = keys[s]
        nseen[t] = seen[s]
        nbest[t] = best[s]
        for c in range(fol.shape[1]):
            nfol[t, c] = fol[s, c]
            ncnt[t, c] = cnt[s, c]
        kept += 1
    return kept


class StepPlan(NamedTuple):
    """A speculative step's layout (:meth:`NGramDrafts.plan_step`), over ``n`` rows and ``qn`` places
    a row (its token, then up to ``qn - 1`` guesses)."""

    live: np.ndarray  # (m,) the rows that emit tokens (alive, not closing), ascending
    guesses: np.ndarray  # (m, qn - 1) their guesses, -1 past a row's own
    lens: np.ndarray  # (n,) guesses per row
    feed: np.ndarray  # (n, qn) the token fed at each place
    pos: np.ndarray  # (n, qn) its position
    col: np.ndarray  # (n, qn) its cache column
    t: int  # generated columns the step attends to
    need: np.ndarray  # the places computed (flat n * qn indices, ascending)
    src: np.ndarray  # (n, qn) the computed place whose outputs each place reads
    place: np.ndarray  # (m, qn) src of the live rows
    ending: np.ndarray  # the rows that feed EOS for their CTR read (alive, closing)


@compiled()
def _plan_ok(n, alive, closing, ntok, pos, glen, pending, tokens, tail, tail_len):  # pragma: no cover (compiled)
    """Whether :func:`_plan` stays within the arrays: ``n`` rows each, token and tail counts within
    their arrays' widths."""
    if n < 0 or min(alive.shape[0], closing.shape[0], ntok.shape[0], pos.shape[0], glen.shape[0], pending.shape[0],
                    tokens.shape[0], tail.shape[0], tail_len.shape[0]) < n:
        return False
    for r in range(n):
        if ntok[r] < 0 or ntok[r] > tokens.shape[1] or tail_len[r] < 0 or tail_len[r] > tail.shape[1]:
            return False
    return True


@compiled()
def _plan(keys, best, ngram, n, alive, closing, ntok, pos0, glen, pending, tokens, tail, tail_len, depth,
          spec_places, max_drafts, max_new, n_positions, cols, eos, vocab, first):  # pragma: no cover (compiled)
    """:meth:`NGramDrafts.plan_step`'s loop: the live rows' guesses, then the step's layout."""
    live = np.empty(n, np.int64)
    m = 0
    for r in range(n):
        if alive[r] and not closing[r]:
            live[m] = r
            m += 1
    live = live[:m]
    d = depth
    if m > 0 and spec_places > 0:  # few rows left: deeper (a step's fixed part is most of it)
        d = max(d, min(max_drafts, spec_places // m - 1))
    lens = np.zeros(n, np.int64)
    guess = np.full((m, max(d, 1)), -1, np.int64)
    ctx = np.empty(ngram, np.int64)
    out = np.empty(ngram + max(d, 1), np.int64)
    for i in range(m):
        r = live[i]
        # emitted tokens stay within max_new, positions within the model's
        room = min(d, max_new - ntok[r] - 1, n_positions - 2 - pos0[r])
        if ntok[r] <= 1 and first >= 0:  # the row's first step after the token sampled from its prompt
            room = min(room, first)
        if room <= 0:
            continue
        # the context: the last ngram tokens of the prompt's tail, then the row's tokens
        nt, tl = ntok[r], tail_len[r]
        c = min(ngram, tl + nt)
        for j in range(c):
            at = tl + nt - c + j
            ctx[j] = tail[r, at] if at < tl else tokens[r, at - tl]
        got = _propose(keys, best, ctx[:c], ngram, room, out)
        for j in range(got):
            g = out[c + j]
            if g < 0 or g >= vocab:  # a table of another model's ids
                break
            guess[i, j] = g
            lens[r] += 1
    dmax = 0
    for r in range(n):
        dmax = max(dmax, lens[r])
    qn = dmax + 1
    # per row and place (n, qn): the token fed (its token, or EOS for its CTR read, then its guesses; token 0 past
    # them), its position and cache column; the places computed: a row's token and its own guesses (a row that
    # left, or feeds EOS for its CTR read, or has fewer guesses, computes nothing more: a product's time grows
    # with its rows); per place, the computed place whose outputs it reads (its own, else its row's first)
    feed = np.zeros((n, qn), np.int64)
    pos = np.empty((n, qn), np.int64)
    col = np.empty((n, qn), np.int64)
    src = np.zeros((n, qn), np.int64)
    need = np.empty(n * qn, np.int64)
    t = 0
    nn = 0
    for r in range(n):
        feed[r, 0] = eos if closing[r] else pending[r]
        start = nn
        for j in range(qn):
            pos[r, j] = min(pos0[r] + 1 + j, n_positions - 1)
            col[r, j] = min(glen[r] + j, cols - 1)
            if alive[r] and j <= lens[r]:
                need[nn] = r * qn + j
                src[r, j] = nn
                nn += 1
            else:
                src[r, j] = start if alive[r] else 0
        if alive[r]:
            t = max(t, col[r, qn - 1] + 1)
    place = np.empty((m, qn), np.int64)
    for i in range(m):
        r = live[i]
        for j in range(lens[r]):
            feed[r, 1 + j] = guess[i, j]
        for j in range(qn):
            place[i, j] = src[r, j]
    ending = np.empty(n, np.int64)
    ne = 0
    for r in range(n):
        if alive[r] and closing[r]:
            ending[ne] = r
            ne += 1
    return live, guess[:, :dmax], lens, feed, pos, col, t, need[:nn], src, place, ending[:ne]


class NGramDrafts:
    def __init__(self, n: int = 6, max_contexts: int = 32_768, max_next: int = 8, young_rows: int = 2_048) -> None:
        if n < 1 or max_contexts < 2 or max_next < 1:
            raise ValueError("n >= 1, max_contexts >= 2, max_next >= 1")
        self.n, self.max_contexts, self.max_next = int(n), int(max_contexts), int(max_next)
        # until it has learned this many rows the table is young: decoders teach it every candidate of a
        # prompt, then one (the others are samples of the same distributions: docs/generation.md)
        self.young_rows = int(young_rows)
        self.rows = 0  # rows learned
        # an open-addressing table keyed by the context's 64-bit hash (a collision costs a guess, never a
        # copy: a guess only changes how many tokens a step yields); at most max_contexts contexts, half
        # the slots free. Per context: the row it was last seen in, up to max_next followers and their
        # counts (in the order first seen), the most frequent one
        self._size = 0
        self._arrays(1 << (2 * self.max_contexts - 1).bit_length())  # a power of two, >= 2 x max_contexts
        self._lock = threading.Lock()
        self.proposed = 0  # draft tokens fed to the model
        self.accepted = 0  # of those, kept

    def _arrays(self, slots: int) -> None:
        self._keys = np.zeros(slots, np.uint64)
        self._seen = np.zeros(slots, np.int64)
        self._fol = np.full((slots, self.max_next), -1, np.int32)
        self._cnt = np.zeros((slots, self.max_next), np.int32)
        self._best = np.full(slots, -1, np.int32)

    def __len__(self) -> int:
        return self._size

    @property
    def young(self) -> bool:
        return self.rows < self.young_rows

    def learn(self, tokens: Sequence[int]) -> None:
        """Count every (context, next token) of ``tokens`` (a prompt's tail, then a row's tokens)."""
        toks = np.asarray(tokens, dtype=np.int64)
        with self._lock:
            self.rows += 1
            room = self._keys.shape[0] * 3 // 4 - self._size  # (a long row into a small table)
            self._size += _learn(self._keys, self._seen, self._fol, self._cnt, self._best, toks, self.n, self.rows,
                                 room)
            if self._size > self.max_contexts:  # keep the most recently seen half
                old = (self._keys, self._seen, self._fol, self._cnt, self._best)
                self._arrays(old[0].shape[0])
                self._size = _keep_recent(*old, self.max_contexts // 2, self._keys, self._seen, self._fol,
                                          self._cnt, self._best)

    def propose(self, context: Sequence[int], d: int) -> list[int]:
        """Up to ``d`` guessed next tokens after ``context`` (fewer where no context was seen)."""
        ctx = np.asarray(context[-self.n:], dtype=np.int64)
        if d <= 0:
            return []
        out = np.empty(ctx.shape[0] + d, np.int64)
        got = _propose(self._keys, self._best, ctx, self.n, d, out)
        return out[ctx.shape[0]:ctx.shape[0] + got].tolist()

    def plan_step(self, n: int, alive: np.ndarray, closing: np.ndarray, ntok: np.ndarray, pos: np.ndarray,
                  glen: np.ndarray, pending: np.ndarray, tokens: np.ndarray, tail: np.ndarray, tail_len: np.ndarray,
                  depth: int, spec_places: int, max_drafts: int, max_new: int, n_positions: int, cols: int, eos: int,
                  vocab: int, first: int | None = None) -> StepPlan:
        """A speculative step over the first ``n`` decoder rows (their state as host arrays; ``tail`` /
        ``tail_len``: each row's prompt's last tokens): each live row (alive, not closing) gets up to ``depth``
        guesses (up to ``max_drafts`` while rows x (1 + guesses) fit in ``spec_places``), within
        ``max_new`` tokens and the model's ``n_positions``, ids below ``vocab``, and at most ``first``
        in a row's first step (it has emitted one token: the one sampled from its prompt); then what the
        step feeds (:class:`StepPlan`). The loop reads without bounds checks, so the state it
        follows is checked first (ValueError)."""
        if not _plan_ok(int(n), alive, closing, ntok, pos, glen, pending, tokens, tail, tail_len):
            raise ValueError("plan_step: rows' state out of range (n, tokens or tail counts)")
        with self._lock:
            return StepPlan(*_plan(self._keys, self._best, self.n, int(n), alive, closing, ntok, pos, glen, pending,
                                   tokens, tail, tail_len, int(depth), int(spec_places), int(max_drafts),
                                   int(max_new), int(n_positions), int(cols), int(eos), int(vocab),
                                   -1 if first is None else int(first)))

    def followers(self, context: Sequence[int]) -> dict[int, int]:
        """The counts of the tokens seen after ``context``, in the order first seen (empty: unseen)."""
        s = _find(self._keys, np.asarray(context, dtype=np.int64))
        if s < 0:
            return {}
        return {int(f): int(c) for f, c in zip(self._fol[s], self._cnt[s], strict=True) if f >= 0}

    def state(self) -> dict[int, dict[int, int]]:
        """Every context's followers (keyed by the context's hash): what two tables compare by."""
        return {int(self._keys[s]): {int(f): int(c) for f, c in zip(self._fol[s], self._cnt[s], strict=True) if f >= 0}
                for s in np.flatnonzero(self._keys != _EMPTY)}

    def copy(self) -> NGramDrafts:
        """An independent table with these counts and rows learned (the counters of proposed/accepted
        drafts start at 0)."""
        out = NGramDrafts(self.n, self.max_contexts, self.max_next, self.young_rows)
        with self._lock:
            out._keys, out._seen, out._fol = self._keys.copy(), self._seen.copy(), self._fol.copy()
            out._cnt, out._best = self._cnt.copy(), self._best.copy()
            out._size, out.rows = self._size, self.rows
        return out

    def observe(self, proposed: int, accepted: int) -> None:
        with self._lock:
            self.proposed += int(proposed)
            self.accepted += int(accepted)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None


def warm() -> None:
    """Compile the table's loops now (or load them from numba's disk cache), not on a request's time:
    :meth:`models.continuous.ContinuousDecoder.warmup` calls it."""
    t = NGramDrafts(n=2, max_contexts=2, max_next=1)
    t.learn([1, 2, 3, 1, 3])  # over its bound: the eviction compiles too
    t.propose([1, 2], 2)
    t.followers([1])
    z, b = np.zeros(2, np.int64), np.array([True, False])
    t.plan_step(2, b, ~b, z, z, z, z, np.zeros((2, 4), np.int64), np.ones((2, 2), np.int64), z + 2, 3, 8, 8, 4, 16,
                20, 0, 8, first=1)


def speculative_pick(idx: Tensor, probs: Tensor, drafts: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Speculative sampling with one guessed token per position (Leviathan et al. 2023, a draft
    distribution that is all on the guess): per row, the sampling distributions at ``d + 1``
    positions (``idx``, ``probs``: (m, d + 1, c) ids and probabilities, as
    :func:`models.generate.sampling_distribution` gives them), ``d`` guesses (``drafts`` (m, d),
    -1: none) and ``d + 1`` uniform draws ``u`` (m, d + 1). Guess ``i`` is kept when ``u[i] <
    p_i(guess)`` and all before it were kept; at the first refused one a token is drawn from ``p_i``
    without the guess (renormalised), after ``d`` kept ones from ``p_d`` (inverse CDF with
    ``u[d]``): each emitted token has the distribution of a plain draw. ``d = 0``: a plain draw.
    Returns (kept guesses per row (m,), emitted tokens (m, d + 1): the kept guesses, then the
    drawn one, the rest as given; each emitted token's probability under its ``p_i`` (m, d + 1))."""
    m = drafts.shape[0]
    d = drafts.shape[1]
    ar = torch.arange(m, device=probs.device)
    if d > 0:
        hit = idx[:, :d] == drafts[:, :, None]
        p_dr = (probs[:, :d] * hit).sum(-1)  # each guess's probability where it would be drawn
        acc = (u[:, :d] < p_dr).long().cumprod(1).sum(1)
        refused = hit[ar, acc.clamp(max=d - 1)] & (acc < d)[:, None]
    else:
        p_dr = probs.new_zeros((m, 0))
        acc = torch.zeros(m, dtype=torch.long, device=probs.device)
        refused = torch.zeros(probs.shape[0], probs.shape[2], dtype=torch.bool, device=probs.device)
    pa, ia = probs[ar, acc], idx[ar, acc]  # the distribution after the last kept guess
    rest = pa.masked_fill(refused, 0.0)
    total = rest.sum(-1, keepdim=True)
    rest = torch.where(total > 0, rest, pa)  # 0: p(guess) was 1 up to rounding
    cdf = rest.cumsum(-1)
    choice = (cdf < u[:, d:d + 1] * cdf[:, -1:]).sum(-1, keepdim=True).clamp(max=rest.shape[1] - 1)
    em = torch.cat([drafts, drafts.new_zeros((m, 1))], 1)
    em[ar, acc] = ia.gather(1, choice).squeeze(1)
    pe = torch.cat([p_dr, p_dr.new_zeros((m, 1))], 1)
    pe[ar, acc] = pa.gather(1, choice).squeeze(1)
    return acc, em, pe


def emit_tokens(logits: Tensor, drafts: Tensor, u: Tensor, temperature: float, top_k: int, top_p: float,
                eos: int, stop: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """What rows emit from their logits (m, qn, V) at ``qn`` positions (masks added) and ``qn - 1``
    guesses: (guesses kept (m,), emitted tokens (m, qn), tokens consumed (m,): up to and with an
    ending one (EOS or ``stop``), tokens kept (m,): the ending one excluded, ended (m,), index of
    the ending token (m,; qn: none), summed model log-probability at T=1 and sampling
    log-probability of the consumed tokens (m,) float64)."""
    m, qn, v = logits.shape
    logp = torch.log_softmax(logits, -1)
    idx, probs = sampling_distribution(logits.view(m * qn, v), temperature, top_k, top_p)
    acc, em, pe = speculative_pick(idx.view(m, qn, -1), probs.view(m, qn, -1), drafts, u)
    em = em.clamp(min=0)  # past the emitted ones: guesses not kept, or none (-1)
    steps = torch.arange(qn, device=logits.device)
    ends = em == eos
    if stop is not None:
        ends = ends | stop[em]
    ends = ends & (steps[None, :] <= acc[:, None])
    has_end = ends.any(1)
    first_end = torch.where(ends, steps[None, :], qn).min(1).values
    n_emit = torch.where(has_end, first_end + 1, acc + 1)
    used = steps[None, :] < n_emit[:, None]
    lp = torch.where(used, logp.gather(2, em[:, :, None]).squeeze(2).double(), 0.0).sum(1)
    slp = torch.where(used, pe.clamp_min(1e-30).log().double(), 0.0).sum(1) if temperature > 0 else \
        torch.zeros(m, dtype=torch.float64, device=logits.device)
    return acc, em, n_emit, n_emit - has_end.long(), has_end, first_end, torch.stack([lp, slp], 1)


def emit_into_rows(rows: Tensor, x: Tensor, drafts: Tensor, u: Tensor, temperature: float, top_k: int, top_p: float,
                   eos: int, stop: Tensor | None, advance: bool, max_new: int, lp: Tensor, slp: Tensor,
                   tokens: Tensor, ntok: Tensor, pending: Tensor, pos: Tensor, glen: Tensor, fin: Tensor,
                   closing: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`emit_tokens` for decoder rows ``rows``, written into their state (the decoder's per-row
    tensors, updated in place: log-likelihoods, tokens and their count, the pending token, position
    and cache column when ``advance``, ended and closing flags). Returns (guesses kept, index of the
    ending token (qn: none), closing) per row (:meth:`models.continuous.ContinuousDecoder._emit_rows`)."""
    qn = x.shape[1]
    acc, em, n_emit, n_keep, has_end, first_end, lps = emit_tokens(x, drafts, u, temperature, top_k, top_p, eos, stop)
    lp[rows] = lp[rows] + lps[:, 0]
    slp[rows] = slp[rows] + lps[:, 1]
    at = (torch.arange(qn, device=x.device)[None, :] < n_keep[:, None]).nonzero()
    rw, cw = at[:, 0], at[:, 1]
    tokens[rows[rw], ntok[rows][rw] + cw] = em[rw, cw]
    ntok[rows] = ntok[rows] + n_keep
    pending[rows] = em.gather(1, (n_emit - 1)[:, None]).squeeze(1)
    if advance:
        pos[rows] = pos[rows] + n_emit
        glen[rows] = glen[rows] + n_emit
    fin[rows] = fin[rows] | has_end
    ending = has_end | (ntok[rows] >= max_new)  # truncated rows: EOS is forced for the CTR read
    closing[rows] = ending
    return acc, first_end, ending
