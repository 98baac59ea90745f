"""How likely the corpus's phrasings read to a general language model (corpus work, issue 16).

    python benchmarks/phrasing_nll.py                          # every core, opener and CTA of models/corpus.py
    python benchmarks/phrasing_nll.py --extra candidates.json  # also {"quality": ["The {title} {is} ...", ...]}

Each template core (and each opener and call to action, put before / after the plainest core of
its style) is filled for ``--products`` products -- half from the training catalog, half from the
disjoint generator at a seed the benchmark does not sample (``--disjoint-seed``); never the
hand-written real-world catalogs, which stay held out -- and scored with the base SmolLM2's
per-token NLL (``models.teacher.copy_nll``, the fluency figure of ``benchmarks/real_catalog.py``).
Printed per phrasing: mean NLL/token and its difference to the fallback template's on the same
products (negative: more fluent than the fallback).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.catalog import Catalog, Product
from models import corpus
from models.text.context import CopyContext, product_context
from models.text.filter import fallback_copy
from models.text.slots import MissingSlot, available, fill, slots_in


def _products(n: int, disjoint_seed: int, seed: int) -> list[Product]:
    from livecopy.sim.disjoint_catalog import generate_disjoint

    rng = random.Random(seed)
    train = rng.sample(list(Catalog.generate()), n - n // 2)
    disj = rng.sample(list(generate_disjoint(seed=disjoint_seed)), n // 2)
    return train + disj


def _render(core: str, ctx: CopyContext) -> str | None:
    slotted = corpus.slotted_core(core, ctx)
    if not set(slots_in(slotted)) <= available(ctx):
        return None
    try:
        return fill(slotted, ctx)
    except MissingSlot:
        return None


def score(bt: Any, phrasings: dict[str, list[str]],
          ctxs: list[CopyContext]) -> list[tuple[str, str, float, float, int]]:
    """(group, phrasing, NLL/token, fallback NLL/token on the same products, products) per phrasing."""
    from models.teacher import copy_nll

    fallback = copy_nll(bt, [fallback_copy(c) for c in ctxs])  # scored once per product
    out = []
    for group, items in phrasings.items():
        for ph in items:
            rendered = [(i, t) for i, c in enumerate(ctxs) if (t := _render(ph, c)) is not None]
            if not rendered:
                continue
            idx = [i for i, _ in rendered]
            s = copy_nll(bt, [t for _, t in rendered])
            ns = sum(x for x, _ in s) / sum(n for _, n in s)
            nf = sum(fallback[i][0] for i in idx) / sum(fallback[i][1] for i in idx)
            out.append((group, ph, ns, nf, len(idx)))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--products", type=int, default=40)
    ap.add_argument("--disjoint-seed", type=int, default=23, help="Not the benchmark's (11).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", default=None, help="JSON {core key or label: [slotted phrasing, ...]}.")
    ap.add_argument("--only-extra", action="store_true")
    args = ap.parse_args(argv)
    from models.teacher import load_base

    bt = load_base()
    ctxs = [product_context(p, "pdp") for p in _products(args.products, args.disjoint_seed, args.seed)]
    phrasings: dict[str, list[str]] = {}
    if not args.only_extra:
        phrasings.update({k: list(v) for k, v in corpus._CORES.items()})
        plain = "The {title} {is} only {now_price}."
        phrasings["opener"] = [f"{o} {plain}" for v in corpus._OPENERS.values() for o in v]
        phrasings["cta"] = [f"{plain} {c}" for v in corpus._CTAS.values() for c in v]
        phrasings["plain"] = [plain]
    if args.extra:
        for k, v in json.loads(Path(args.extra).read_text()).items():
            phrasings.setdefault(k, []).extend(v)
    rows = score(bt, phrasings, ctxs)
    print(f"{len(ctxs)} products (training + disjoint seed {args.disjoint_seed}), base {bt.source}")
    print(f"{'group':<20}{'NLL':>7}{'fallback':>10}{'diff':>7}{'n':>4}  phrasing")
    for group, ph, ns, nf, n in rows:
        print(f"{group:<20}{ns:7.3f}{nf:10.3f}{ns - nf:+7.3f}{n:4d}  {ph}")


if __name__ == "__main__":
    main()
