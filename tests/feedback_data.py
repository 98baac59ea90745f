"""Synthetic feedback for the online-trainer tests and benchmarks/trainer.py: template copies of
every style for catalog products, clicked with a per-style probability (one style far more)."""

from __future__ import annotations

import random
from collections.abc import Mapping

from core.catalog import Catalog
from core.contracts import FeedbackRecord, format_ts
from core.styles import STYLES
from models.corpus import template_copy
from models.text.context import build_prompt, product_context
from models.text.slots import fill

MODEL = "livecopy-student"


def style_ctr(favoured: str, high: float = 0.6, low: float = 0.03) -> dict[str, float]:
    return {s: (high if s == favoured else low) for s in STYLES}


def feedback_records(n: int, ctr: Mapping[str, float], *, seed: int = 0, version: str = "0.9.0",
                     products: int = 60, prefix: str = "imp") -> list[FeedbackRecord]:
    """``n`` labelled impressions: a uniformly chosen style (logged propensity 1/len(STYLES)),
    a template copy of it, clicked with probability ``ctr[style]``."""
    rng = random.Random(seed)
    cat = Catalog.generate(products, seed=11)
    items = list(cat)
    out = []
    t0 = 1_795_000_000_000
    for i in range(n):
        p = rng.choice(items)
        ctx = product_context(p)
        style = rng.choice(STYLES)
        template = template_copy(ctx, style, rng, personal=False)
        text = fill(template, ctx)
        clicked = rng.random() < ctr[style]
        ts = t0 + i * 1000
        out.append(FeedbackRecord(
            impression_id=f"{prefix}-{seed}-{i}", copy_id=f"c-{seed}-{i}", user_id=f"u{i % 97}",
            product_id=p.product_id, model_version=version, text=text, clicked=clicked,
            impression_ts=format_ts(ts), click_ts=format_ts(ts + 5000) if clicked else None,
            features=ctx.features(), model=MODEL, policy="random", propensity=1.0 / len(STYLES), score=0.1,
            style=style, template=template,
        ))
    return out


def probe_prompts(n: int = 40) -> list[str]:
    cat = Catalog.generate(n, seed=99)
    return [build_prompt(product_context(p)) for p in cat]


def impression_event(impression_id: str, copy_id: str, *, ts: int, user: str = "u1", product: str = "p1",
                     slot: str | None = None, kind: str = "impression") -> dict[str, object]:
    """A ``livecopy.events`` impression (or, with ``kind='click'``, click) event."""
    ev: dict[str, object] = {"event_id": f"{impression_id}:{kind}:{ts}", "type": kind, "user_id": user, "ts": ts,
                             "product_id": product, "impression_id": impression_id, "copy_id": copy_id}
    if slot is not None:
        ev["slot"] = slot
    return ev


def click_event(impression_id: str, copy_id: str, *, ts: int, user: str = "u1", product: str = "p1",
                ) -> dict[str, object]:
    return impression_event(impression_id, copy_id, ts=ts, user=user, product=product, kind="click")


def copy_record(copy_id: str, *, user: str = "u1", product: str = "p1", model_version: str = "v1",
                style: str = "benefit", propensity: float = 0.5, policy: str = "thompson") -> bytes:
    """A ``livecopy.copy`` record (GeneratedCopy JSON) with features whose category is home/kitchen."""
    from core.contracts import GeneratedCopy, now_rfc3339

    feats = {"product": {"product_id": product, "title": "Steel kettle", "category": "home/kitchen", "price": 39.9}}
    return GeneratedCopy(
        copy_id=copy_id, user_id=user, product_id=product, text=f"Boil faster with {product}",
        model=MODEL, model_version=model_version, score=0.1, policy=policy, created_at=now_rfc3339(),
        propensity=propensity, style=style, features=feats, slot=None,
    ).model_dump_json(exclude_none=True).encode()
