"""The conditioning context of one copy: a product plus persona features of the shopper.

``context_from_profile`` turns a product and a live profile (or ``None`` for a cold start) into
a :class:`CopyContext`; ``build_prompt`` renders it as the compact text prompt the models read;
``CopyContext.features`` is the JSON-able dict logged with every served copy and returned on the
feedback topic, from which ``context_from_features`` rebuilds exactly the same context (and so
the same prompt) without the catalog or Redis.

Persona buckets (all strings so they read well in a prompt and a dashboard):

* ``user``: ``new`` | ``returning``
* ``price_sensitivity``: ``unknown`` | ``low`` | ``mid`` | ``high`` -- the shopper's typical item
  value (cart and purchase value per item, or recent products' prices) against this price.
* ``engagement``: ``cold`` | ``casual`` | ``engaged`` | ``lapsed`` -- weighted event volume, and
  time since ``last_seen``.
* ``likes``: up to two sub-categories (last path segment) with the highest affinity.
* ``affinity``: ``none`` | ``some`` | ``high`` -- this product's category share of the affinity.
* ``eco_minded``: most recent products are eco (only known when a catalog is passed).
* ``slot``: page placement (free text, e.g. ``pdp``, ``feed``, ``cart``, ``email``) or none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from core.catalog import Product
from core.contracts import Profile

FEATURES_VERSION = 1

USER_BUCKETS = ("new", "returning")
PRICE_BUCKETS = ("unknown", "low", "mid", "high")
ENGAGEMENT_BUCKETS = ("cold", "casual", "engaged", "lapsed")
AFFINITY_BUCKETS = ("none", "some", "high")
SLOTS = ("pdp", "feed", "cart", "email")

# Event weights for the engagement score (views count least, purchases most).
_ENGAGEMENT_WEIGHTS = {
    "page_view": 0.5, "search": 0.5, "product_view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 5.0,
}
LAPSED_AFTER_S = 14 * 24 * 3600.0
NEW_USER_MAX_EVENTS = 5


@dataclass(frozen=True)
class CopyContext:
    """Everything a copy is conditioned on. Immutable and hashable."""

    product_id: str
    title: str
    noun: str
    brand: str
    category: str
    price: float
    discount_pct: int = 0
    rating: float = 4.2
    reviews: int = 0
    eco: bool = False
    attributes: tuple[str, ...] = ()
    currency: str = "USD"
    user: str = "new"
    price_sensitivity: str = "unknown"
    engagement: str = "cold"
    likes: tuple[str, ...] = ()
    affinity: str = "none"
    eco_minded: bool = False
    slot: str | None = None
    # Raw numbers behind the buckets (logged for analysis, not part of the prompt).
    raw: Mapping[str, float] = field(default_factory=dict, compare=False, hash=False)

    @property
    def price_band(self) -> str:
        from core.catalog import price_band

        return price_band(self.price)

    @property
    def sale_price(self) -> float:
        """Price after the discount, rounded to cents."""
        return round(self.price * (100 - self.discount_pct) / 100.0, 2)

    @property
    def leaf_category(self) -> str:
        return self.category.split("/")[-1]

    def to_product(self) -> Product:
        return Product(
            product_id=self.product_id, title=self.title, category=self.category, brand=self.brand,
            price=self.price, attributes=self.attributes, rating=self.rating, reviews=self.reviews,
            eco=self.eco, discount_pct=self.discount_pct, noun=self.noun, currency=self.currency,
        )

    def with_persona(self, **persona: Any) -> CopyContext:
        """A copy with some persona fields replaced (tests, the corpus, the simulator)."""
        from dataclasses import replace

        return replace(self, **persona)

    def features(self) -> dict[str, Any]:
        """JSON-able features: logged with every copy, enough to rebuild this context."""
        return {
            "v": FEATURES_VERSION,
            "product": {
                "product_id": self.product_id, "title": self.title, "noun": self.noun, "brand": self.brand,
                "category": self.category, "price": self.price, "discount_pct": self.discount_pct,
                "rating": self.rating, "reviews": self.reviews, "eco": self.eco,
                "attributes": list(self.attributes), "currency": self.currency,
            },
            "user": self.user,
            "price_sensitivity": self.price_sensitivity,
            "engagement": self.engagement,
            "likes": list(self.likes),
            "affinity": self.affinity,
            "eco_minded": self.eco_minded,
            "slot": self.slot,
            "raw": {k: float(v) for k, v in self.raw.items()},
        }

    def segment(self) -> str:
        """A coarse persona segment id (analytics, the synthetic click prior)."""
        return f"{self.user}|{self.price_sensitivity}|{self.engagement}|{'eco' if self.eco_minded else '-'}"


def context_from_features(features: Mapping[str, Any]) -> CopyContext:
    """Inverse of :meth:`CopyContext.features` (unknown keys ignored, missing persona keys take
    cold-start defaults)."""
    v = features.get("v", FEATURES_VERSION)
    if v != FEATURES_VERSION:
        raise ValueError(f"features version {v} is not supported (expected {FEATURES_VERSION})")
    p = features["product"]
    slot = features.get("slot")
    return CopyContext(
        product_id=str(p["product_id"]), title=str(p["title"]), noun=str(p.get("noun") or ""),
        brand=str(p.get("brand") or ""), category=str(p.get("category") or ""), price=float(p["price"]),
        discount_pct=int(p.get("discount_pct") or 0), rating=float(p.get("rating") or 0.0),
        reviews=int(p.get("reviews") or 0), eco=bool(p.get("eco")),
        attributes=tuple(str(a) for a in p.get("attributes") or ()), currency=str(p.get("currency") or "USD"),
        user=str(features.get("user", "new")),
        price_sensitivity=str(features.get("price_sensitivity", "unknown")),
        engagement=str(features.get("engagement", "cold")),
        likes=tuple(str(x) for x in features.get("likes") or ()),
        affinity=str(features.get("affinity", "none")),
        eco_minded=bool(features.get("eco_minded", False)),
        slot=None if slot is None else str(slot),
        raw={str(k): float(x) for k, x in (features.get("raw") or {}).items()},
    )


def product_context(product: Product, slot: str | None = None) -> CopyContext:
    """A cold-start context (no persona) for a product."""
    return CopyContext(
        product_id=product.product_id, title=product.title, noun=" ".join(product.noun.split()),
        brand=product.brand, category=product.category, price=float(product.price),
        discount_pct=int(product.discount_pct), rating=float(product.rating), reviews=int(product.reviews),
        eco=bool(product.eco), attributes=tuple(product.attributes), currency=product.currency or "USD", slot=slot,
    )


def _parse_ts(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None


def _leaf_affinities(affinity: Mapping[str, float]) -> dict[str, float]:
    """Affinity per sub-category (depth-2 paths, by last segment); top-level keys when a profile
    has no deeper ones."""
    deep = {k: v for k, v in affinity.items() if k.count("/") == 1}
    if not deep:
        deep = {k: v for k, v in affinity.items() if "/" not in k}
    out: dict[str, float] = {}
    for k, v in deep.items():
        leaf = k.split("/")[-1]
        out[leaf] = out.get(leaf, 0.0) + max(float(v), 0.0)
    return out


def price_sensitivity_bucket(typical_item_value: float | None, price: float) -> str:
    """``high`` when this price is well above what the shopper usually spends per item."""
    if typical_item_value is None or typical_item_value <= 0 or price <= 0:
        return "unknown"
    ratio = typical_item_value / price
    if ratio < 0.5:
        return "high"
    if ratio <= 1.5:
        return "mid"
    return "low"


def context_from_profile(
    product: Product,
    profile: Profile | None,
    slot: str | None = None,
    *,
    now: datetime | None = None,
    lookup: Callable[[str], Product | None] | None = None,
) -> CopyContext:
    """The context for showing ``product`` to the owner of ``profile`` (None: cold start).

    ``now`` (default: the current UTC time) decides ``lapsed``; ``lookup`` (e.g.
    ``Catalog.get``) lets recent products inform price sensitivity and ``eco_minded``.
    """
    base = product_context(product, slot)
    if profile is None:
        return base
    counts = profile.event_counts
    n_events = sum(int(v) for v in counts.values())
    first, last = _parse_ts(profile.first_seen), _parse_ts(profile.last_seen)
    span_s = (last - first).total_seconds() if first and last else 0.0
    now = now or datetime.now(tz=UTC)
    idle_s = (now - last).total_seconds() if last else 0.0

    user = "new" if n_events < NEW_USER_MAX_EVENTS and span_s < 24 * 3600 else "returning"

    score = sum(_ENGAGEMENT_WEIGHTS.get(k, 0.0) * int(v) for k, v in counts.items())
    if user == "returning" and idle_s > LAPSED_AFTER_S:
        engagement = "lapsed"
    elif score < 5:
        engagement = "cold"
    elif score < 25:
        engagement = "casual"
    else:
        engagement = "engaged"

    recent = [p for p in (lookup(pid) for pid in profile.recent_products) if p is not None] if lookup else []
    items = int(counts.get("add_to_cart", 0)) + int(counts.get("purchase", 0))
    typical: float | None = None
    if items > 0 and profile.cart_value + profile.purchase_value > 0:
        typical = (profile.cart_value + profile.purchase_value) / items
    elif recent:
        typical = sum(p.price for p in recent) / len(recent)
    sensitivity = price_sensitivity_bucket(typical, product.price)

    leaf = _leaf_affinities(profile.category_affinity)
    total = sum(leaf.values())
    likes = tuple(k for k, v in sorted(leaf.items(), key=lambda kv: (-kv[1], kv[0]))[:2] if v > 0)
    share = leaf.get(product.category.split("/")[-1], 0.0) / total if total > 0 else 0.0
    if share == 0.0 and total > 0 and "/" in product.category:
        # profiles that only carry top-level categories
        top = {k: v for k, v in profile.category_affinity.items() if "/" not in k}
        tt = sum(max(v, 0.0) for v in top.values())
        share = max(top.get(product.top_category, 0.0), 0.0) / tt if tt > 0 else 0.0
    affinity = "high" if share >= 0.35 else "some" if share >= 0.1 else "none"

    eco_minded = bool(recent) and sum(p.eco for p in recent) / len(recent) >= 0.4

    raw = {
        "events": float(n_events),
        "engagement_score": round(score, 3),
        "idle_h": round(idle_s / 3600.0, 3),
        "typical_item_value": round(typical, 2) if typical is not None else math.nan,
        "affinity_share": round(share, 4),
    }
    raw = {k: v for k, v in raw.items() if not math.isnan(v)}
    return base.with_persona(
        user=user, price_sensitivity=sensitivity, engagement=engagement, likes=likes, affinity=affinity,
        eco_minded=eco_minded, raw=raw,
    )


def is_plural(noun: str) -> bool:
    """'headphones' -> True, 'glass' -> False (heuristic on the head word)."""
    head = noun.strip().split(" ")[-1].lower() if noun.strip() else ""
    return head.endswith("s") and not head.endswith(("ss", "us", "is"))


def _money(x: float) -> str:
    return f"${x:,.2f}"


DEPARTMENTS = ("electronics", "home", "fashion", "beauty", "sports", "toys", "grocery", "garden", "general")

# words of a category path or noun -> the department the student was trained on; anything else is
# "general" (the taxonomy fallback: an unseen category still gets copy, written for any product)
_DEPARTMENT_WORDS: dict[str, tuple[str, ...]] = {
    "electronics": ("electronic", "audio", "computer", "phone", "camera", "tv", "television", "video game",
                    "gaming", "headphone", "speaker", "laptop", "tablet", "smart home", "wearable", "charger"),
    "home": ("home", "kitchen", "furniture", "bedding", "bath", "decor", "appliance", "cookware", "dining",
             "household", "cleaning", "lighting", "storage", "mattress"),
    "fashion": ("fashion", "apparel", "clothing", "shoe", "footwear", "accessor", "jewel", "watch", "bag",
                "luggage", "travel", "handbag", "eyewear"),
    "beauty": ("beauty", "skincare", "skin care", "haircare", "hair care", "makeup", "cosmetic", "fragrance",
               "personal care", "grooming", "health", "pharmacy", "wellness"),
    "sports": ("sport", "fitness", "outdoor", "camping", "cycling", "bike", "running", "golf", "fishing", "yoga"),
    "toys": ("toy", "game", "puzzle", "kids", "lego", "baby"),
    "grocery": ("grocery", "food", "coffee", "tea", "snack", "beverage", "drink", "pantry", "candy"),
    "garden": ("garden", "patio", "lawn", "tool", "hardware", "diy", "plant"),
}


def department(category: str, noun: str = "") -> str:
    """The student's department for a category path (``general`` when none matches)."""
    parts = [p.strip().lower() for p in category.split("/") if p.strip()]
    if parts and parts[0] in DEPARTMENTS:
        return parts[0]
    text = " ".join(parts) + " " + noun.lower()
    for dep, words in _DEPARTMENT_WORDS.items():
        if any(w in text for w in words):
            return dep
    return "general"


def _buckets(ctx: CopyContext) -> list[str]:
    deal = "none" if not ctx.discount_pct else "big" if ctx.discount_pct >= 25 else "some"
    if ctx.reviews <= 0:
        reviews, rated = "none", "none"
    else:
        reviews = "few" if ctx.reviews < 20 else "many" if ctx.reviews < 500 else "lots"
        rated = "top" if ctx.rating >= 4.5 else "good" if ctx.rating >= 4.0 else "fair"
    return [f"deal {deal}", f"reviews {reviews}", f"rated {rated}"]


def build_prompt(ctx: CopyContext) -> str:
    """The compact text prompt, two lines ending in a newline; the style token follows it.

    It holds no product fact in words (the copy names facts only through slots, filled from the
    record, see ``models.text.slots``): the department, price band, deal/review/rating buckets,
    the slots the record can fill, then the persona. Example::

        electronics | premium | deal some | reviews lots | rated top | has brand noun attribute price discount
        returning, price high, engaged, affinity high, likes audio+kitchen, slot pdp
    """
    from models.text.slots import available

    have = available(ctx)
    fields = [f for f in ("brand", "noun", "attribute", "price", "discount", "reviews", "rating") if f in have]
    prod = [department(ctx.category, ctx.noun), ctx.price_band, *_buckets(ctx)]
    if ctx.eco:
        prod.append("eco")
    prod.append("has " + " ".join(fields))
    persona = [ctx.user, f"price {ctx.price_sensitivity}", ctx.engagement, f"affinity {ctx.affinity}"]
    if ctx.likes:
        persona.append("likes " + "+".join(ctx.likes))
    if ctx.eco_minded:
        persona.append("eco-minded")
    if ctx.slot:
        persona.append(f"slot {ctx.slot}")
    return " | ".join(prod) + "\n" + ", ".join(persona) + "\n"
