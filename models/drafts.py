"""Draft tokens for speculative decoding: the n-grams of the copies decoded before (bounded).

:class:`NGramDrafts` learns, from every finished row, which token most often followed each context
of 1 to ``n`` tokens, and proposes the next ``d`` tokens of a row by chaining its guesses (longest
context first). :class:`models.continuous.ContinuousDecoder` feeds them to the model with the row's
token and keeps those the model's own sampling accepts (exact in distribution: docs/generation.md).
A guess only changes how many tokens a step yields, never which copy comes out, so one table serves
every shopper. Bounded: at most ``max_contexts`` contexts (the least recently seen dropped),
``max_next`` counts each. Contexts of up to 6 tokens: on the shipped student, guesses from 2, 3,
4, 5, 6 and 8 tokens were kept 0.68, 0.70, 0.73, 0.75, 0.75, 0.75 of the time (batch-1 copies/s
12.4, 12.9, 13.2, 13.4, 13.8, 13.8; docs/generation.md).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence


class NGramDrafts:
    def __init__(self, n: int = 6, max_contexts: int = 65_536, max_next: int = 8) -> None:
        if n < 1:
            raise ValueError("n >= 1")
        self.n, self.max_contexts, self.max_next = int(n), int(max_contexts), int(max_next)
        self._counts: dict[tuple[int, ...], dict[int, int]] = {}
        self._best: dict[tuple[int, ...], int] = {}
        self._lock = threading.Lock()
        self.proposed = 0  # draft tokens fed to the model
        self.accepted = 0  # of those, kept

    def __len__(self) -> int:
        return len(self._best)

    def learn(self, tokens: Sequence[int]) -> None:
        """Count every (context, next token) of ``tokens`` (a prompt's tail, then a row's tokens)."""
        toks = [int(t) for t in tokens]
        with self._lock:
            for i in range(1, len(toks)):
                nxt = toks[i]
                for m in range(1, min(self.n, i) + 1):
                    self._count(tuple(toks[i - m:i]), nxt)
            if len(self._counts) > self.max_contexts:  # drop the least recently seen half
                for ctx in list(self._counts)[: len(self._counts) - self.max_contexts // 2]:
                    del self._counts[ctx]
                    self._best.pop(ctx, None)

    def _count(self, ctx: tuple[int, ...], nxt: int) -> None:
        c = self._counts.pop(ctx, None)  # seen again: to the end of the order (dicts keep insertion order)
        if c is None:
            c = {}
        self._counts[ctx] = c
        c[nxt] = c.get(nxt, 0) + 1
        best = self._best.get(ctx)
        if len(c) > self.max_next:  # forget the rarest follower
            rare = min((t for t in c if t != nxt), key=c.__getitem__)
            del c[rare]
            best = None if rare == best else best
        if best is None or c[nxt] > c.get(best, 0):
            self._best[ctx] = nxt

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
        """An independent table with these counts (the counters of proposed/accepted drafts start at 0)."""
        out = NGramDrafts(self.n, self.max_contexts, self.max_next)
        with self._lock:
            out._counts = {ctx: dict(c) for ctx, c in self._counts.items()}
            out._best = dict(self._best)
        return out

    def observe(self, proposed: int, accepted: int) -> None:
        with self._lock:
            self.proposed += int(proposed)
            self.accepted += int(accepted)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None
