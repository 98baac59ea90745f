"""Copy styles: the first-class "angle" of a marketing copy.

Every training sequence is ``prompt + <s:STYLE> + copy + EOS``; the student picks the style
itself as its first generated token, so p(style | context) is part of the language model and
online learning can move it. Styles must be recognisable from the text alone (the simulator
and analytics classify copy with keywords), so the corpus puts style markers in every copy and
:func:`classify_style` reads them back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

STYLES: tuple[str, ...] = ("urgency", "discount", "quality", "eco", "social_proof", "practical")
"""All styles. ``practical`` is the neutral, benefit-first style (no marker words)."""

NEUTRAL_STYLE = "practical"


def style_token(style: str) -> str:
    """The control token of a style, e.g. ``<s:discount>``."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    return f"<s:{style}>"


STYLE_TOKENS: tuple[str, ...] = tuple(f"<s:{s}>" for s in STYLES)
_TOKEN_TO_STYLE = {f"<s:{s}>": s for s in STYLES}


def style_of_token(token: str) -> str | None:
    """``<s:eco>`` -> ``eco``; anything else -> None."""
    return _TOKEN_TO_STYLE.get(token)


# Marker phrases per style with a weight; a style needs a total of 1.0. Product attributes such
# as "organic", "recycled" or "eco-friendly" appear in titles, so they count 0.3 for eco (three
# of them are still not enough); the strong eco markers are words no product title uses. A
# marker right after a hyphen does not count ("space-saving" is not "saving").
STYLE_MARKERS: dict[str, tuple[tuple[str, float], ...]] = {
    "discount": (
        ("% off", 1.0), ("save", 1.0), ("saving", 1.0), ("deal", 1.0), ("discount", 1.0),
        ("price drop", 1.0), ("bargain", 1.0), ("markdown", 1.0), ("for less", 1.0),
        ("great value", 1.0), ("reduced", 1.0),
    ),
    "urgency": (
        ("today", 1.0), ("hurry", 1.0), ("selling fast", 1.0), ("last chance", 1.0),
        ("don't wait", 1.0), ("limited", 1.0), ("while stocks last", 1.0), ("ends soon", 1.0),
        ("before it's gone", 1.0), ("going fast", 1.0), ("right now", 1.0), ("tonight", 1.0),
        ("act fast", 1.0), ("in a flash", 1.0), ("don't miss out", 1.0),
    ),
    "quality": (
        ("crafted", 1.0), ("built to last", 1.0), ("made to last", 1.0), ("quality", 1.0),
        ("craftsmanship", 1.0), ("precision", 1.0), ("finest", 1.0), ("attention to detail", 1.0),
        ("engineered", 1.0), ("durable", 1.0), ("lasts for years", 1.0), ("last for years", 1.0), ("finish", 0.5),
    ),
    "eco": (
        ("sustainable", 1.0), ("sustainably", 1.0), ("planet", 1.0), ("footprint", 1.0),
        ("eco-conscious", 1.0), ("greener", 1.0), ("low-impact", 1.0), ("responsibly", 1.0),
        ("environment", 1.0),
        ("recycled", 0.3), ("organic", 0.3), ("eco-friendly", 0.3), ("fair-trade", 0.3),
    ),
    "social_proof": (
        ("bestseller", 1.0), ("best-seller", 1.0), ("stars", 1.0), ("reviews", 1.0),
        ("reviewers", 1.0), ("rated", 1.0), ("customers love", 1.0), ("shoppers love", 1.0),
        ("fan favourite", 1.0), ("loved by", 1.0), ("top-rated", 1.0), ("shoppers", 0.5),
        ("customers", 0.5),
    ),
}

# Tie-break order when two styles score the same.
_PRIORITY = ("discount", "urgency", "eco", "social_proof", "quality")

_MARKER_RES: dict[str, list[tuple[re.Pattern[str], float]]] = {
    style: [
        (re.compile(r"(?<![a-z-])" + re.escape(m) + (r"" if m.startswith("%") else r"s?(?![a-z])")), w)
        for m, w in markers
    ]
    for style, markers in STYLE_MARKERS.items()
}


def style_scores(text: str) -> dict[str, float]:
    """Weighted marker counts per marked style (``practical`` has no markers)."""
    low = text.lower().replace("\u2019", "'")
    return {style: sum(w for rx, w in res if rx.search(low)) for style, res in _MARKER_RES.items()}


def classify_style(text: str) -> str:
    """The style a reader would see in ``text``: the marked style with the highest weighted
    marker count (at least one full marker), else ``practical``."""
    scores = style_scores(text)
    best = max(_PRIORITY, key=lambda s: (scores[s], -_PRIORITY.index(s)))
    return best if scores[best] >= 1.0 else NEUTRAL_STYLE


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
