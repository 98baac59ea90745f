"""What the offline and online trainers share: seeding, autocast, the LR schedule, encoded rows, held-out
NLL and the CTR metrics (AUC, log loss)."""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.corpus import Example
from models.sequences import IGNORE_INDEX, SpecialIds, assemble, encode_text, special_ids
from models.student import StudentModel

log = logging.getLogger(__name__)

Progress = Callable[[int, int, dict[str, float]], None]


# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True) -> Any:
    if not enabled:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    prog = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))


def auc(scores: Sequence[float], labels: Sequence[bool | int]) -> float:
    """ROC AUC by the rank statistic (ties averaged); NaN when the labels hold a single class
    (AUC is undefined there: use :func:`auc_or_none` for metrics that end up in JSON)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_or_none(scores: Sequence[float], labels: Sequence[bool | int]) -> float | None:
    """:func:`auc`, or None when it is undefined (no positive or no negative label)."""
    v = auc(scores, labels)
    return None if math.isnan(v) else v


def plot_losses(history: dict[str, list[tuple[int, float]]], path: str | Path, title: str) -> Path:
    """Loss curves as a PNG (matplotlib's object API: no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, pts in history.items():
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=name, marker="o" if len(pts) < 40 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out))
    return out


@dataclass
class EncodedRows:
    """Pre-tokenized corpus rows (prompt ids, copy ids, style id, lm flag, CTR target)."""

    prompt_ids: list[list[int]]
    copy_ids: list[list[int]]
    style_ids: list[int]
    lm: list[bool]
    click_p: list[float]
    clicked: list[bool]

    @classmethod
    def build(cls, tokenizer: Any, rows: Sequence[Example]) -> EncodedRows:
        sid = special_ids(tokenizer)
        return cls(
            prompt_ids=encode_text(tokenizer, [r.prompt for r in rows]),
            copy_ids=encode_text(tokenizer, [r.copy for r in rows]),
            style_ids=[sid.styles[r.style] for r in rows],
            lm=[r.lm for r in rows],
            click_p=[r.click_p for r in rows],
            clicked=[r.clicked for r in rows],
        )

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def batch(self, idx: Sequence[int], sid: SpecialIds, max_len: int) -> dict[str, torch.Tensor]:
        b = assemble(
            [self.prompt_ids[i] for i in idx], [self.copy_ids[i] for i in idx], [self.style_ids[i] for i in idx],
            sid, max_len=max_len, lm_mask=[self.lm[i] for i in idx],
        )
        b["click_p"] = torch.tensor([self.click_p[i] for i in idx], dtype=torch.float32)
        b["clicked"] = torch.tensor([self.clicked[i] for i in idx], dtype=torch.bool)
        return b


def to_device(b: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in b.items()}


@torch.no_grad()
def heldout_nll(
    model: Any, rows: EncodedRows, sid: SpecialIds, device: torch.device, max_len: int = 160,
    batch_size: int = 64, bf16: bool = False,
) -> dict[str, float]:
    """Copy NLL (copy tokens + EOS, given prompt and style; nats) and style NLL over ``rows``
    with ``lm`` set."""
    model.eval()
    idx = [i for i in range(len(rows)) if rows.lm[i]]
    tot_copy, n_copy, tot_style, n_rows = 0.0, 0, 0.0, 0
    for s in range(0, len(idx), batch_size):
        b = to_device(rows.batch(idx[s : s + batch_size], sid, max_len), device)
        with autocast(device, bf16 and device.type == "cuda"):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits = logits[:, :-1].float()
        tgt = b["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.clamp_min(0).reshape(-1), reduction="none"
        ).view(tgt.shape)
        valid = tgt != IGNORE_INDEX
        r = torch.arange(tgt.shape[0], device=device)
        si = b["style_index"]
        style_nll = nll[r, si]
        valid[r, si] = False
        tot_copy += float((nll * valid).sum())
        n_copy += int(valid.sum())
        tot_style += float(style_nll.sum())
        n_rows += tgt.shape[0]
    return {
        "copy_nll": tot_copy / max(n_copy, 1), "copy_ppl": math.exp(tot_copy / max(n_copy, 1)),
        "copy_tokens": float(n_copy), "style_nll": tot_style / max(n_rows, 1),
    }


# --------------------------------------------------------------------------- teacher


def eval_subset(rows: Sequence[Example], n: int, seed: int) -> list[Example]:
    lm = [r for r in rows if r.lm]
    if n <= 0 or n >= len(lm):
        return lm
    return random.Random(seed).sample(lm, n)


def jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


# --------------------------------------------------------------------------- student


@torch.no_grad()
def ctr_metrics(
    model: StudentModel, rows: EncodedRows, sid: SpecialIds, device: torch.device, max_len: int = 160,
    batch_size: int = 128,
) -> dict[str, float | None]:
    """CTR head on every row (incl. CTR-only rows): AUC against the sampled synthetic clicks,
    the AUC the prior's own probabilities reach on the same clicks (the ceiling), log loss and
    calibration. Both AUCs are None (JSON null, with a warning) when the rows' clicks are all one
    class -- AUC is undefined there; ``ctr_clicks`` says how many clicks the rows hold."""
    model.eval()
    preds: list[float] = []
    for s in range(0, len(rows), batch_size):
        idx = list(range(s, min(s + batch_size, len(rows))))
        b = to_device(rows.batch(idx, sid, max_len), device)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1,
                    return_hidden=True)
        h = out.hidden_states[torch.arange(len(idx), device=device), b["eos_index"]].float()
        logit, _ = model.ctr_from_hidden(h)
        preds.extend(torch.sigmoid(logit).tolist())
    y = np.asarray(rows.clicked, dtype=bool)
    p = np.clip(np.asarray(preds), 1e-6, 1 - 1e-6)
    prior = np.asarray(rows.click_p)
    n_clicks = int(y.sum())
    if n_clicks in (0, len(y)):
        log.warning("CTR AUC undefined: %d of %d held-out rows clicked (one class only)", n_clicks, len(y))
    return {
        "ctr_auc_heldout": auc_or_none(p.tolist(), y.tolist()),
        "ctr_auc_prior_ceiling": auc_or_none(prior.tolist(), y.tolist()),
        "ctr_logloss_heldout": float(-(y * np.log(p) + (~y) * np.log(1 - p)).mean()),
        "ctr_mean_pred": float(p.mean()), "ctr_mean_clicked": float(y.mean()), "ctr_rows": float(len(y)),
        "ctr_clicks": float(n_clicks),
    }
