"""Choosing one copy among K candidates, and the probability of that choice.

The CTR head ends in a linear layer over features φ (its penultimate activations). Thompson
sampling treats that layer's weights θ = [w; b] as uncertain: a diagonal Gaussian posterior
N(μ, diag(1/λ)) whose mean is the trained layer and whose precision λ grows with the feedback
seen (Laplace approximation, updated by the online trainer: λ += p(1-p)·φ²). Per request it
draws θ̃, scores every candidate with σ(θ̃·[φ; 1]) and picks the best; the propensity (the
probability that this candidate would have been picked) is estimated from further draws, so
logged feedback supports IPS/SNIPS off-policy estimates.

Policies: `thompson` (default), `greedy` (argmax of the mean CTR), `epsilon_greedy`, `random`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.posterior import POSTERIOR_FILE, Posterior

__all__ = ["POLICIES", "POSTERIOR_FILE", "Choice", "Chooser", "Posterior"]

POLICIES = ("thompson", "greedy", "epsilon_greedy", "random")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class Choice:
    index: int
    propensity: float
    score: float  # mean predicted CTR of the chosen candidate (posterior mean)


class Chooser:
    def __init__(self, policy: str = "thompson", *, epsilon: float = 0.1, mc_draws: int = 200) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; one of {POLICIES}")
        self.policy = policy
        self.epsilon = epsilon
        self.mc_draws = mc_draws

    def choose(
        self,
        features: np.ndarray,  # (K, d) CTR features of the candidates
        scores: np.ndarray,  # (K,) CTR head output (posterior-mean prediction)
        posterior: Posterior | None,
        rng: np.random.Generator,
        eligible: np.ndarray | None = None,  # (K,) bool: passed the copy filter
        offsets: np.ndarray | None = None,  # (mc_draws + 1, K) logit offsets (StyleResponse.log_factors)
    ) -> Choice:
        """Pick one candidate. ``offsets`` add a per-candidate logit term drawn from a second
        posterior (the shopper's style response): Thompson draw ``i`` of the head is paired with
        row ``i``; the greedy policies use the rows' mean."""
        k = len(scores)
        ok = np.ones(k, bool) if eligible is None else eligible.astype(bool)
        if not ok.any():
            raise ValueError("no eligible candidate")
        idx = np.flatnonzero(ok)
        if self.policy == "random":
            i = int(rng.choice(idx))
            return Choice(i, 1.0 / len(idx), float(scores[i]))
        if offsets is None:
            best = int(idx[np.argmax(scores[idx])])
        else:
            p = np.clip(scores, 1e-9, 1.0 - 1e-9)
            best = int(idx[np.argmax((np.log(p) - np.log1p(-p) + offsets.mean(axis=0))[idx])])
        if self.policy == "greedy":
            return Choice(best, 1.0, float(scores[best]))
        if self.policy == "epsilon_greedy":
            explore = rng.random() < self.epsilon
            i = int(rng.choice(idx)) if explore else best
            p_i = self.epsilon / len(idx) + (1.0 - self.epsilon if i == best else 0.0)
            return Choice(i, p_i, float(scores[i]))
        if posterior is None:  # no posterior shipped: fall back to the prior around the head
            raise ValueError("thompson sampling needs a posterior")
        x = np.concatenate([features[idx], np.ones((len(idx), 1))], axis=1)  # (m, d+1)
        thetas = posterior.sample(rng, self.mc_draws + 1)  # draw 0 decides, the rest estimate
        logits = thetas @ x.T  # sigmoid is monotonic: compare logits
        if offsets is not None:
            logits = logits + offsets[: self.mc_draws + 1, idx]
        winners = np.argmax(logits, axis=1)
        j = int(winners[0])
        freq = float(np.mean(winners[1:] == j))
        propensity = max(freq, 1.0 / (self.mc_draws + 1))
        return Choice(int(idx[j]), propensity, float(scores[idx[j]]))


