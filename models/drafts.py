"""Speculative decoding's parts: draft tokens from the n-grams of the copies decoded before
(bounded), and the rule that keeps or refuses them (:func:`speculative_pick`, :func:`emit_tokens`).

:class:`NGramDrafts` learns, from every finished row, which token most often followed each context
of 1 to ``n`` tokens, and proposes the next ``d`` tokens of a row by chaining its guesses (longest
context first). :class:`models.continuous.ContinuousDecoder` feeds them to the model with the row's
token and keeps those the model's own sampling accepts (exact in distribution: docs/generation.md).
A guess only changes how many tokens a step yields, never which copy comes out, so one table serves
every shopper. Bounded: at most ``max_contexts`` contexts (the least recently seen dropped),
``max_next`` counts each (a full table of 32,768 contexts: ~20 MB). Contexts of up to 6 tokens:
on the shipped student, guesses from 2, 3, 4, 5, 6 and 8 tokens were kept 0.68, 0.70, 0.73,
0.75, 0.75, 0.75 of the time (batch-1 copies/s 12.4, 12.9, 13.2, 13.4, 13.8, 13.8).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from models.generate import sampling_distribution


class NGramDrafts:
    def __init__(self, n: int = 6, max_contexts: int = 32_768, max_next: int = 8, young_rows: int = 2_048) -> None:
        if n < 1:
            raise ValueError("n >= 1")
        self.n, self.max_contexts, self.max_next = int(n), int(max_contexts), int(max_next)
        # until it has learned this many rows the table is young: decoders teach it every candidate of a
        # prompt, then one (the others are samples of the same distributions: docs/generation.md)
        self.young_rows = int(young_rows)
        self.rows = 0  # rows learned
        self._counts: dict[tuple[int, ...], dict[int, int]] = {}
        self._best: dict[tuple[int, ...], int] = {}
        self._lock = threading.Lock()
        self.proposed = 0  # draft tokens fed to the model
        self.accepted = 0  # of those, kept

    def __len__(self) -> int:
        return len(self._best)

    @property
    def young(self) -> bool:
        return self.rows < self.young_rows

    def learn(self, tokens: Sequence[int]) -> None:
        """Count every (context, next token) of ``tokens`` (a prompt's tail, then a row's tokens)."""
        toks = tuple(int(t) for t in tokens)  # a tuple's slice is the context key itself
        counts, bests, n, max_next = self._counts, self._best, self.n, self.max_next
        with self._lock:  # one loop, no method call per count (learning runs on the engine thread)
            self.rows += 1
            for i in range(1, len(toks)):
                nxt = toks[i]
                for m in range(1, min(n, i) + 1):
                    ctx = toks[i - m:i]
                    c = counts.pop(ctx, None)  # seen again: to the end of the order (dicts keep insertion order)
                    if c is None:
                        c = {}
                    counts[ctx] = c
                    c[nxt] = c.get(nxt, 0) + 1
                    best = bests.get(ctx)
                    if len(c) > max_next:  # forget the rarest follower
                        rare = min((t for t in c if t != nxt), key=c.__getitem__)
                        del c[rare]
                        best = None if rare == best else best
                    if best is None or c[nxt] > c.get(best, 0):
                        bests[ctx] = nxt
            if len(counts) > self.max_contexts:  # drop the least recently seen half
                for ctx in list(counts)[: len(counts) - self.max_contexts // 2]:
                    del counts[ctx]
                    bests.pop(ctx, None)

    def propose(self, context: Sequence[int], d: int) -> list[int]:
        """Up to ``d`` guessed next tokens after ``context`` (fewer where no context was seen)."""
        ctx = [int(t) for t in context[-self.n:]]
        out: list[int] = []
        best = self._best
        while len(out) < d:
            guess = None
            for m in range(min(self.n, len(ctx)), 0, -1):
                guess = best.get(tuple(ctx[-m:]))
                if guess is not None:
                    break
            if guess is None:
                break
            out.append(guess)
            ctx.append(guess)
        return out

    def copy(self) -> NGramDrafts:
        """An independent table with these counts and rows learned (the counters of proposed/accepted
        drafts start at 0)."""
        out = NGramDrafts(self.n, self.max_contexts, self.max_next, self.young_rows)
        with self._lock:
            out._counts = {ctx: dict(c) for ctx, c in self._counts.items()}
            out._best = dict(self._best)
            out.rows = self.rows
        return out

    def observe(self, proposed: int, accepted: int) -> None:
        with self._lock:
            self.proposed += int(proposed)
            self.accepted += int(accepted)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None


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
