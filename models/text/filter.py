"""Safety filter for generated copy, and the deterministic fallback template.

``check_copy(text, product)`` rejects copy that is too short/long, multi-line, contains an
unfilled placeholder, first-person chatter ("I", "my"), a banned word or claim
(``models/data/banned.txt``), a repeated word n-gram, a hashtag or link, is not about the
product (neither brand nor product noun named),
quotes a number the product does not support (price, sale price, discount, rating, reviews,
numbers in the title/attributes), or makes a style claim the product cannot back (an eco claim
on a non-eco product, a percentage-off claim without a discount). A failed copy is replaced by
``fallback_copy(ctx)``; :class:`FilterStats` counts both for the metrics, fallbacks by reason.

``check_grounding(template, ctx)`` checks a slotted copy before it is filled (``models.text.slots``):
every slot fillable from the record, no number outside a slot, no name of another product or
brand, no capitalized name mid-sentence (the record's names come only through slots).
``SLOT_MAX_CHARS`` caps the rendered copy per page slot.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from core.catalog import Product
from models.text.context import CopyContext

MIN_CHARS = 15
MAX_CHARS = 220
SLOT_MAX_CHARS = {"pdp": 220, "email": 220, "feed": 140, "cart": 120}
MIN_WORDS = 4
MAX_WORDS = 45
REPEAT_NGRAM = 4

BANNED_FILE = "banned.txt"


@dataclass(frozen=True)
class FilterResult:
    ok: bool
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.ok


def load_banned(path: str | Path | None = None) -> tuple[str, ...]:
    """Banned words/phrases: ``path`` or the packaged ``models/data/banned.txt``."""
    if path is None:
        text = resources.files("models").joinpath("data", BANNED_FILE).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line.lower())
    return tuple(out)


@cache
def _banned_regex(entries: tuple[str, ...]) -> re.Pattern[str]:
    parts = []
    for e in sorted(entries, key=len, reverse=True):
        left = r"(?<![\w])" if e[0].isalnum() else ""
        right = r"(?![\w])" if e[-1].isalnum() else ""
        parts.append(left + re.escape(e) + right)
    return re.compile("|".join(parts))


@cache
def _default_banned() -> tuple[str, ...]:
    return load_banned()


_PLACEHOLDER = re.compile(
    r"\{|\}|\[[^\]]*\]|<[^>]*>|\bX{2,}\b|\$X\b|\bN/A\b|\bTBD\b|lorem|ipsum|_NAME|PRODUCT_|\bINSERT\b|\.\.\.\s*$",
    re.IGNORECASE,
)
_FIRST_PERSON = re.compile(r"(?<![\w'])(i|i'm|i'd|i've|i'll|me|my|mine)(?![\w'])", re.IGNORECASE)
_LINK = re.compile(r"#\w|https?://|www\.|\.com\b|@\w", re.IGNORECASE)
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_WORD = re.compile(r"[a-z0-9']+(?:-[a-z0-9']+)*")
_WORD_OR_PUNCT = re.compile(r"\d[\d,]*(?:\.\d+)?|[a-z0-9']+(?:-[a-z0-9']+)*|[.,:;!?]")


def _num(text: str) -> float | None:
    try:
        return round(float(text.replace(",", "").rstrip(".")), 2)
    except ValueError:
        return None


def allowed_numbers(product: Product) -> set[float]:
    """Numbers a copy may quote for this product."""
    nums: set[float] = {5.0}  # "/5", "5 stars"
    price = round(float(product.price), 2)
    nums.add(price)
    if product.discount_pct:
        nums.add(float(product.discount_pct))
        nums.add(round(price * (100 - product.discount_pct) / 100.0, 2))
        nums.add(round(price - round(price * (100 - product.discount_pct) / 100.0, 2), 2))
    nums.add(round(float(product.rating), 2))
    if product.reviews:
        nums.add(float(product.reviews))
    for text in (product.title, *product.attributes, product.noun):
        for m in _NUMBER.finditer(text):
            v = _num(m.group(0))
            if v is not None:
                nums.add(v)
    return nums


def _noun_words(product: Product) -> set[str]:
    words: set[str] = set()
    noun = (product.noun or (product.title.split() or [""])[-1]).lower()
    parts = _WORD.findall(noun)
    if parts:
        head = parts[-1]
        words.update({head, head.rstrip("s"), head + "s", head + "es"})
        if head.endswith("es"):
            words.add(head[:-2])
    return {w for w in words if len(w) >= 3}


def mentions_product(text: str, product: Product) -> bool:
    """Brand, (shown) title or product noun (singular/plural) named in the text."""
    from models.text.slots import display_title

    low = text.lower()
    if product.brand and product.brand.lower() in low:
        return True
    if product.title and display_title(product.title).lower() in low:
        return True
    words = set(_WORD.findall(low))
    return bool(words & _noun_words(product))


def _repeated_ngram(words: Sequence[str], n: int = REPEAT_NGRAM) -> bool:
    """A word n-gram occurring twice anywhere, or a 1-3 word phrase repeated back to back
    ("great great", "so good so good")."""
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    if grams and grams.most_common(1)[0][1] > 1:
        return True
    for k in range(1, n):
        for i in range(len(words) - 2 * k + 1):
            if words[i : i + k] == words[i + k : i + 2 * k] and (k > 1 or len(words[i]) > 2):
                return True
    return False


def _without_own_facts(low: str, product: Product) -> str:
    """Lower-case ``low`` with the record's own title, brand, noun and attributes blanked out: the
    words the copy rules judge are the model's, not the product's name."""
    from models.text.slots import display_title

    own = {x.lower().replace("\u2019", "'").strip() for x in (product.title, display_title(product.title),
                                                              product.brand, product.noun, *product.attributes)}
    for phrase in sorted((x for x in own if x), key=len, reverse=True):
        low = low.replace(phrase, " ")
    return low


def max_chars(slot: str | None) -> int:
    return SLOT_MAX_CHARS.get(slot or "", MAX_CHARS)


def check_copy(text: str, product: Product | CopyContext, banned: Iterable[str] | None = None,
               limit: int = MAX_CHARS) -> FilterResult:
    """Whether ``text`` is safe, well-formed copy about ``product`` (at most ``limit`` characters);
    the first failing rule names the reason."""
    if isinstance(product, CopyContext):
        product = product.to_product()
    t = text.strip()
    if len(t) < MIN_CHARS:
        return FilterResult(False, "too_short")
    if len(t) > limit:
        return FilterResult(False, "too_long")
    if any(c in t for c in "\n\r\t") or any(ord(c) < 32 for c in t):
        return FilterResult(False, "multiline")
    if _PLACEHOLDER.search(t):
        return FilterResult(False, "placeholder")
    low = t.lower().replace("\u2019", "'")
    model_words = _without_own_facts(low, product)  # "Miracle-Gro", "Massage Gun", "100% Whey" are the record's
    if _LINK.search(model_words):  # "X-ACTO #1 Precision Knife" is the record's title, not a hashtag
        return FilterResult(False, "link_or_hashtag")
    if _FIRST_PERSON.search(model_words):
        return FilterResult(False, "first_person")
    entries = tuple(banned) if banned is not None else _default_banned()
    m = _banned_regex(tuple(e.lower() for e in entries)).search(model_words) if entries else None
    if m:
        return FilterResult(False, f"banned:{m.group(0)}")
    words = _WORD.findall(low)
    if len(words) < MIN_WORDS:
        return FilterResult(False, "too_short")
    if len(words) > MAX_WORDS:
        return FilterResult(False, "too_long")
    if _repeated_ngram(_WORD_OR_PUNCT.findall(low)) or re.search(r"([!?.])\1\1", t):
        return FilterResult(False, "repetition")
    if not mentions_product(t, product):
        return FilterResult(False, "off_product")
    allowed = allowed_numbers(product)
    for m2 in _NUMBER.finditer(t):
        v = _num(m2.group(0))
        if v is None or v not in allowed:
            return FilterResult(False, "unsupported_number")
    if not product.eco and any(w in low for w in ("sustainab", "planet", "footprint", "eco-conscious", "greener")):
        return FilterResult(False, "false_eco_claim")
    if not product.discount_pct and ("% off" in low or "discount" in low or "reduced" in low):
        return FilterResult(False, "false_discount_claim")
    if ("bestseller" in low or "best-seller" in low) and product.reviews < 100:
        return FilterResult(False, "unsupported_bestseller")
    return FilterResult(True, None)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _money(x: float) -> str:
    return f"${x:,.2f}"


FALLBACK_TEMPLATES = (
    "Meet the {title}: a {attribute} {noun}, now {sale_price} ({discount} off).",
    "Meet the {title}, now {sale_price} ({discount} off).",
    "Meet the {title}: a {attribute} {noun} for {price}.",
    "Meet the {title}: a {noun} for {price}.",
    "Meet the {title}, {price}.",
    "Meet the {title}.",
    "A {noun} from {brand}, {price}.",
    "Take a look at this {noun}, {price}.",
)


def fallback_copy(ctx: CopyContext) -> str:
    """Deterministic, neutral (``practical``) copy built from the product fields alone, through the
    same slot filler as the model's copy (so articles, plurals and money read right).

    Never raises: the first template the record can fill that passes :func:`check_copy` at the
    slot's length, else the shortest fillable one as is."""
    from models.text.slots import MissingSlot, fill, values

    vals = values(ctx)
    product = ctx.to_product()
    filled: list[str] = []
    for template in FALLBACK_TEMPLATES:
        try:
            text = fill(template, ctx, vals)
        except MissingSlot:
            continue
        if check_copy(text, product, limit=max_chars(ctx.slot)).ok:
            return text
        filled.append(text)
    return min(filled, key=len) if filled else f"Take a look, {vals.get('price', '')}.".replace(", .", ".")


_CAPITAL = re.compile(r"(?<![\w'’-])([A-Z][a-z]*[A-Z0-9]?[\w'’-]*)")
_SENTENCE_START = re.compile(r"(^|[.!?:]\s+|[\"“(]\s*)$")


def check_grounding(template: str, ctx: CopyContext) -> FilterResult:
    """Whether a slotted copy names only what the record holds: every slot fillable, no number
    outside a slot, no other product's brand or noun, no capitalized name mid-sentence."""
    from models.text.slots import SLOT_RE, available, slots_in

    have = available(ctx)
    for name in slots_in(template):
        if name not in have:
            return FilterResult(False, f"missing_field:{name}")
    bare = SLOT_RE.sub("\x00", template)
    if re.search(r"\d", bare):
        return FilterResult(False, "invented_number")
    low = bare.lower()
    own: set[str] | None = None
    for name, pattern in _name_patterns():  # the names in the text first (a substring test), then whose they are
        if name in low and pattern.search(low):
            if own is None:
                own = _own_words(ctx.to_product())
            if not _is_own(name, own):
                return FilterResult(False, "other_product")
    for m in _CAPITAL.finditer(bare):
        if not _SENTENCE_START.search(bare[: m.start()]) and m.group(1) != "I":
            return FilterResult(False, "ungrounded_name")
    return FilterResult(True, None)


@cache
def _foreign_all() -> tuple[frozenset[str], frozenset[str]]:
    from core.catalog import vocabulary

    voc = vocabulary()
    names = {b.lower() for b in voc["brands"]}
    for n in voc["nouns"]:
        head = n.lower()
        names.add(head)
        names.add(head + "s" if not head.endswith("s") else head[:-1])
    return frozenset(n for n in names if len(n) >= 3), frozenset()


def foreign_names(product: Product | None = None) -> frozenset[str]:
    """Lower-case brands and nouns of the synthetic training catalog other than ``product``'s (the
    names a model trained on it could spill into another product's copy)."""
    names, _ = _foreign_all()
    if product is None:
        return names
    own = _own_words(product)
    return frozenset(n for n in names if not _is_own(n, own))


def _own_words(product: Product) -> set[str]:
    """The product's brand, noun, title words and attributes, lower-case: names it may use."""
    return {w.lower() for w in (product.brand, product.noun, *product.title.split(), *product.attributes) if w}


def _is_own(name: str, own: set[str]) -> bool:
    return any(name in o or o in name for o in own)


@cache
def _name_patterns() -> tuple[tuple[str, re.Pattern[str]], ...]:
    """Every catalog name with its whole-word pattern, compiled once (check_grounding ran ~200
    ``re.search`` with ``re.escape`` per candidate: 2 ms, most of a copy's filtering)."""
    names, _ = _foreign_all()
    return tuple((n, re.compile(r"(?<![\w])" + re.escape(n) + r"(?![\w])")) for n in sorted(names))


@dataclass
class FilterStats:
    """Counters for the metrics: copies checked, passed, replaced by the fallback, and why."""

    checked: int = 0
    passed: int = 0
    fallbacks: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    fallback_reasons: Counter[str] = field(default_factory=Counter)  # the commonest candidate rejection

    def record(self, result: FilterResult) -> None:
        self.checked += 1
        if result.ok:
            self.passed += 1
        else:
            self.reasons[(result.reason or "unknown").split(":", 1)[0]] += 1

    def as_dict(self) -> dict[str, object]:
        return {
            "checked": self.checked, "passed": self.passed, "fallbacks": self.fallbacks,
            "pass_rate": self.passed / self.checked if self.checked else None,
            "reasons": dict(self.reasons), "fallback_reasons": dict(self.fallback_reasons),
        }


def first_safe(texts: Iterable[str], ctx: CopyContext, stats: FilterStats | None = None) -> tuple[str, bool]:
    """The first text that passes the filter, else ``fallback_copy(ctx)``; returns
    ``(text, used_fallback)`` and updates ``stats``."""
    product = ctx.to_product()
    for text in texts:
        res = check_copy(text, product)
        if stats is not None:
            stats.record(res)
        if res.ok:
            return text.strip(), False
    if stats is not None:
        stats.fallbacks += 1
    return fallback_copy(ctx), True
