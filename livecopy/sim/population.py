"""The hidden shopper population and its click model (pure, seeded, no I/O besides loading a file).

Nothing here is visible to the learner: the services and the trainer only ever see the events
and clicks that :mod:`livecopy.sim.shoppers` produces from it. ``default_population.yaml`` (next
to this module) documents the click model; :func:`load_population` reads another YAML or JSON
file with the same fields (missing fields take the defaults).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.catalog import Catalog, Product
from core.styles import STYLES, classify_style

DEFAULT_POPULATION = Path(__file__).with_name("default_population.yaml")
COMFORT_BAND = 0.35  # sd of log(comfort price) around the user's typical price


@dataclass(frozen=True)
class Segment:
    name: str
    weight: float
    price_sensitivity: tuple[float, float]
    eco_share: float
    price_pull: float
    styles: Mapping[str, float]


@dataclass(frozen=True)
class SessionConfig:
    favourites: tuple[int, ...] = (1, 2, 2, 3)
    favourite_share: float = 0.8
    mean_views: float = 3.0
    search_share: float = 0.3
    feed_impression: float = 0.6
    pdp_impression: float = 0.8
    cart_after_click: float = 0.25
    cart_base: float = 0.06
    purchase: float = 0.4
    activity_zipf: float = 0.8


@dataclass(frozen=True)
class TextEffects:
    long_chars: int = 150
    long_penalty: float = 0.3
    exclaim_penalty: float = 0.15


@dataclass(frozen=True)
class PopulationConfig:
    """The hidden model's parameters (see default_population.yaml for their meaning)."""

    name: str = "default"
    seed: int = 7
    users: int = 3000
    catalog_size: int = 2000
    catalog_seed: int = 7
    base_logit: float = -3.0
    slot_logit: Mapping[str, float] = field(default_factory=dict)
    relevance: float = 0.5
    rating_weight: float = 0.4
    price_weight: float = 0.35
    discount_weight: float = 1.2
    style_global: Mapping[str, float] = field(default_factory=dict)
    category_style: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    taste_noise: float = 0.25
    text: TextEffects = field(default_factory=TextEffects)
    segments: tuple[Segment, ...] = ()
    sessions: SessionConfig = field(default_factory=SessionConfig)

    def merged(self, d: Mapping[str, Any]) -> PopulationConfig:
        """A copy with the fields of ``d`` (a parsed population file) replacing this one's."""
        kw: dict[str, Any] = {f: getattr(self, f) for f in self.__dataclass_fields__}
        for key in ("seed", "users", "catalog_size", "catalog_seed"):
            if key in d:
                kw[key] = int(d[key])
        for key in ("base_logit", "relevance", "rating_weight", "price_weight", "discount_weight", "taste_noise"):
            if key in d:
                kw[key] = float(d[key])
        if "name" in d:
            kw["name"] = str(d["name"])
        for key in ("slot_logit", "style_global"):
            if key in d:
                kw[key] = {str(k): float(v) for k, v in (d[key] or {}).items()}
        if "category_style" in d:
            kw["category_style"] = {
                str(c): {str(s): float(v) for s, v in (m or {}).items()} for c, m in (d["category_style"] or {}).items()
            }
        if "text" in d:
            t = dict(d["text"] or {})
            cur = self.text
            kw["text"] = TextEffects(int(t.get("long_chars", cur.long_chars)),
                                     float(t.get("long_penalty", cur.long_penalty)),
                                     float(t.get("exclaim_penalty", cur.exclaim_penalty)))
        if "segments" in d:
            segs = []
            for s in d["segments"]:
                lo, hi = s.get("price_sensitivity", [0.3, 0.7])
                segs.append(Segment(
                    name=str(s["name"]), weight=float(s.get("weight", 1.0)), price_sensitivity=(float(lo), float(hi)),
                    eco_share=float(s.get("eco_share", 0.1)), price_pull=float(s.get("price_pull", 0.0)),
                    styles={str(k): float(v) for k, v in (s.get("styles") or {}).items()},
                ))
            kw["segments"] = tuple(segs)
        if "sessions" in d:
            sk: dict[str, Any] = {f: getattr(self.sessions, f) for f in SessionConfig.__dataclass_fields__}
            for k, v in dict(d["sessions"] or {}).items():
                if k not in sk:
                    raise ValueError(f"unknown sessions field {k!r}")
                sk[k] = tuple(int(x) for x in v) if k == "favourites" else float(v)
            kw["sessions"] = SessionConfig(**sk)
        cfg = PopulationConfig(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        names = [*self.style_global, *(s for m in self.category_style.values() for s in m),
                 *(s for seg in self.segments for s in seg.styles)]
        for name in names:
            if name not in STYLES:
                raise ValueError(f"unknown style {name!r} in the population; styles are {STYLES}")
        if not self.segments:
            raise ValueError("a population needs at least one segment")
        if self.users < 1 or self.catalog_size < 1:
            raise ValueError("a population needs users and products")


def _read(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        import json

        return dict(json.loads(text))
    import yaml

    return dict(yaml.safe_load(text) or {})


def default_population() -> PopulationConfig:
    return PopulationConfig(segments=(Segment("everyone", 1.0, (0.3, 0.7), 0.1, 0.0, {}),)).merged(
        _read(DEFAULT_POPULATION)
    )


def load_population(path: str | Path | None = None, **overrides: Any) -> PopulationConfig:
    """The population of ``path`` (YAML or JSON) over the default one; ``overrides`` replace
    top-level fields (e.g. ``users=500``)."""
    cfg = default_population()
    if path is not None:
        cfg = cfg.merged(_read(path))
    upd = {k: v for k, v in overrides.items() if v is not None}
    return cfg.merged(upd) if upd else cfg


@dataclass(frozen=True)
class Shopper:
    """One simulated shopper; everything but ``user_id`` is hidden from the learner."""

    user_id: str
    segment: str
    favourites: tuple[str, ...]  # sub-categories (catalog categories)
    fav_weights: tuple[float, ...]
    price_sensitivity: float
    comfort_price: float
    eco_share: float
    price_pull: float
    taste: Mapping[str, float]  # segment styles + individual noise


@dataclass
class Population:
    cfg: PopulationConfig
    catalog: Catalog
    shoppers: list[Shopper]

    @classmethod
    def build(cls, cfg: PopulationConfig, catalog: Catalog | None = None, *, prefix: str = "sim-") -> Population:
        catalog = catalog or Catalog.generate(cfg.catalog_size, cfg.catalog_seed)
        rng = random.Random(cfg.seed)
        cats = catalog.categories
        prices = sorted(p.price for p in catalog)
        median = prices[len(prices) // 2] if prices else 50.0
        weights = [s.weight for s in cfg.segments]
        shoppers = []
        for i in range(cfg.users):
            seg = rng.choices(cfg.segments, weights)[0]
            k = min(rng.choice(cfg.sessions.favourites), len(cats))
            favs = tuple(rng.sample(cats, k))
            lo, hi = seg.price_sensitivity
            comfort = median * math.exp(seg.price_pull * 0.8 + rng.gauss(0.0, COMFORT_BAND))
            taste = {s: seg.styles.get(s, 0.0) + rng.gauss(0.0, cfg.taste_noise) for s in STYLES}
            shoppers.append(Shopper(
                user_id=f"{prefix}{i:05d}", segment=seg.name, favourites=favs,
                fav_weights=tuple(rng.random() + 0.2 for _ in favs), price_sensitivity=rng.uniform(lo, hi),
                comfort_price=comfort, eco_share=seg.eco_share, price_pull=seg.price_pull, taste=taste,
            ))
        return cls(cfg, catalog, shoppers)


def click_logit(cfg: PopulationConfig, shopper: Shopper, product: Product, text: str, slot: str | None,
                style: str | None = None) -> float:
    """The hidden click logit of ``shopper`` seeing ``text`` for ``product`` in ``slot``."""
    st = style or classify_style(text)
    z = cfg.base_logit + cfg.slot_logit.get(slot or "", 0.0)
    z += cfg.style_global.get(st, 0.0) + cfg.category_style.get(product.top_category, {}).get(st, 0.0)
    z += shopper.taste.get(st, 0.0)
    if product.category in shopper.favourites:
        z += cfg.relevance
    z += cfg.rating_weight * (product.rating - 4.3)
    discount = product.discount_pct / 100.0
    z += shopper.price_sensitivity * (
        cfg.discount_weight * discount - cfg.price_weight * math.log(max(product.price, 0.01) / shopper.comfort_price)
    )
    if len(text) > cfg.text.long_chars:
        z -= cfg.text.long_penalty
    bangs = text.count("!")
    if bangs > 1:
        z -= cfg.text.exclaim_penalty * (bangs - 1)
    return z


def click_probability(cfg: PopulationConfig, shopper: Shopper, product: Product, text: str, slot: str | None,
                      style: str | None = None) -> float:
    return 1.0 / (1.0 + math.exp(-click_logit(cfg, shopper, product, text, slot, style)))
