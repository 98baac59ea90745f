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
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

POSTERIOR_FILE = "ctr_posterior.safetensors"
POLICIES = ("thompson", "greedy", "epsilon_greedy", "random")


@dataclass
class Posterior:
    """Diagonal Gaussian over the CTR head's output layer, bias last."""

    mean: np.ndarray  # (d + 1,)
    precision: np.ndarray  # (d + 1,)

    @classmethod
    def prior(cls, weight: np.ndarray, bias: float, prior_std: float = 0.1) -> Posterior:
        mean = np.concatenate([weight.reshape(-1), [bias]]).astype(np.float64)
        return cls(mean, np.full(mean.shape, 1.0 / prior_std**2))

    @classmethod
    def of_head(cls, head: Any, prior_std: float = 0.1) -> Posterior:
        """:meth:`prior` around a CTR head's output layer (``head.out``, a torch ``nn.Linear`` to one logit)."""
        out = head.out
        w = out.weight.detach().double().cpu().numpy()
        b = float(out.bias.detach().double().cpu().item())
        return cls.prior(w, b, prior_std)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.mean + rng.standard_normal((n, self.dim)) / np.sqrt(self.precision)

    def observe(self, features: np.ndarray, probs: np.ndarray) -> None:
        """Laplace update of the precision with a batch of logged features and predicted CTRs."""
        x = np.concatenate([features, np.ones((features.shape[0], 1))], axis=1)
        w = (probs * (1.0 - probs))[:, None]
        self.precision = self.precision + (w * x * x).sum(axis=0)

    def with_mean(self, weight: np.ndarray, bias: float) -> Posterior:
        return Posterior(np.concatenate([weight.reshape(-1), [bias]]).astype(np.float64), self.precision.copy())

    def save(self, directory: str | Path) -> None:
        save_file({"mean": self.mean, "precision": self.precision}, str(Path(directory) / POSTERIOR_FILE))

    @classmethod
    def load(cls, directory: str | Path) -> Posterior | None:
        path = Path(directory) / POSTERIOR_FILE
        if not path.exists():
            return None
        t = load_file(str(path))
        return cls(t["mean"], t["precision"])


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


@dataclass
class StyleResponse:
    """How one shopper responds to each copy style, beyond what the CTR head predicts.

    Per style: ``clicks`` observed and ``expected`` clicks (the sum of the CTR head's predicted
    CTR of the copies shown). The shopper's multiplier on the head's CTR for a style, r, has a
    Gamma(strength, strength) prior (mean 1) and, as clicks are Poisson given the expected count,
    the conjugate posterior Gamma(strength + clicks, strength + expected): observed over expected,
    shrunk towards 1. Its log is a logit offset (CTRs are small), drawn per Thompson draw.

    Tastes drift, so evidence ages: ``decay_to`` discounts both counts by half every
    ``half_life`` (discounted Thompson sampling): the ratio stays, the certainty fades, and recent
    clicks outweigh old ones. ``as_of_ms`` is when the counts were last discounted.
    """

    clicks: dict[str, float]
    expected: dict[str, float]
    as_of_ms: int | None = None

    @classmethod
    def empty(cls) -> StyleResponse:
        return cls({}, {})

    def aged(self, now_ms: int, half_life_ms: float) -> StyleResponse:
        """A copy discounted to ``now_ms``: what a reader at ``now_ms`` uses (the stored counts are
        as of the last update)."""
        out = StyleResponse(dict(self.clicks), dict(self.expected), self.as_of_ms)
        out.decay_to(now_ms, half_life_ms)
        return out

    def decay_to(self, now_ms: int, half_life_ms: float) -> None:
        """Discount the counts from ``as_of_ms`` to ``now_ms`` (x 0.5 ** (elapsed / half_life));
        nothing when ``half_life_ms <= 0`` or time did not move forward."""
        if self.as_of_ms is not None and now_ms <= self.as_of_ms:
            return
        if half_life_ms > 0 and self.as_of_ms is not None:
            f = 0.5 ** ((now_ms - self.as_of_ms) / half_life_ms)
            for counts in (self.clicks, self.expected):
                for style in counts:
                    counts[style] *= f
        self.as_of_ms = now_ms

    def observe(self, style: str, predicted: float, clicked: bool) -> None:
        self.expected[style] = self.expected.get(style, 0.0) + float(predicted)
        if clicked:
            self.clicks[style] = self.clicks.get(style, 0.0) + 1.0

    def posterior(self, style: str, strength: float) -> tuple[float, float]:
        """(shape, rate) of the multiplier's Gamma posterior."""
        return strength + self.clicks.get(style, 0.0), strength + self.expected.get(style, 0.0)

    def log_factors(self, styles: list[str], strength: float, rng: np.random.Generator | None = None,
                    draws: int = 1) -> np.ndarray:
        """(draws, len(styles)) log multipliers: posterior samples, or the posterior mean of log r
        (digamma(shape) - log(rate)) in every row when ``rng`` is None."""
        shape = np.array([self.posterior(s, strength)[0] for s in styles])
        rate = np.array([self.posterior(s, strength)[1] for s in styles])
        if rng is None:  # E[log r] = digamma(shape) - log(rate); asymptotic digamma, shape >= strength
            digamma = np.log(shape) - 1.0 / (2.0 * shape) - 1.0 / (12.0 * shape**2)
            return np.tile(digamma - np.log(rate), (draws, 1))
        return np.log(rng.gamma(shape, 1.0 / rate, size=(draws, len(styles))))
