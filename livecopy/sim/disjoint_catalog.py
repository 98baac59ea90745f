"""A second synthetic catalog whose brands, nouns and attributes share nothing with the training
generator's (``core.catalog.vocabulary``), mostly in categories it lacks: what copy is measured on."""

from __future__ import annotations

import random

from core.catalog import Catalog, Product, _title_case

# top/sub -> (nouns, attributes, (low, high) price)
_TAXONOMY: dict[str, tuple[list[str], list[str], tuple[float, float]]] = {
    "pets/aquarium": (
        ["aquarium kit", "canister filter", "fish food flakes", "LED tank light", "gravel vacuum"],
        ["low-noise", "submersible", "freshwater", "12-pack", "energy-saving"],
        (8, 260),
    ),
    "pets/cat-supplies": (
        ["cat tree", "scratching post", "litter mat", "automatic feeder", "cat toys"],
        ["sisal-wrapped", "odor-control", "washable", "multi-level", "timed"],
        (9, 180),
    ),
    "automotive/detailing": (
        ["car wax", "microfiber towels", "tire shine", "clay bar kit", "foam cannon"],
        ["streak-free", "ceramic-infused", "pH-neutral", "500 ml", "lint-free"],
        (7, 90),
    ),
    "office/stationery": (
        ["fountain pen", "dotted notebook", "desk organizer", "highlighters", "label maker"],
        ["refillable", "acid-free", "smudge-proof", "A5", "bamboo"],
        (4, 140),
    ),
    "music/instruments": (
        ["ukulele", "acoustic guitar", "digital piano", "cajon", "harmonica"],
        ["solid-spruce", "weighted-key", "beginner-friendly", "hand-tuned", "left-handed"],
        (19, 900),
    ),
    "baby/nursery": (
        ["crib mobile", "swaddle blankets", "baby monitor", "changing pad", "night light"],
        ["muslin", "BPA-free", "two-way audio", "contoured", "dimmable"],
        (12, 240),
    ),
    "crafts/knitting": (
        ["knitting needles", "wool yarn", "crochet hook set", "stitch markers", "yarn winder"],
        ["chunky", "hand-dyed", "superwash", "interchangeable", "24-piece"],
        (5, 85),
    ),
    "health/first-aid": (
        ["first aid kit", "instant cold packs", "elastic bandage", "digital thermometer", "pill organizer"],
        ["latex-free", "hospital-grade", "fast-reading", "7-day", "sterile"],
        (5, 70),
    ),
    "travel/luggage": (
        ["carry-on suitcase", "packing cubes", "duffel bag", "luggage scale", "travel pillow"],
        ["hardshell", "lockable", "TSA-approved", "spinner-wheel", "featherweight"],
        (14, 420),
    ),
    "kitchen/baking": (
        ["bundt pan", "rolling pin", "pastry blender", "cooling rack", "piping bags"],
        ["nonstick-coated", "marble", "oven-safe", "heavy-gauge", "disposable"],
        (6, 75),
    ),
    "outdoor/fishing": (
        ["spinning reel", "tackle box", "fly rod", "fishing line", "wading boots"],
        ["saltwater-rated", "braided", "graphite", "felt-soled", "two-piece"],
        (9, 380),
    ),
    "home/cleaning": (
        ["robot vacuum", "steam mop", "squeegee", "lint roller", "all-purpose cleaner"],
        ["cordless", "HEPA-filtered", "unscented", "streak-free", "refill-ready"],
        (5, 520),
    ),
    "electronics/photography": (
        ["tripod", "camera strap", "lens cleaning kit", "ring light", "memory card"],
        ["carbon-fiber", "quick-release", "anti-static", "dimmable", "high-speed"],
        (7, 310),
    ),
    "party/supplies": (
        ["balloon arch kit", "paper lanterns", "party favors", "table runner", "confetti cannon"],
        ["biodegradable", "reusable", "metallic", "50-count", "glitter"],
        (5, 60),
    ),
}

_BRANDS: dict[str, list[str]] = {
    "pets": ["Finnegan Aqua", "Tabbyhouse", "Reefline"],
    "automotive": ["Glossworks", "Roadsheen", "Torque & Polish"],
    "office": ["Inkwell Press", "Ledgerleaf", "Quillmark"],
    "music": ["Harmonia", "Oakstring", "Tempo Lane"],
    "baby": ["Little Lark", "Dreamnest", "Cradlewood"],
    "crafts": ["Skein & Needle", "Woolgather", "Purlhouse"],
    "health": ["Mendwell", "Safehaven Medical", "Carepoint"],
    "travel": ["Wanderpack", "Jetlane", "Globetrot"],
    "kitchen": ["Sugarbeam", "Crumb & Co", "Bakewise"],
    "outdoor": ["Riverbend Tackle", "Lakeshore", "Troutway"],
    "home": ["Sparkmaid", "Tidyfox", "Freshden"],
    "electronics": ["Lumacraft", "Shutterbay", "Optiq"],
    "party": ["Confetti Corner", "Fiesta Forge", "Gala Goods"],
}


_ECO_WORDS = ("biodegradable", "reusable", "bamboo", "refillable")
_SUFFIXES = ("2", "Pro", "Plus", "Deluxe", "Mini", "XL", "Classic", "Go")


def disjoint_vocabulary() -> dict[str, frozenset[str]]:
    """This generator's words: ``brands``, ``nouns`` and ``attributes`` (as written)."""
    return {
        "brands": frozenset(b for bs in _BRANDS.values() for b in bs),
        "nouns": frozenset(n for nouns, _, _ in _TAXONOMY.values() for n in nouns),
        "attributes": frozenset(a for _, attrs, _ in _TAXONOMY.values() for a in attrs),
    }


def generate_disjoint(n: int = 600, seed: int = 11) -> Catalog:
    """``n`` products (ids ``dj-00001``...), deterministic from ``seed``; built, priced and rated the way
    ``Catalog.generate`` does, plus about 10% unrated (rating 0, reviews 0) and 5% without attributes."""
    rng = random.Random(seed)
    cats = list(_TAXONOMY)
    products: list[Product] = []
    seen: set[str] = set()
    i = 0
    while len(products) < n:
        cat = cats[i % len(cats)]
        i += 1
        nouns, attrs, (lo, hi) = _TAXONOMY[cat]
        brand = rng.choice(_BRANDS[cat.split("/")[0]])
        noun = rng.choice(nouns)
        k = 0 if rng.random() < 0.05 else 1 if rng.random() < 0.6 else 2
        chosen = tuple(rng.sample(attrs, k))
        shown = [a for a in chosen if a.lower() not in noun.lower()]
        title = " ".join([brand, *(_title_case(a) for a in shown), _title_case(noun)])
        if title in seen:
            title = f"{title} {rng.choice(_SUFFIXES)}"
            if title in seen:
                continue
        seen.add(title)
        # log-uniform price in the band, rounded like a shop would
        price = max(round(lo * (hi / lo) ** rng.random()) - 0.01, 1.99)
        eco = any(a in _ECO_WORDS for a in chosen) or rng.random() < 0.08
        discount = rng.choice([0, 0, 0, 10, 15, 20, 25, 30, 40]) if rng.random() < 0.45 else 0
        rating = round(min(5.0, max(3.1, rng.gauss(4.3, 0.35))), 1)
        reviews = min(int(rng.paretovariate(1.1) * 20), 25_000)
        if rng.random() < 0.1:  # new listing: not rated yet
            rating, reviews = 0.0, 0
        products.append(
            Product(
                product_id=f"dj-{len(products) + 1:05d}",
                title=title,
                category=cat,
                brand=brand,
                price=price,
                attributes=chosen,
                rating=rating,
                reviews=reviews,
                eco=eco,
                discount_pct=discount,
                noun=noun,
            )
        )
    rng.shuffle(products)  # popularity rank independent of category
    return Catalog(products)
