"""Evaluation shared by ``livecopy eval`` and ``benchmarks/models.py``.

Perplexity is measured on the held-out split (products never seen in training) over the copy
tokens and EOS, given the prompt and the style token. Teacher and student tokenize the corpus
identically (the student's tokenizer is a merge-closed subset of the teacher's), and the
comparison normalises both models' summed NLL by the *teacher's* token count of the same text
(and reports bits per UTF-8 byte), so it stays apples to apples even where a held-out word falls
apart into smaller student tokens.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.styles import classify_style
from models.corpus import Corpus, Example, build_corpus
from models.generate import generate_candidates, sequence_nll
from models.sequences import encode_pairs
from models.student import ModelMeta, StudentModel, load_student
from models.text.context import CopyContext, build_prompt, context_from_features, product_context
from models.text.filter import FilterStats, check_copy, fallback_copy


@dataclass
class AnyModel:
    model: Any
    tokenizer: Any
    meta: ModelMeta
    kind: str  # student | teacher
    path: Path

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def load_any(path: str | Path, device: str = "cpu") -> AnyModel:
    """A student or teacher directory."""
    p = Path(path)
    cfg = json.loads((p / "config.json").read_text())
    if cfg.get("model_type") == "livecopy_student":
        ls = load_student(p, device=device)
        return AnyModel(ls.model, ls.tokenizer, ls.meta, "student", p)
    from models.teacher import load_teacher

    lt = load_teacher(p, device=device)
    return AnyModel(lt.model, lt.tokenizer, lt.meta, "teacher", p)


def dir_size_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


@functools.lru_cache(maxsize=1)
def default_corpus() -> Corpus:
    """The default corpus (built once per process, ~4 s)."""
    return build_corpus()


def heldout_examples(n: int = 0, seed: int = 0) -> list[Example]:
    """The held-out LM rows of the default corpus; ``n > 0``: a deterministic subset."""
    rows = [r for r in default_corpus().heldout if r.lm]
    if 0 < n < len(rows):
        rows = random.Random(seed).sample(rows, n)
    return rows


@torch.no_grad()
def copy_nll_rows(m: AnyModel, rows: Sequence[Example], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per-row summed copy NLL (nats; copy tokens + EOS, style token excluded) and token count."""
    m.model.eval()
    nll_all: list[float] = []
    n_all: list[int] = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        b = encode_pairs(m.tokenizer, [r.prompt for r in chunk], [r.copy for r in chunk],
                         styles=[r.style for r in chunk], max_len=256)
        nll, n = sequence_nll(m.model, b)
        nll_all.extend(nll.tolist())
        n_all.extend(n.tolist())
    return np.asarray(nll_all), np.asarray(n_all)


def perplexity_report(m: AnyModel, rows: Sequence[Example], ref_tokens: np.ndarray | None = None) -> dict[str, float]:
    nll, n = copy_nll_rows(m, rows)
    tokens = n if ref_tokens is None else ref_tokens
    n_bytes = sum(len(r.copy.encode()) + 1 for r in rows)  # +1: EOS counted as one byte
    return {
        "heldout_ppl": math.exp(nll.sum() / tokens.sum()),
        "heldout_ppl_own_tokens": math.exp(nll.sum() / n.sum()),
        "heldout_bits_per_byte": float(nll.sum() / math.log(2) / n_bytes),
        "heldout_rows": float(len(rows)),
        "heldout_tokens": float(tokens.sum()),
    }


def measure_speed(
    m: AnyModel, prompts: Sequence[str], batch: int, n_copies: int, max_new_tokens: int = 48, seed: int = 0
) -> dict[str, float]:
    """Copies/s sampling one copy per prompt at ``batch`` prompts per call (after one warm-up)."""
    with_ctr = m.kind == "student"
    generate_candidates(m.model, m.tokenizer, list(prompts[:batch]), k=1, max_new_tokens=max_new_tokens,
                        seed=seed, with_ctr=with_ctr)
    done = 0
    tokens = 0
    t0 = time.perf_counter()
    i = 0
    while done < n_copies:
        chunk = [prompts[(i + j) % len(prompts)] for j in range(batch)]
        i += batch
        out = generate_candidates(m.model, m.tokenizer, chunk, k=1, max_new_tokens=max_new_tokens,
                                  seed=seed + i, with_ctr=with_ctr)
        done += len(out)
        tokens += sum(len(g[0].token_ids) for g in out)
    dt = time.perf_counter() - t0
    return {"copies_per_s": done / dt, "tokens_per_s": tokens / dt, "copies": float(done), "seconds": dt}


DEMO_PERSONAS: dict[str, dict[str, Any]] = {
    "cold start": {"user": "new", "price_sensitivity": "unknown", "engagement": "cold"},
    "bargain hunter": {"user": "returning", "price_sensitivity": "high", "engagement": "lapsed", "affinity": "some"},
    "eco fan": {"user": "returning", "price_sensitivity": "mid", "engagement": "engaged", "eco_minded": True,
                "affinity": "high"},
    "big spender": {"user": "returning", "price_sensitivity": "low", "engagement": "engaged", "affinity": "high"},
}


def demo_contexts(n_products: int = 5, seed: int = 3) -> list[tuple[str, CopyContext]]:
    """Held-out products (varied categories) x :data:`DEMO_PERSONAS`."""
    rows = [r for r in default_corpus().heldout if r.lm]
    by_cat: dict[str, CopyContext] = {}
    for r in random.Random(seed).sample(rows, len(rows)):
        ctx = context_from_features(r.features)
        top = ctx.category.split("/")[0]
        if top not in by_cat and (len(by_cat) % 2 == 0 or ctx.eco or ctx.discount_pct):
            by_cat[top] = product_context(ctx.to_product(), slot="pdp")
        if len(by_cat) >= n_products:
            break
    out: list[tuple[str, CopyContext]] = []
    for ctx in by_cat.values():
        for name, persona in DEMO_PERSONAS.items():
            p = dict(persona)
            if p.get("affinity") in ("some", "high"):
                p["likes"] = (ctx.leaf_category,) if p["affinity"] == "high" else ("kitchen", ctx.leaf_category)
            out.append((name, ctx.with_persona(**p)))
    return out


def sample_copies(
    m: AnyModel, contexts: Sequence[tuple[str, CopyContext]], k: int = 4, seed: int = 0
) -> tuple[list[dict[str, Any]], FilterStats]:
    """One copy per context: the passing candidate with the highest CTR (student) or the first
    passing one (teacher); the fallback template when none passes."""
    stats = FilterStats()
    prompts = [build_prompt(c) for _, c in contexts]
    cands = generate_candidates(m.model, m.tokenizer, prompts, k=k, seed=seed, with_ctr=m.kind == "student")
    out: list[dict[str, Any]] = []
    for (name, ctx), group in zip(contexts, cands, strict=True):
        ok = []
        reasons = []
        for c in group:
            res = check_copy(c.text, ctx)
            stats.record(res)
            (ok.append(c) if res.ok else reasons.append(res.reason))
        if ok:
            best = max(ok, key=lambda c: c.ctr if c.ctr is not None else 0.0)
            text, style, used_fb = best.text, best.style, False
        else:
            stats.fallbacks += 1
            text, style, used_fb = fallback_copy(ctx), "practical", True
        out.append({
            "persona": name, "product": ctx.title, "price": ctx.price, "discount_pct": ctx.discount_pct,
            "eco": ctx.eco, "style": style, "text": text, "fallback": used_fb,
            "ok": not used_fb, "reason": None if ok else (reasons[0] if reasons else None),
            "text_style": classify_style(text),
        })
    return out, stats


def evaluate_dir(
    path: str | Path, rows: int = 1000, n_samples: int = 12, speed: bool = True, device: str = "cpu"
) -> dict[str, Any]:
    """The report behind ``livecopy eval``."""
    m = load_any(path, device=device)
    held = heldout_examples(rows)
    metrics: dict[str, Any] = {"params": m.params, "disk_mb": round(dir_size_mb(path), 2),
                               "vocab_size": len(m.tokenizer)}
    metrics.update(perplexity_report(m, held))
    if m.kind == "student":
        assert isinstance(m.model, StudentModel)
        from models.sequences import special_ids
        from models.training.common import EncodedRows, ctr_metrics

        all_held = default_corpus().heldout
        metrics.update(ctr_metrics(m.model, EncodedRows.build(m.tokenizer, all_held), special_ids(m.tokenizer),
                                   torch.device(device)))
    if speed:
        prompts = [r.prompt for r in held[:64]]
        for b, n in ((1, 16 if m.kind == "student" else 4), (32, 128 if m.kind == "student" else 32)):
            sp = measure_speed(m, prompts, b, n)
            metrics[f"copies_per_s_batch{b}"] = sp["copies_per_s"]
    samples: list[dict[str, Any]] = []
    if n_samples:
        ctxs = demo_contexts(max(1, math.ceil(n_samples / len(DEMO_PERSONAS))))[:n_samples]
        samples, fstats = sample_copies(m, ctxs)
        metrics["sample_filter_pass_rate"] = fstats.as_dict()["pass_rate"]
        metrics["sample_fallbacks"] = fstats.fallbacks
        metrics["sample_style_agreement"] = float(np.mean([s["style"] == s["text_style"] for s in samples]))
    return {"name": m.meta.name, "version": m.meta.version, "kind": m.kind, "path": str(path),
            "metrics": metrics, "samples": samples}
