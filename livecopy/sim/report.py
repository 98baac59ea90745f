"""CTR-over-time series, the summary table and the PNG plot of a closed-loop run (benchmark and demo)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ARM_COLOURS = {"random": "#9e9e9e", "static": "#1f77b4", "online": "#d62728", "oracle": "#2ca02c",
               "served": "#ff7f0e"}


def windowed(xs: Sequence[float], window: int) -> tuple[list[int], list[float]]:
    """Means of consecutive windows of ``window`` values: (impression index at window end, mean)."""
    n = len(xs) // window
    if n == 0 and xs:
        return [len(xs)], [float(np.mean(xs))]
    arr = np.asarray(xs[: n * window], dtype=np.float64).reshape(n, window)
    return [(i + 1) * window for i in range(n)], [float(v) for v in arr.mean(axis=1)]


def summary(series: Mapping[str, Sequence[float]], tail: float = 0.2) -> dict[str, Any]:
    """CTR per policy over the whole run and over the last ``tail`` of it, with lift figures."""
    n = min(len(v) for v in series.values()) if series else 0
    start = int(n * (1.0 - tail))
    out: dict[str, Any] = {"impressions": n, "tail_from": start, "tail_share": tail, "ctr": {}, "ctr_all": {}}
    for arm, xs in series.items():
        out["ctr"][arm] = float(np.mean(xs[start:n])) if n > start else math.nan
        out["ctr_all"][arm] = float(np.mean(xs[:n])) if n else math.nan
    c = out["ctr"]
    if {"static", "online"} <= c.keys() and c["static"] > 0:
        out["online_over_static"] = c["online"] / c["static"]
    if {"static", "online", "oracle"} <= c.keys() and c["oracle"] != c["static"]:
        out["gap_recovered"] = (c["online"] - c["static"]) / (c["oracle"] - c["static"])
    if {"random", "online"} <= c.keys() and c["random"] > 0:
        out["online_over_random"] = c["online"] / c["random"]
    return out


def table(s: Mapping[str, Any], title: str = "closed loop") -> str:
    """The summary as a fixed-width text table."""
    lines = [f"{title}: {s['impressions']:,} impressions; CTR over the last {s['tail_share']:.0%} "
             f"(impressions {s['tail_from']:,}..{s['impressions']:,}) and over the whole run",
             f"{'policy':<10} {'CTR last':>9} {'CTR all':>9} {'x static':>9}"]
    static = s["ctr"].get("static")
    for arm, v in s["ctr"].items():
        rel = f"{v / static:9.3f}" if static else f"{'-':>9}"
        lines.append(f"{arm:<10} {v:9.4f} {s['ctr_all'][arm]:9.4f} {rel}")
    if "online_over_static" in s:
        lines.append(f"online / static = {s['online_over_static']:.3f}   (target >= 1.3)")
    if "gap_recovered" in s:
        lines.append(f"static->oracle gap recovered by online = {s['gap_recovered']:.1%}   (target >= 50%)")
    return "\n".join(lines)


def plot(path: str | Path, series: Mapping[str, Sequence[float]], window: int, *, title: str,
         versions: Sequence[tuple[int, str]] = (), ylabel: str = "CTR (expected under the hidden model)") -> Path:
    """PNG of CTR over time per policy; vertical ticks where the online model version changed
    (matplotlib's object API, as ``models.training.common.plot_losses``: no global backend switch, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for arm, xs in series.items():
        x, y = windowed(xs, window)
        ax.plot(x, y, label=arm, color=ARM_COLOURS.get(arm), linewidth=2.2 if arm == "online" else 1.5)
    for i, (at, _v) in enumerate(versions):
        ax.axvline(at, color="#d62728", alpha=0.25, linewidth=1, label="version hot-swapped" if i == 0 else None)
    online = series.get("online")
    if online is not None and len(online) > 1:
        for j, (start, end, mean, half) in enumerate(version_bands(online, versions)):
            ax.fill_between([start, end], [mean - half] * 2, [mean + half] * 2, color="#d62728", alpha=0.12,
                            linewidth=0, label="online per version, 95% CI" if j == 0 else None)
            ax.hlines(mean, start, end, color="#d62728", linewidth=1, linestyle="--")
    lo, hi = robust_range([v for xs in series.values() for v in windowed(xs, window)[1]])
    if lo < hi:
        ax.set_ylim(lo, hi)
    ax.set_xlabel("impressions")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", ncol=3, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def version_bands(xs: Sequence[float], versions: Sequence[tuple[int, str]]) -> list[tuple[int, int, float, float]]:
    """(start, end, mean, 95% half-width) of ``xs`` between consecutive version changes."""
    cuts = [0, *[at for at, _ in versions if 0 < at < len(xs)], len(xs)]
    out = []
    for a, b in itertools.pairwise(cuts):
        seg = np.asarray(xs[a:b], dtype=np.float64)
        if len(seg) >= 2:
            out.append((a, b, float(seg.mean()), float(1.96 * seg.std(ddof=1) / math.sqrt(len(seg)))))
    return out


def robust_range(values: Sequence[float], lo_q: float = 2.0, hi_q: float = 98.0,
                 pad: float = 0.15) -> tuple[float, float]:
    """A y-range from the 2nd to the 98th percentile, padded: one early spike cannot squash the rest."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return 0.0, 0.0
    lo, hi = float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q))
    span = max(hi - lo, 0.01)
    return max(0.0, lo - pad * span), min(1.0, hi + pad * span)


def version_changes(versions: Sequence[str]) -> list[tuple[int, str]]:
    """(impression index, version) at each change of the serving version."""
    out: list[tuple[int, str]] = []
    prev = None
    for i, v in enumerate(versions):
        if v != prev:
            if prev is not None:
                out.append((i, v))
            prev = v
    return out
