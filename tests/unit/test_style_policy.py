"""The style policy: what it reads of a context (spend band included) and what it learns from clicks."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from core.catalog import Catalog
from core.styles import STYLES
from models.style_policy import StylePolicy, choice_offsets, context_keys, spend_band
from models.text.context import product_context


def test_spend_band_is_the_octave_of_the_typical_item_value_or_unknown() -> None:
    ctx = product_context(Catalog.generate(5, 1).products[0], "pdp")
    assert spend_band(ctx) == "unknown"
    assert spend_band(ctx.with_persona(raw={"typical_item_value": 20.0})) == "4"
    assert spend_band(ctx.with_persona(raw={"typical_item_value": 300.0})) == "8"
    assert spend_band(ctx.with_persona(raw={"typical_item_value": math.inf})) == "unknown"
    assert spend_band(ctx.with_persona(raw={"typical_item_value": 1e300})) == "20"  # clipped: bounded keys
    assert "spend=8" in context_keys(ctx.with_persona(raw={"typical_item_value": 300.0}))


def fitted_on_two_segments() -> StylePolicy:
    """Thrifty and affluent shoppers share every prompt bucket; only what they spend differs. Fitted on
    the click residual (the head's log-CTR is the same for both), the policy tilts each to its style."""
    rng = random.Random(3)
    base = product_context(Catalog.generate(5, 1).products[0], "pdp")
    ctr = {("thrifty", "discount"): 0.25, ("thrifty", "quality"): 0.05,
           ("affluent", "discount"): 0.05, ("affluent", "quality"): 0.25}
    contexts, styles, targets, residuals = [], [], [], []
    p_head = 0.15  # a head that cannot tell them apart
    for _ in range(6000):
        seg = rng.choice(["thrifty", "affluent"])
        st = rng.choice(["discount", "quality"])
        ctx = base.with_persona(raw={"typical_item_value": 12.0 if seg == "thrifty" else 400.0})
        y = float(rng.random() < ctr[seg, st])
        contexts.append(ctx)
        styles.append(st)
        targets.append(math.log(p_head) + (y - p_head) / p_head)
        residuals.append((y - p_head) / p_head)
    policy = StylePolicy.fit(contexts, styles, np.asarray(targets), temperature=0.3, residuals=residuals)
    thrifty = policy.bias(base.with_persona(raw={"typical_item_value": 10.0}))
    affluent = policy.bias(base.with_persona(raw={"typical_item_value": 500.0}))
    assert thrifty["discount"] == 0.0 and thrifty["quality"] < -1.0
    assert affluent["quality"] == 0.0 and affluent["discount"] < -1.0
    assert set(thrifty) == set(STYLES) and min(thrifty.values()) >= -policy.max_tilt
    # the choice among candidates: the residual offsets favour the same style, per shopper
    low = base.with_persona(raw={"typical_item_value": 10.0})
    off = choice_offsets(policy, low, ["quality", "discount", None], None, draws=5)
    assert off is not None and off.shape == (5, 3) and (off[:, 1] > off[:, 0] + 0.5).all() and (off[:, 2] == 0).all()
    factors = np.full((5, len(STYLES)), 0.25)
    both = choice_offsets(policy, low, ["quality", "discount", None], factors, 5)
    assert both is not None and np.allclose(both, off + np.array([0.25, 0.25, 0.0]))
    return policy


def test_clicks_teach_the_policy_a_taste_that_only_the_spend_band_shows() -> None:
    fitted_on_two_segments()


def test_the_policy_round_trips_through_its_file_residual_included(tmp_path: Path) -> None:
    policy = fitted_on_two_segments()
    policy.save(tmp_path)
    back = StylePolicy.load(tmp_path)
    assert back is not None and back.keys == policy.keys and back.residual is not None
    ctx = product_context(Catalog.generate(5, 1).products[0], "pdp").with_persona(raw={"typical_item_value": 400.0})
    assert np.allclose(back.offsets(ctx), policy.offsets(ctx), atol=1e-4)
    assert back.bias(ctx) == pytest.approx(policy.bias(ctx), abs=1e-3)
    no_residual = StylePolicy(policy.keys, policy.weight, policy.temperature)
    assert no_residual.offsets(ctx) is None and choice_offsets(no_residual, ctx, ["quality"], None, 3) is None
