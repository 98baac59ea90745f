"""A deterministic synthetic product catalog.

Shared by the load generator, the training corpus, the shopper simulator and the copy
service, so every part of livecopy talks about the same products. Generated from a seed
(no data set can be downloaded here); a site loads its own catalog from JSON lines with the
same fields (`livecopy catalog load FILE`).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson


@dataclass(frozen=True)
class Product:
    product_id: str
    title: str
    category: str
    brand: str
    price: float
    attributes: tuple[str, ...] = ()
    rating: float = 4.2
    reviews: int = 0
    eco: bool = False
    discount_pct: int = 0
    noun: str = ""
    currency: str = "USD"  # ISO 4217 code; copy formats money with it

    @property
    def top_category(self) -> str:
        return self.category.split("/", 1)[0]

    @property
    def price_band(self) -> str:
        return price_band(self.price)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["attributes"] = list(self.attributes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Product:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["attributes"] = tuple(kw.get("attributes") or ())  # type: ignore[arg-type]
        return cls(**kw)  # type: ignore[arg-type]


def price_band(price: float) -> str:
    if price < 25:
        return "budget"
    if price < 80:
        return "mid"
    if price < 250:
        return "premium"
    return "luxury"


# top/sub -> (nouns, attributes, (low, high) price)
_TAXONOMY: dict[str, tuple[list[str], list[str], tuple[float, float]]] = {
    "electronics/audio": (
        ["headphones", "earbuds", "bluetooth speaker", "soundbar", "turntable"],
        ["wireless", "noise-cancelling", "waterproof", "hi-fi", "compact", "bass-boosted"],
        (19, 420),
    ),
    "electronics/computers": (
        ["laptop stand", "mechanical keyboard", "wireless mouse", "4K monitor", "webcam", "USB-C hub"],
        ["ergonomic", "backlit", "ultra-slim", "aluminium", "plug-and-play"],
        (15, 650),
    ),
    "electronics/phones": (
        ["phone case", "fast charger", "power bank", "smartwatch", "screen protector"],
        ["shockproof", "20,000 mAh", "magnetic", "slim", "GPS"],
        (9, 320),
    ),
    "home/kitchen": (
        ["chef's knife", "cast-iron skillet", "coffee grinder", "blender", "electric kettle", "stand mixer"],
        ["stainless steel", "non-stick", "programmable", "dishwasher-safe", "professional-grade"],
        (14, 480),
    ),
    "home/furniture": (
        ["desk chair", "bookshelf", "side table", "floor lamp", "sofa cushion"],
        ["solid oak", "mid-century", "adjustable", "space-saving", "hand-finished"],
        (29, 900),
    ),
    "home/bedding": (
        ["duvet", "memory-foam pillow", "linen sheet set", "throw blanket", "mattress topper"],
        ["organic cotton", "breathable", "hypoallergenic", "weighted", "cooling"],
        (19, 350),
    ),
    "fashion/shoes": (
        ["running shoes", "leather boots", "canvas sneakers", "hiking boots", "sandals"],
        ["lightweight", "waterproof", "cushioned", "handmade", "recycled"],
        (25, 280),
    ),
    "fashion/apparel": (
        ["rain jacket", "merino sweater", "hoodie", "denim jeans", "linen shirt"],
        ["slim-fit", "organic", "packable", "classic", "stretch"],
        (15, 260),
    ),
    "fashion/accessories": (
        ["backpack", "leather wallet", "sunglasses", "analog watch", "silk scarf"],
        ["polarized", "RFID-blocking", "minimalist", "water-resistant", "vintage"],
        (12, 400),
    ),
    "beauty/skincare": (
        ["face moisturizer", "vitamin C serum", "mineral sunscreen", "gentle cleanser", "night cream"],
        ["fragrance-free", "vegan", "dermatologist-tested", "SPF 50", "hydrating"],
        (8, 120),
    ),
    "beauty/haircare": (
        ["shampoo", "hair dryer", "conditioner", "hair oil", "styling brush"],
        ["sulfate-free", "ionic", "nourishing", "salon-grade", "travel-size"],
        (7, 230),
    ),
    "sports/outdoor": (
        ["tent", "sleeping bag", "trail backpack", "insulated bottle", "camping stove"],
        ["ultralight", "4-season", "weatherproof", "insulated", "packable"],
        (15, 520),
    ),
    "sports/fitness": (
        ["yoga mat", "adjustable dumbbells", "resistance bands", "foam roller", "jump rope"],
        ["non-slip", "eco-friendly", "heavy-duty", "portable", "adjustable"],
        (9, 380),
    ),
    "toys/games": (
        ["board game", "jigsaw puzzle", "building blocks", "card game", "remote-control car"],
        ["family-friendly", "1000-piece", "award-winning", "STEM", "cooperative"],
        (9, 120),
    ),
    "grocery/coffee": (
        ["coffee beans", "tea sampler", "espresso pods", "cold brew concentrate", "matcha powder"],
        ["single-origin", "fair-trade", "organic", "small-batch", "dark roast"],
        (6, 60),
    ),
    "garden/tools": (
        ["pruning shears", "garden hose", "raised planter", "compost bin", "watering can"],
        ["rust-proof", "expandable", "cedar", "ergonomic", "recycled"],
        (9, 260),
    ),
}

_BRANDS: dict[str, list[str]] = {
    "electronics": ["Aurora", "Voltix", "Nimbus", "Sonara", "Pixelon", "Quanta"],
    "home": ["Hearthwood", "Casa Nova", "Linden & Co", "Oakhaven", "Kiln", "Maison Vert"],
    "fashion": ["Northloom", "Atelier Nine", "Driftline", "Cobalt Row", "Wren", "Ferro"],
    "beauty": ["Lumiere", "Botanica", "Dewpoint", "Velvet Fern", "Clarity Lab"],
    "sports": ["Summit", "Trailhead", "Kinetic", "Ridgeback", "Pulse"],
    "toys": ["Brightbox", "Playforge", "Tinker Bay", "Wonderkin"],
    "grocery": ["Roastery 41", "Highland Leaf", "Crema Co", "Kettle & Cup"],
    "garden": ["Greenthumb", "Fernway", "Rootstock", "Bloomwell"],
}

def vocabulary() -> dict[str, frozenset[str]]:
    """The generator's words: ``brands``, ``nouns`` and ``attributes`` (as written)."""
    return {
        "brands": frozenset(b for bs in _BRANDS.values() for b in bs),
        "nouns": frozenset(n for nouns, _, _ in _TAXONOMY.values() for n in nouns),
        "attributes": frozenset(a for _, attrs, _ in _TAXONOMY.values() for a in attrs),
    }


_ECO_WORDS = ("organic", "recycled", "eco-friendly", "fair-trade", "cedar", "organic cotton", "vegan")


def _title_case(text: str) -> str:
    """'organic cotton' -> 'Organic Cotton', 'USB-C hub' -> 'USB-C Hub' (acronyms kept)."""
    return " ".join("-".join(p[:1].upper() + p[1:] for p in w.split("-")) for w in text.split(" "))


@dataclass
class Catalog:
    products: list[Product]
    popularity_s: float = 1.1
    _by_id: dict[str, Product] = field(default_factory=dict, repr=False)
    _by_cat: dict[str, list[Product]] = field(default_factory=dict, repr=False)
    _cum: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {p.product_id: p for p in self.products}
        self._by_cat = {}
        for p in self.products:
            self._by_cat.setdefault(p.category, []).append(p)
        # Zipf popularity in catalog order (ranks are shuffled at generation).
        total = 0.0
        self._cum = []
        for rank in range(1, len(self.products) + 1):
            total += 1.0 / rank**self.popularity_s
            self._cum.append(total)

    def __len__(self) -> int:
        return len(self.products)

    def __iter__(self) -> Iterator[Product]:
        return iter(self.products)

    def get(self, product_id: str) -> Product | None:
        return self._by_id.get(product_id)

    @property
    def categories(self) -> list[str]:
        return sorted(self._by_cat)

    def in_category(self, category: str) -> list[Product]:
        return self._by_cat.get(category, [])

    def sample(self, rng: random.Random) -> Product:
        """A product drawn by Zipf popularity."""
        x = rng.random() * self._cum[-1]
        return self.products[bisect.bisect_left(self._cum, x)]

    def sample_in(self, rng: random.Random, category: str) -> Product:
        """A product of one category, popular ones more often (Zipf within the category)."""
        items = self._by_cat[category]
        weights = [1.0 / (i + 1) ** self.popularity_s for i in range(len(items))]
        return rng.choices(items, weights=weights, k=1)[0]

    @classmethod
    def generate(cls, n_products: int = 2000, seed: int = 7) -> Catalog:
        rng = random.Random(seed)
        cats = list(_TAXONOMY)
        products: list[Product] = []
        seen_titles: set[str] = set()
        i = 0
        while len(products) < n_products:
            cat = cats[i % len(cats)]
            i += 1
            nouns, attrs, (lo, hi) = _TAXONOMY[cat]
            top = cat.split("/")[0]
            brand = rng.choice(_BRANDS[top])
            noun = rng.choice(nouns)
            k = 1 if rng.random() < 0.6 else 2
            chosen = tuple(rng.sample(attrs, k))
            # an attribute already in the noun ("adjustable" + "adjustable dumbbells") is not repeated
            shown = [a for a in chosen if a.lower() not in noun.lower()]
            title = f"{brand} {' '.join(_title_case(a) for a in shown)} {_title_case(noun)}".replace("  ", " ")
            if title in seen_titles:
                title = f"{title} {rng.choice(['II', 'Pro', 'Plus', 'Lite', 'Max', 'Mini', 'S', 'X'])}"
                if title in seen_titles:
                    continue
            seen_titles.add(title)
            # log-uniform price in the band, rounded like a shop would
            price = round(lo * (hi / lo) ** rng.random()) - 0.01
            price = max(price, 1.99)
            eco = any(w in chosen for w in _ECO_WORDS) or rng.random() < 0.08
            discount = rng.choice([0, 0, 0, 10, 15, 20, 25, 30, 40]) if rng.random() < 0.45 else 0
            rating = round(min(5.0, max(3.1, rng.gauss(4.3, 0.35))), 1)
            reviews = int(rng.paretovariate(1.1) * 20)
            products.append(
                Product(
                    product_id=f"sku-{len(products) + 1:05d}",
                    title=title,
                    category=cat,
                    brand=brand,
                    price=price,
                    attributes=chosen,
                    rating=rating,
                    reviews=min(reviews, 25_000),
                    eco=eco,
                    discount_pct=discount,
                    noun=noun,
                )
            )
        rng.shuffle(products)  # popularity rank independent of category
        return cls(products)

    def dump_jsonl(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            for p in self.products:
                f.write(orjson.dumps(p.to_dict()) + b"\n")

    @classmethod
    def load_jsonl(cls, path: str | Path) -> Catalog:
        return cls.from_dicts(orjson.loads(line) for line in Path(path).read_bytes().splitlines() if line)

    @classmethod
    def from_dicts(cls, rows: Iterable[dict[str, object]]) -> Catalog:
        return cls([Product.from_dict(r) for r in rows])
