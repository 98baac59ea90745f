"""Realistic shopping sessions for load tests and demos (`livecopy loadgen`).

Users have a few favourite categories and a price sensitivity; sessions start with a page view or
a search, browse products (Zipf popularity inside the favourite categories, sometimes anything
popular), add some to the cart (cheaper items more often for price-sensitive users) and sometimes
buy. Many sessions run interleaved, so the stream looks like a site's, not one user at a time.
Seeded: the same seed gives the same events (ids included).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from core.catalog import Catalog, Product
from core.contracts import format_ts

SEARCH_WORDS = ["gift", "best", "cheap", "new", "sale", "top rated", "eco", "premium", "deal", "for him", "for her"]


@dataclass
class Shopper:
    user_id: str
    favourites: list[str]
    weights: list[float]
    price_sensitivity: float  # 0 (indifferent) .. 1 (very)


@dataclass
class Session:
    shopper: Shopper
    steps: list[dict[str, Any]] = field(default_factory=list)


class SessionGenerator:
    def __init__(self, catalog: Catalog, users: int, seed: int = 1, concurrency: int = 200) -> None:
        self.catalog = catalog
        self.rng = random.Random(seed)
        cats = catalog.categories
        self.shoppers = []
        for i in range(users):
            k = self.rng.choice([1, 2, 2, 3])
            favs = self.rng.sample(cats, k)
            self.shoppers.append(
                Shopper(f"u-{i:06d}", favs, [self.rng.random() + 0.2 for _ in favs], self.rng.random())
            )
        # heavy users come back more often (Zipf over users)
        self._user_weights = [1.0 / (i + 1) ** 0.8 for i in range(users)]
        self.concurrency = max(1, min(concurrency, users))
        self._active: list[Iterator[dict[str, Any]]] = []

    def _new_id(self) -> str:
        return f"lg-{self.rng.getrandbits(64):016x}"

    def _pick_product(self, s: Shopper) -> Product:
        if self.rng.random() < 0.8:
            cat = self.rng.choices(s.favourites, s.weights)[0]
            return self.catalog.sample_in(self.rng, cat)
        return self.catalog.sample(self.rng)

    def _session(self, s: Shopper) -> Iterator[dict[str, Any]]:
        """One session's events, without ids and time (filled in when emitted)."""
        r = self.rng
        if r.random() < 0.3:
            cat = r.choices(s.favourites, s.weights)[0]
            noun = r.choice(self.catalog.in_category(cat)).noun
            yield {"type": "search", "query": f"{r.choice(SEARCH_WORDS)} {noun}", "category": cat}
        else:
            yield {"type": "page_view", "props": {"page": "home"}}
        cart: list[Product] = []
        for _ in range(1 + int(r.expovariate(1 / 3.0))):
            p = self._pick_product(s)
            yield {"type": "product_view", "product_id": p.product_id, "category": p.category, "price": p.price}
            cheap = p.price_band in ("budget", "mid")
            p_cart = 0.10 + (0.10 if cheap else -0.04) * s.price_sensitivity + (0.05 if p.discount_pct else 0.0)
            if r.random() < p_cart:
                cart.append(p)
                yield {"type": "add_to_cart", "product_id": p.product_id, "category": p.category,
                       "price": p.price, "quantity": 1 if r.random() < 0.85 else 2}
        for p in cart:
            if r.random() < 0.4:
                yield {"type": "purchase", "product_id": p.product_id, "category": p.category,
                       "price": p.price, "quantity": 1}

    def events(self) -> Iterator[dict[str, Any]]:
        """An endless interleaved stream of valid event dicts (ts = wall clock when emitted)."""
        while True:
            while len(self._active) < self.concurrency:
                s = self.rng.choices(self.shoppers, self._user_weights)[0]
                self._active.append(self._with_user(s))
            i = self.rng.randrange(len(self._active))
            try:
                yield next(self._active[i])
            except StopIteration:
                self._active[i] = self._active[-1]
                self._active.pop()
                continue

    def _with_user(self, s: Shopper) -> Iterator[dict[str, Any]]:
        for step in self._session(s):
            step.update(event_id=self._new_id(), user_id=s.user_id, ts=format_ts(int(time.time() * 1000)))
            yield step


def paced(rate: float, duration_s: float | None) -> Iterator[int]:
    """Yields a running count, sleeping so that the count tracks rate x elapsed time."""
    start = time.monotonic()
    n = 0
    while True:
        elapsed = time.monotonic() - start  # read once: the count never passes rate x duration_s
        if duration_s is not None and elapsed >= duration_s:
            return
        due = int(elapsed * rate) + 1
        if n >= due:
            time.sleep(min(0.005, 1.0 / rate))
            continue
        while n < due:
            yield n
            n += 1
