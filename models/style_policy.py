"""The style policy a version ships: per context and style, a tilt of the style token's logit.

``Q(style | context) = sum of w[key, style]`` over the context's keys (department, price band,
deal, reviews, price sensitivity, new/returning, engagement, eco, slot, liked categories, spend band) is a
linear estimate of the log-CTR of that style's copy there. Serving adds ``(Q - max Q) / temperature``
to the style tokens' first-step logits (``p(style) ∝ p0(style | prompt) * exp(Q / temperature)``:
the closed form of a KL-anchored improvement of the student's style choice). Saved as
``style_policy.safetensors`` in the version's checkpoint (keys in the file's metadata).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from core.styles import STYLES
from models.text.context import CopyContext, _buckets, department

STYLE_POLICY_FILE = "style_policy.safetensors"


def context_keys(ctx: CopyContext) -> list[str]:
    """The sparse features of a context the style policy reads (what the prompt says, in buckets)."""
    keys = [
        "bias", f"dept={department(ctx.category, ctx.noun)}", f"band={ctx.price_band}",
        *(b.replace(" ", "=", 1) for b in _buckets(ctx)), f"eco={int(ctx.eco)}", f"user={ctx.user}",
        f"ps={ctx.price_sensitivity}", f"eng={ctx.engagement}", f"eco_minded={int(ctx.eco_minded)}",
        f"slot={ctx.slot}",
    ]
    keys += [f"likes={x}" for x in ctx.likes[:4]]
    keys.append(f"spend={spend_band(ctx)}")
    # the crosses a shopper segment shows through: what sells in a department depends on who reads it
    dept, ps, eco = keys[1], keys[keys.index(f"ps={ctx.price_sensitivity}")], f"eco_minded={int(ctx.eco_minded)}"
    keys += [f"{dept}&{ps}", f"{dept}&{eco}", f"{ps}&{eco}", f"{ps}&{keys[3]}"]
    return keys


def spend_band(ctx: CopyContext) -> str:
    """The shopper's typical item value in octaves (``2^k`` up to ``2^(k+1)``, the site's currency), or
    ``unknown``: who spends what is a taste the prompt's relative price bucket does not carry."""
    v = ctx.raw.get("typical_item_value", 0.0)
    return str(min(20, max(-4, math.floor(math.log2(v))))) if v > 0 and math.isfinite(v) else "unknown"


@dataclass
class StylePolicy:
    """``weight[key][style]``: the linear Q; ``temperature``: how far serving moves from p0."""

    keys: list[str]
    weight: np.ndarray  # (len(keys), len(STYLES))
    temperature: float
    rows: int = 0  # feedback rows it was fitted on
    max_tilt: float = 3.0
    # (len(keys), len(STYLES)) or None: the log-CTR the CTR head misses per style (fitted on the clicks'
    # residuals), added to each candidate's logit when one copy is chosen among the candidates
    residual: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._index = {k: i for i, k in enumerate(self.keys)}

    def q(self, ctx: CopyContext) -> np.ndarray:
        ix = [self._index[k] for k in context_keys(ctx) if k in self._index]
        return self.weight[ix].sum(axis=0) if ix else np.zeros(len(STYLES))

    def offsets(self, ctx: CopyContext) -> np.ndarray | None:
        """Per style, the log-CTR the CTR head misses in ``ctx`` (within +-``max_tilt``); None when not fitted."""
        if self.residual is None:
            return None
        ix = [self._index[k] for k in context_keys(ctx) if k in self._index]
        r = self.residual[ix].sum(axis=0) if ix else np.zeros(len(STYLES))
        return np.clip(r - r.mean(), -self.max_tilt, self.max_tilt)

    def bias(self, ctx: CopyContext) -> dict[str, float]:
        """The logits added to each style token for ``ctx``: 0 for the best style, negative for the others,
        never below ``-max_tilt`` (every style keeps at least e^-max_tilt of its weight: exploration, and
        the support the off-policy estimates need)."""
        q = self.q(ctx)
        top = q.max()
        return {st: max(-self.max_tilt, float((v - top) / self.temperature)) for st, v in zip(STYLES, q, strict=True)}

    def tilt(self, ctx: CopyContext, p0: Mapping[str, float]) -> dict[str, float]:
        """``p0`` (the student's p(style | prompt)) tilted as serving tilts it."""
        b = self.bias(ctx)
        w = {st: p * float(np.exp(b.get(st, 0.0))) for st, p in p0.items()}
        z = sum(w.values()) or 1.0
        return {st: v / z for st, v in w.items()}

    @classmethod
    def fit(cls, contexts: Sequence[CopyContext], styles: Sequence[str], targets: Sequence[float], *,
            temperature: float, max_tilt: float = 3.0, ridge: float = 20.0,
            residuals: Sequence[float] | None = None) -> StylePolicy:
        """Per style, ridge regression of ``targets`` (the trainer: the CTR head's log-CTR of each shown copy
        plus the click's residual) on the context keys, shrunk towards the mean target of all rows (a style seldom
        shown keeps the average). ``residuals`` (e.g. the clicks' ``(y - p) / p``): a second regression on
        the same keys, :meth:`offsets`, what the head misses."""
        keys = sorted({k for c in contexts for k in context_keys(c)})
        index = {k: i for i, k in enumerate(keys)}
        y = np.asarray(targets, dtype=np.float64)
        mean = float(y.mean()) if len(y) else 0.0
        w = np.zeros((len(keys), len(STYLES)))
        w[index["bias"], :] = mean if "bias" in index else 0.0
        res = None if residuals is None else np.zeros((len(keys), len(STYLES)))
        e = None if residuals is None else np.asarray(residuals, dtype=np.float64)
        rows = [[index[k] for k in context_keys(c)] for c in contexts]
        for s, st in enumerate(STYLES):
            sel = [i for i, x in enumerate(styles) if x == st]
            if not sel:
                continue
            x = np.zeros((len(sel), len(keys)))
            for r, i in enumerate(sel):
                x[r, rows[i]] = 1.0
            a = x.T @ x + ridge * np.eye(len(keys))
            rhs = [x.T @ (y[sel] - mean)] + ([] if e is None else [x.T @ e[sel]])
            sol = np.linalg.solve(a, np.stack(rhs, axis=1))
            w[:, s] += sol[:, 0]
            if res is not None:
                res[:, s] = sol[:, 1]
        return cls(keys, w, temperature, len(y), max_tilt, res)

    def save(self, directory: str | Path) -> None:
        meta = {"keys": json.dumps(self.keys), "styles": json.dumps(list(STYLES)),
                "temperature": repr(self.temperature), "rows": str(self.rows), "max_tilt": repr(self.max_tilt)}
        tensors = {"weight": self.weight.astype(np.float32)}
        if self.residual is not None:
            tensors["residual"] = self.residual.astype(np.float32)
        save_file(tensors, str(Path(directory) / STYLE_POLICY_FILE), metadata=meta)

    @classmethod
    def load(cls, directory: str | Path) -> StylePolicy | None:
        path = Path(directory) / STYLE_POLICY_FILE
        if not path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta: dict[str, Any] = f.metadata() or {}
        if json.loads(meta.get("styles", "[]")) != list(STYLES):
            raise ValueError(f"{path}: styles {meta.get('styles')} differ from {list(STYLES)}")
        tensors = load_file(str(path))
        residual = tensors["residual"].astype(np.float64) if "residual" in tensors else None
        return cls(json.loads(meta["keys"]), tensors["weight"].astype(np.float64), float(meta["temperature"]),
                   int(meta.get("rows", 0)), float(meta.get("max_tilt", 3.0)), residual)


def choice_offsets(policy: StylePolicy | None, ctx: CopyContext, styles: Sequence[str | None],
                   factors: np.ndarray | None, draws: int) -> np.ndarray | None:
    """``(draws, K)`` logit offsets for choosing one of K candidates of ``styles``: the shopper's style
    response (``factors``: ``(draws, len(STYLES))`` Thompson draws) plus the policy's residual
    :meth:`StylePolicy.offsets`; None when neither applies."""
    r = None if policy is None else policy.offsets(ctx)
    if factors is None and r is None:
        return None
    per_style = factors if factors is not None else np.zeros((draws, len(STYLES)))
    if r is not None:
        per_style = per_style + r
    ix = {st: i for i, st in enumerate(STYLES)}
    return np.stack([per_style[:, ix[st]] if st in ix else np.zeros(len(per_style)) for st in styles], axis=1)
