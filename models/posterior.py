"""The CTR head's Bayesian last layer: a diagonal Gaussian over its output weights (Laplace), saved
with a version as ``ctr_posterior.safetensors``; Thompson sampling (:mod:`engine.policy`) draws from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

POSTERIOR_FILE = "ctr_posterior.safetensors"


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
