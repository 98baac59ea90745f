"""Simulated shopping sessions: browsing, copy impressions and hidden-model clicks (pure, seeded).

A session is a generator. It yields event dicts (v1 contract, ready for the SDK) and, where a
page shows marketing copy, a :class:`CopyAsk`; the driver answers the ask with the copy that was
shown (:class:`ShownCopy`, via ``generator.send``) and the session decides, with the hidden click
model of :mod:`livecopy.sim.population`, whether the shopper clicks. :func:`run_sessions` keeps
many sessions in flight and hands their asks to a copy source in batches, so both the HTTP client
(concurrent requests) and an in-process engine (one micro-batch) see realistic batches.

Time is explicit: a :class:`Clock` gives each event its time (``SimClock`` advances simulated
time, so 100,000 impressions cover weeks of shopping in seconds; ``WallClock`` is now).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from core.catalog import Product
from core.contracts import format_ts
from livecopy.sim.population import Population, Shopper, click_probability

SEARCH_WORDS = ["gift", "best", "new", "sale", "top rated", "eco", "premium", "deal", "for him", "for her"]


@dataclass(frozen=True)
class CopyAsk:
    """A page wants copy: ``shopper`` sees ``product`` in ``slot`` at ``ts_ms``."""

    shopper: Shopper
    product: Product
    slot: str
    ts_ms: int
    seq: int  # impression number in this run (0, 1, ...)


@dataclass
class ShownCopy:
    """What the copy source answered (and, for the statistics, what the baselines would have shown)."""

    copy_id: str
    text: str
    model_version: str = ""
    policy: str = ""
    style: str | None = None
    # Expected hidden CTR of each policy's choice for this impression (baselines, shadow arms).
    arm_p: dict[str, float] | None = None
    arm_style: dict[str, str] | None = None  # style of each policy's choice
    # Set by the session: the hidden click probability of `text`, and whether the shopper clicked.
    p_click: float = 0.0
    clicked: bool = False


@dataclass
class Outcome:
    ask: CopyAsk
    shown: ShownCopy


class Clock(Protocol):
    def session_start(self, rng: random.Random) -> int: ...

    def step(self, ts_ms: int, rng: random.Random) -> int: ...


class SimClock:
    """Simulated time: sessions start ``mean_gap_s`` apart on average, pages ~40 s apart."""

    def __init__(self, start_ms: int = 1_780_000_000_000, mean_gap_s: float = 20.0, page_s: float = 40.0) -> None:
        self.now_ms = start_ms
        self.mean_gap_s = mean_gap_s
        self.page_s = page_s

    def session_start(self, rng: random.Random) -> int:
        self.now_ms += int(rng.expovariate(1.0 / self.mean_gap_s) * 1000)
        return self.now_ms

    def step(self, ts_ms: int, rng: random.Random) -> int:
        return ts_ms + int(rng.expovariate(1.0 / self.page_s) * 1000) + 1


class WallClock:
    def session_start(self, rng: random.Random) -> int:
        return int(time.time() * 1000)

    def step(self, ts_ms: int, rng: random.Random) -> int:
        return max(ts_ms + 1, int(time.time() * 1000))


Step = dict[str, Any] | CopyAsk
Session = Generator[Step, ShownCopy | None, None]


class ShopperSim:
    """Sessions of a population. Same seed, same answers -> same events (ids included)."""

    def __init__(self, population: Population, *, seed: int = 1, clock: Clock | None = None,
                 id_prefix: str = "sim") -> None:
        self.pop = population
        self.cfg = population.cfg.sessions
        self.rng = random.Random(seed)
        self.clock = clock or SimClock()
        self.id_prefix = id_prefix
        self.impressions = 0
        self._n = 0
        n = len(population.shoppers)
        self._user_cum: list[float] = []
        total = 0.0
        for i in range(n):
            total += 1.0 / (i + 1) ** self.cfg.activity_zipf
            self._user_cum.append(total)
        self._eco = {c: [p for p in population.catalog.in_category(c) if p.eco] for c in population.catalog.categories}

    def _id(self, kind: str) -> str:
        self._n += 1
        return f"{self.id_prefix}-{kind}-{self._n:08d}-{self.rng.getrandbits(24):06x}"

    def pick_shopper(self) -> Shopper:
        import bisect

        x = self.rng.random() * self._user_cum[-1]
        return self.pop.shoppers[min(bisect.bisect_left(self._user_cum, x), len(self.pop.shoppers) - 1)]

    def pick_product(self, s: Shopper) -> Product:
        r, cat = self.rng, self.pop.catalog
        if r.random() < self.cfg.favourite_share:
            c = r.choices(s.favourites, s.fav_weights)[0]
        else:
            c = cat.sample(r).category
        if r.random() < s.eco_share and self._eco.get(c):
            return r.choice(self._eco[c])
        options = [cat.sample_in(r, c) for _ in range(3)]
        if s.price_pull == 0.0:
            return options[0]
        # price_pull < 0 favours the cheapest of three, > 0 the dearest
        w = [math.exp(s.price_pull * math.log(max(p.price, 0.01))) for p in options]
        return r.choices(options, w)[0]

    def session(self, s: Shopper) -> Session:
        r, c = self.rng, self.cfg
        ts = self.clock.session_start(r)
        base = {"user_id": s.user_id}

        def ev(kind: str, **fields: Any) -> dict[str, Any]:
            return {"event_id": self._id("e"), "type": kind, "ts": format_ts(ts), **base, **fields}

        if r.random() < c.search_share:
            cat = r.choices(s.favourites, s.fav_weights)[0]
            noun = r.choice(self.pop.catalog.in_category(cat)).noun
            yield ev("search", query=f"{r.choice(SEARCH_WORDS)} {noun}", category=cat)
        else:
            yield ev("page_view", props={"page": "home"})
            if r.random() < c.feed_impression:
                p = self.pick_product(s)
                yield from self._impression(s, p, "feed", ts)
                ts = self.clock.step(ts, r)
        cart: list[Product] = []
        for _ in range(1 + int(r.expovariate(1.0 / c.mean_views))):
            ts = self.clock.step(ts, r)
            p = self.pick_product(s)
            yield ev("product_view", product_id=p.product_id, category=p.category, price=p.price)
            clicked = False
            if r.random() < c.pdp_impression:
                clicked = yield from self._impression(s, p, "pdp", ts)
            if r.random() < (c.cart_after_click if clicked else c.cart_base):
                cart.append(p)
                yield ev("add_to_cart", product_id=p.product_id, category=p.category, price=p.price, quantity=1)
        for p in cart:
            if r.random() < c.purchase:
                ts = self.clock.step(ts, r)
                yield ev("purchase", product_id=p.product_id, category=p.category, price=p.price, quantity=1)

    def _impression(self, s: Shopper, p: Product, slot: str, ts: int) -> Generator[Step, ShownCopy | None, bool]:
        ask = CopyAsk(s, p, slot, ts, self.impressions)
        self.impressions += 1
        shown = yield ask
        if shown is None:  # the copy source failed: nothing was shown
            return False
        imp_id = self._id("i")
        common = {"user_id": s.user_id, "product_id": p.product_id, "category": p.category, "price": p.price,
                  "impression_id": imp_id, "copy_id": shown.copy_id, "slot": slot}
        yield {"event_id": self._id("e"), "type": "impression", "ts": format_ts(ts), **common}
        shown.p_click = click_probability(self.pop.cfg, s, p, shown.text, slot, shown.style)
        shown.clicked = self.rng.random() < shown.p_click
        if shown.clicked:
            click_ts = ts + int(self.rng.expovariate(1 / 4.0) * 1000) + 200
            yield {"event_id": self._id("e"), "type": "click", "ts": format_ts(click_ts), **common}
        return shown.clicked


CopySource = Callable[[Sequence[CopyAsk]], Sequence[ShownCopy | None]]
EventSink = Callable[[dict[str, Any]], None]


def run_sessions(
    sim: ShopperSim,
    source: CopySource,
    sink: EventSink,
    *,
    impressions: int | None = None,
    until: Callable[[], bool] | None = None,
    concurrency: int = 32,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> int:
    """Run sessions (``concurrency`` in flight) until ``impressions`` were shown or ``until()`` says
    stop; every event goes to ``sink`` in session order, every batch of copy asks to ``source``.
    Returns the number of impressions shown."""
    active: list[Session] = []
    waiting: list[tuple[Session, CopyAsk]] = []
    shown_n = 0

    def advance(sess: Session, value: ShownCopy | None, first: bool) -> CopyAsk | None:
        """Run a session to its next ask (returned) or its end (None)."""
        try:
            step = next(sess) if first else sess.send(value)
            while True:
                if isinstance(step, CopyAsk):
                    return step
                sink(step)
                step = next(sess)
        except StopIteration:
            return None

    def done() -> bool:
        return (impressions is not None and shown_n >= impressions) or (until is not None and until())

    while not done():
        while len(active) < concurrency:
            sess = sim.session(sim.pick_shopper())
            ask = advance(sess, None, True)
            if ask is not None:
                active.append(sess)
                waiting.append((sess, ask))
        parked: list[tuple[Session, CopyAsk]] = []
        if impressions is not None:  # never show more than asked: the rest wait for the next round
            left = max(0, impressions - shown_n)
            waiting, parked = waiting[:left], waiting[left:]
        if not waiting:
            break
        answers = source([a for _, a in waiting])
        batch, waiting = waiting, parked
        for (sess, ask), shown in zip(batch, answers, strict=True):
            ask_next = advance(sess, shown, False)
            if shown is not None:
                shown_n += 1
                if on_outcome is not None:
                    on_outcome(Outcome(ask, shown))
            if ask_next is None:
                active.remove(sess)
            else:
                waiting.append((sess, ask_next))
    for sess in active:
        sess.close()
    return shown_n


def iter_batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_sessions_threaded(
    sim: ShopperSim,
    answer: Callable[[CopyAsk], ShownCopy | None],
    sink: EventSink,
    *,
    until: Callable[[], bool],
    threads: int = 16,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> int:
    """Live mode: ``threads`` shoppers at a time, each waiting only for its own copy (no lock-step
    rounds), so a slow answer holds back one session, not all. Sessions advance under one lock
    (the simulator's random state is shared); ``answer`` runs outside it. Not reproducible
    event-for-event (thread timing decides the order), unlike :func:`run_sessions`."""
    import threading

    lock = threading.Lock()
    shown_n = [0]
    errors: list[BaseException] = []

    def step_to_ask(sess: Session, value: ShownCopy | None, first: bool) -> CopyAsk | None:
        try:
            step = next(sess) if first else sess.send(value)
            while not isinstance(step, CopyAsk):
                sink(step)
                step = next(sess)
            return step
        except StopIteration:
            return None

    def worker() -> None:
        try:
            while not until():
                with lock:
                    sess = sim.session(sim.pick_shopper())
                    ask = step_to_ask(sess, None, True)
                while ask is not None and not until():
                    shown = answer(ask)
                    with lock:
                        nxt = step_to_ask(sess, shown, False)
                        if shown is not None:
                            shown_n[0] += 1
                            if on_outcome is not None:
                                on_outcome(Outcome(ask, shown))
                    ask = nxt
                sess.close()
        except BaseException as exc:
            errors.append(exc)

    ths = [threading.Thread(target=worker, name=f"shopper-{i}", daemon=True) for i in range(threads)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    if errors:
        raise errors[0]
    return shown_n[0]
