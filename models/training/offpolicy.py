"""Off-policy estimates of a new version's CTR from logged feedback (pure numpy).

Given logged rewards ``r_i`` (clicked) and importance ratios ``w_i = pi_new(a_i|x_i) /
pi_log(a_i|x_i)``:

* IPS   ``V = mean(w_i r_i)`` -- unbiased when the ratios are exact, high variance;
* SNIPS ``V = sum(w_i r_i) / sum(w_i)`` -- self-normalised, slightly biased, far steadier;
* ``ess = (sum w)^2 / sum(w^2)`` -- the effective sample size (how many logged records the
  estimate is really worth).

Ratios are clipped at ``clip`` (bias for variance). How the trainer gets the ratios is in
:func:`ratios_from_logprobs` and docs/feedback.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class OffPolicyEstimate:
    n: int
    logged_ctr: float  # on-policy: the mean reward of the logging policy
    ips: float
    snips: float
    ess: float
    clipped: int  # ratios that hit the clip
    max_ratio: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(rewards: Sequence[float], ratios: Sequence[float], clip: float = 10.0) -> OffPolicyEstimate:
    r = np.asarray(rewards, dtype=np.float64)
    w = np.asarray(ratios, dtype=np.float64)
    if r.shape != w.shape:
        raise ValueError("rewards and ratios differ in length")
    n = int(r.size)
    if n == 0:
        nan = float("nan")
        return OffPolicyEstimate(0, nan, nan, nan, 0.0, 0, nan)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("importance ratios must be finite and >= 0")
    clipped = int(np.sum(w > clip))
    wc = np.minimum(w, clip)
    sw = float(wc.sum())
    return OffPolicyEstimate(
        n=n, logged_ctr=float(r.mean()), ips=float((wc * r).mean()),
        snips=float((wc * r).sum() / sw) if sw > 0 else float("nan"),
        ess=float(sw**2 / float((wc**2).sum())) if sw > 0 else 0.0, clipped=clipped, max_ratio=float(w.max()),
    )


def ratios_from_logprobs(new_logprob: Sequence[float], log_logprob: Sequence[float],
                         max_log_ratio: float = 20.0) -> list[float]:
    """``exp(log pi_new - log pi_log)`` per record, the exponent capped against overflow."""
    return [math.exp(min(a - b, max_log_ratio)) for a, b in zip(new_logprob, log_logprob, strict=True)]
