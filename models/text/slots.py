"""Grounded copy: typed slots the model writes and the engine fills from the product record.

The student never spells a product fact. It writes ``"Save {discount} on the {title}, now
{sale_price}."`` and :func:`fill` renders it from the record at serve time, so a price or title
change shows in the very next response and a fact the record lacks can never be printed
(:func:`available` lists the slots a record can fill; decoding bans the others).

:func:`fill` gets the grammar around a slot right for any value: ``a``/``an`` by sound (``an
8-inch``, ``a one-touch``, ``an SPF 50``, ``a USB-C``, ``an hourglass``), no article before a
plural (``a {noun}`` with ``headphones``), verb agreement after a plural title or noun (``is`` ->
``are``, ``that lasts`` -> ``that last``), ``1 review`` not ``1 reviews``, a capital at the start
of a sentence, no ``the The North Face``; long marketplace titles are shortened to their head
(:func:`display_title`). Money is formatted per the record's currency.

:func:`delexicalize` is the inverse used to build training data: it replaces a written copy's
facts by slots and refuses a copy that keeps a number or names something not in the record.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from models.text.context import CopyContext, is_plural

SLOTS: tuple[str, ...] = (
    "title", "brand", "noun", "category", "attribute", "price", "sale_price", "saved", "discount", "rating",
    "reviews",
)
SLOT_TOKENS: tuple[str, ...] = tuple("{" + s + "}" for s in SLOTS)
SLOT_RE = re.compile(r"\{(" + "|".join(SLOTS) + r")\}")

TITLE_MAX_CHARS = 70
_CURRENCY = {"USD": ("$", 2), "EUR": ("€", 2), "GBP": ("£", 2), "JPY": ("¥", 0), "CAD": ("CA$", 2),
             "AUD": ("A$", 2), "INR": ("₹", 2), "CHF": ("CHF ", 2)}
_SENTENCE_END = re.compile(r"(^|[.!?]\s+)$")


class MissingSlot(ValueError):
    """A template names a slot the record cannot fill (constrained decoding prevents it)."""


def slot_token(name: str) -> str:
    return "{" + name + "}"


def money(x: float, currency: str = "USD") -> str:
    symbol, places = _CURRENCY.get((currency or "USD").upper(), (currency.upper() + " ", 2))
    return f"{symbol}{x:,.{places}f}"


def display_title(title: str, limit: int = TITLE_MAX_CHARS) -> str:
    """The title as copy shows it: whitespace collapsed, a long marketplace title cut to its head
    (before ``" - "``, ``" | "``, ``", "``, ``" ("`` or ``" with "``), else at a word boundary."""
    t = " ".join(title.split()).strip(" ,;-|")
    if len(t) <= limit:
        return t
    for sep in (" - ", " – ", " — ", " | ", ", ", " (", " with ", " for "):
        i = t.find(sep, 12)
        if 0 < i <= limit:
            return t[:i].strip(" ,;-|")
    head = t[: limit + 1]
    cut = head.rsplit(" ", 1)[0] if " " in head else t[:limit]
    return cut.strip(" ,;-|(") or t[:limit]


_AN_LETTERS = set("aefhilmnorsx")  # letter names that start with a vowel sound: "an SPF", "an LED"
_A_VOWEL_PREFIXES = ("one", "once", "uni", "use", "usa", "usu", "uti", "ure", "uro", "eu", "ewe", "u-", "ufo",
                     "ukulele", "ubiq")
_AN_VOWEL_EXCEPTIONS = ("unin", "unim", "unid", "unint", "unio")  # uninterrupted, unimportant, unidentified
_AN_H = ("hour", "honest", "honor", "honour", "heir", "herb")


def indefinite_article(phrase: str) -> str:
    """``a`` or ``an`` for the sound ``phrase`` starts with."""
    word = phrase.strip().lstrip("\"'“‘(").split(" ", 1)[0] if phrase.strip() else ""
    if not word:
        return "a"
    if word[0].isdigit():
        digits = re.match(r"\d[\d,]*", word)
        lead = (digits.group(0) if digits else word).split(",")[0]
        if lead.startswith("8") or lead in ("11", "18") or (len(lead) in (2, 5) and lead[:2] in ("11", "18")):
            return "an"
        return "a"
    core = word.split("-")[0]
    if len(core) > 1 and core.isupper() and core.isalpha():  # an acronym, read letter by letter
        return "an" if core[0].lower() in _AN_LETTERS else "a"
    low = word.lower()
    if low.startswith(_AN_H):
        return "an"
    if low[0] in "aeiou":
        if low.startswith(_A_VOWEL_PREFIXES) and not low.startswith(_AN_VOWEL_EXCEPTIONS):
            return "a"
        return "an"
    return "a"


_SINGULAR_NOUNS = {"series", "species", "news", "lens", "gas", "bus", "chassis", "mattress", "dress", "canvas",
                   "compass", "bass", "glass", "iris", "atlas", "cactus", "hummus", "couscous", "citrus"}
_PLURAL_TITLE_WORDS = {"jeans", "scissors", "pants", "shorts", "leggings", "headphones", "earbuds", "glasses",
                       "sunglasses", "sneakers", "boots", "shoes", "socks", "gloves", "diapers", "wipes"}


_UNITS = {"kg", "g", "mg", "lb", "lbs", "oz", "ml", "cl", "l", "fl", "gal", "pack", "pk", "pcs", "pieces", "count",
          "ct", "cm", "mm", "m", "in", "inch", "inches", "ft", "x"}
# a count, size or weight ('12', '1kg', '500ml', '6-pack', '2x'), not a model number ('R50', 'WH-1000XM5')
_QUANTITY = re.compile(r"^\d[\d.,/]*(?:-?(?:" + "|".join(sorted(_UNITS, key=len, reverse=True)) + r"))?$")
_BEFORE_NUMBER = {"size", "set", "pack", "case", "box", "of", "no", "no.", "vol", "vol.", "model", "gen"}
_BRACKET_TAIL = re.compile(r"\s*[(\[][^()\[\]]*[)\]]\s*$")


def without_quantity(phrase: str) -> str:
    """The phrase without what trails its head noun: quantities and sizes ('Coffee Beans 1kg',
    'Tablets, 100 Count', 'Socks 6-Pack') and bracketed notes ('Earbuds (2nd Generation)')."""
    out = phrase.strip()
    while True:
        cut = _BRACKET_TAIL.sub("", out)
        toks = cut.split()
        number = False
        while len(toks) > 1:
            last = toks[-1].strip(",;:").lower()
            if _QUANTITY.match(last) or not last or (last in _UNITS and _QUANTITY.match(toks[-2].lower())):
                number = number or bool(_QUANTITY.match(last))
                toks.pop()
                continue
            if number and last in _BEFORE_NUMBER:  # 'Size 4', 'Set of 3'
                toks.pop()
                continue
            break
        cut = " ".join(toks).rstrip(",;:-/ ")
        if cut == out or not cut:
            return cut or out
        out = cut


def plural_phrase(phrase: str) -> bool:
    """Whether a noun phrase reads as plural ('headphones', 'Levi's 501 Jeans', 'Coffee Beans 1kg';
    not 'lens')."""
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", without_quantity(phrase))
    if not words:
        return False
    head = words[-1].lower()
    if head in _SINGULAR_NOUNS:
        return False
    if head in _PLURAL_TITLE_WORDS:
        return True
    return is_plural(head)


_ADJECTIVE_ENDINGS = ("ed", "ing", "ful", "less", "able", "ible", "proof", "free", "resistant", "friendly", "al", "ic",
                      "ive", "ous", "ant", "ent", "ary", "ish", "y", "er", "est", "fit", "size", "weight")


def adjectival(attribute: str) -> bool:
    """Whether an attribute reads well before the noun ("a {attribute} {noun}"): one word or a
    hyphenated compound ("cordless", "7-in-1"), a short measurement ("7.25 qt", "SPF 50"), or
    up to three words ending like an adjective ("noise cancelling"); not a noun phrase ("30-hour
    battery", "7 appliances in 1")."""
    words = attribute.split()
    if not words or len(attribute) > 30 or len(words) > 3:
        return False
    if len(words) == 1:
        return True
    if len(words) == 2 and any(c.isdigit() for c in attribute):  # a measurement: "7.25 qt", "SPF 50"
        return words[1][0].isdigit() or len(words[1]) <= 4
    return words[-1].lower().endswith(_ADJECTIVE_ENDINGS)


def _attribute(ctx: CopyContext) -> str | None:
    noun = ctx.noun.lower()
    for a in ctx.attributes:
        a = " ".join(a.split())
        if a and adjectival(a) and (not noun or a.lower() not in noun):
            return a
    return None


def values(ctx: CopyContext) -> dict[str, str]:
    """The rendered value of every slot this record can fill (absent: the record lacks the fact)."""
    out: dict[str, str] = {}
    title = display_title(ctx.title)
    if title:
        out["title"] = title
    if ctx.brand.strip():
        out["brand"] = " ".join(ctx.brand.split())
    if ctx.noun.strip():
        out["noun"] = " ".join(ctx.noun.split())
    leaf = ctx.leaf_category.replace("_", " ").replace("-", " ").strip()
    if leaf:
        out["category"] = " ".join(leaf.split())
    attr = _attribute(ctx)
    if attr:
        out["attribute"] = attr
    cur = ctx.currency
    if ctx.price > 0:
        out["price"] = money(ctx.price, cur)
        if 0 < ctx.discount_pct < 100:
            out["sale_price"] = money(ctx.sale_price, cur)
            out["saved"] = money(round(ctx.price - ctx.sale_price, 2), cur)
            out["discount"] = f"{ctx.discount_pct}%"
    if ctx.reviews > 0:
        out["reviews"] = f"{ctx.reviews:,}"
        if ctx.rating > 0:
            out["rating"] = f"{ctx.rating:.1f}"
    return out


def available(ctx: CopyContext) -> frozenset[str]:
    """The slots ``ctx`` can fill; decoding must not produce any other."""
    return frozenset(values(ctx))


def slots_in(template: str) -> list[str]:
    return SLOT_RE.findall(template)


_UNIT_PLURALS = ("reviews", "ratings", "shoppers", "reviewers", "customers", "fans", "buyers", "stars")


def _plural_verb(word: str) -> str:
    low = word.lower()
    table = {"is": "are", "has": "have", "does": "do", "was": "were", "goes": "go", "'s": "'re"}
    if low in table:
        out = table[low]
    elif low.endswith("ies") and len(low) > 4:
        out = low[:-3] + "y"
    elif low.endswith(("shes", "ches", "sses", "xes")):
        out = low[:-2]
    elif low.endswith("s") and not low.endswith("ss"):
        out = low[:-1]
    else:
        return word
    return out[:1].upper() + out[1:] if word[:1].isupper() else out


_SENTENCE_STOP = re.compile(r"[.!?](?:\s|$)")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


_OBJECT_IT = re.compile(r"\b(get|grab|buy|add|use|check|try|order|make|pick|take|gift|love|see)(\s+)it\b", re.I)


def _plural_pronouns(text: str) -> str:
    """The product is plural: "It's better" -> "They're better", "Get it now" -> "Get them now"."""
    text = re.sub(r"\bit's\b", "they're", text)
    text = re.sub(r"\bIt's\b", "They're", text)
    return _OBJECT_IT.sub(lambda m: f"{m.group(1)}{m.group(2)}them", text)


def fill(template: str, ctx: CopyContext, vals: Mapping[str, str] | None = None) -> str:
    """Render a slotted copy from the record. Raises :class:`MissingSlot` for a slot the record
    cannot fill."""
    vals = values(ctx) if vals is None else vals
    parts = SLOT_RE.split(template)  # text, slot name, text, slot name, ..., text
    noun_plural = plural_phrase(vals.get("noun", ""))
    title_plural = plural_phrase(vals.get("title", "")) if not vals.get("noun") or \
        without_quantity(vals["title"]).lower().endswith(vals["noun"].split()[-1].lower()) else False
    out: list[str] = []
    prev_plural = False
    subject_plural = False  # the sentence's product phrase is plural: "..., and it's only" -> "they're"
    product_plural = False  # the last product phrase was plural: later sentences' "Get it" -> "Get them"
    for i, part in enumerate(parts):
        if i % 2 == 0:  # text between slots
            if i and prev_plural:
                part = re.sub(r"^(\s+(?:that\s+|which\s+)?)((?:is|has|does|was)\b|[a-z]+s\b)",
                              lambda m: m.group(1) + _plural_verb(m.group(2)), part, count=1)
            if subject_plural:
                stop = _SENTENCE_STOP.search(part)
                head, tail = (part[:stop.start()], part[stop.start():]) if stop else (part, "")
                part = re.sub(r"\bit's\b", "they're", head, count=1) + _plural_pronouns(tail)
                subject_plural = stop is None
            elif product_plural:
                part = _plural_pronouns(part)
            if i and out and out[-1].endswith((".", "!", "?")) and part.startswith(out[-1][-1]):
                part = part[1:]  # "... Inc." + "." -> one full stop
            out.append(part)
            continue
        name = part
        if name not in vals:
            raise MissingSlot(name)
        v = vals[name]
        before = "".join(out)
        nxt = parts[i + 1] if i + 1 < len(parts) else ""
        if name == "reviews" and v == "1":
            parts[i + 1] = re.sub(r"^(\s+)(" + "|".join(_UNIT_PLURALS) + r")\b", lambda m: m.group(1) + m.group(2)[:-1],
                                  nxt, count=1)
        phrase_plural = {"noun": noun_plural, "title": title_plural}.get(name, False)
        if name == "attribute" and nxt == " " and i + 2 < len(parts) and parts[i + 2] == "noun":
            phrase_plural = noun_plural
        art = re.search(r"(^|\s)(a|an|A|An)\s$", before)
        if art:
            start = art.start(2)
            if phrase_plural:
                out = [before[:start]]
                before = out[0]
                if _SENTENCE_END.search(before):
                    v = _cap(v)
            else:
                a = indefinite_article(v)
                out = [before[:start] + (_cap(a) if art.group(2)[0].isupper() else a) + " "]
                before = out[0]
        the = re.search(r"(^|\s)(the|The)\s$", before)
        if the and re.match(r"^[\"“‘']?the\s", v.lower()):
            out = [before[: the.start(2)]]
            v = _cap(v) if the.group(2) == "The" else v
            before = out[0]
        if name in ("noun", "attribute", "category") and _SENTENCE_END.search(before):
            v = _cap(v)
        out.append(v)
        prev_plural = name in ("noun", "title") and (noun_plural if name == "noun" else title_plural)
        if name in ("noun", "title"):
            subject_plural = product_plural = prev_plural
        if name == "attribute":
            prev_plural = False
    text = "".join(out)
    return re.sub(r"\s{2,}", " ", text).strip()


# --------------------------------------------------------------------------- delexicalization

_MONEY = re.compile(r"(?:[$€£¥₹]|CA\$|A\$)\s?\d[\d,]*(?:\.\d+)?")
_PCT = re.compile(r"\d+(?:\.\d+)?\s?%")
_DECIMAL = re.compile(r"(?<![\d.])\d\.\d(?![\d])")
_INT = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])|(?<![\d.,])\d+(?![\d.,])")


@dataclass(frozen=True)
class Delexicalized:
    text: str | None  # None: refused
    reason: str | None = None


def _num(s: str) -> float | None:
    try:
        return round(float(re.sub(r"[^\d.]", "", s)), 2)
    except ValueError:
        return None


def _sub_phrase(text: str, phrase: str, slot: str) -> str:
    if not phrase.strip():
        return text
    return re.sub(r"(?<![\w{])" + re.escape(phrase) + r"(?![\w}])", slot, text, flags=re.IGNORECASE)


def delexicalize(text: str, ctx: CopyContext, foreign_names: frozenset[str] = frozenset()) -> Delexicalized:
    """A written copy of ``ctx`` with its facts replaced by slots (the training target form), or a
    refusal with its reason: a number the record does not hold (``number``), a name of another
    product or brand from ``foreign_names`` (lower-case words/phrases), or no product named at all."""
    t = " ".join(text.split())
    v = values(ctx)
    # money first (its digits would otherwise be read as reviews or a rating)
    amounts = {}
    for name in ("price", "sale_price", "saved"):
        if name in v:
            amounts[_num(v[name])] = "{" + name + "}"

    def money_sub(m: re.Match[str]) -> str:
        return amounts.get(_num(m.group(0)), m.group(0))

    t = _MONEY.sub(money_sub, t)
    if "discount" in v:
        t = _PCT.sub(lambda m: "{discount}" if _num(m.group(0)) == float(ctx.discount_pct) else m.group(0), t)
    phrases: list[tuple[str, str]] = []
    if "title" in v:
        phrases += [(ctx.title, "{title}"), (v["title"], "{title}")]
    if "brand" in v:
        phrases.append((v["brand"], "{brand}"))
    noun = v.get("noun", "")
    for a in ctx.attributes:
        if noun:
            phrases.append((f"{a} {noun}", "{attribute} {noun}"))
        phrases.append((a, "{attribute}"))
    if noun:
        head = noun.split()[-1]
        variants = {noun}
        if is_plural(head):
            variants.add(noun[: -1] if not head.endswith("es") else noun[:-2])
        else:
            variants.add(noun + ("es" if head.endswith(("s", "x", "ch", "sh")) else "s"))
        phrases += [(x, "{noun}") for x in variants]
    if "category" in v:
        phrases.append((v["category"], "{category}"))
    for phrase, slot in sorted(phrases, key=lambda p: -len(p[0])):
        t = _sub_phrase(t, phrase, slot)
    if "rating" in v:
        t = _DECIMAL.sub(lambda m: "{rating}" if m.group(0) == v["rating"] else m.group(0), t)
    if "reviews" in v:
        t = _INT.sub(lambda m: "{reviews}" if m.group(0).replace(",", "") == str(ctx.reviews) else m.group(0), t)
    if re.search(r"\d", SLOT_RE.sub("", t)):
        return Delexicalized(None, "number")
    if not set(slots_in(t)) & {"title", "brand", "noun"}:
        return Delexicalized(None, "off_product")
    low = SLOT_RE.sub(" ", t).lower()
    for name in foreign_names:
        if re.search(r"(?<![\w])" + re.escape(name) + r"(?![\w])", low):
            return Delexicalized(None, "foreign_name")
    # canonical grammar: the filler chooses the article and the verb's number
    t = re.sub(r"\b(an)(\s+\{)", "a\\2", t)
    t = re.sub(r"\b(An)(\s+\{)", "A\\2", t)
    if plural_phrase(v.get("title", "")) or plural_phrase(noun):
        t = re.sub(r"(\{(?:title|noun)\}\s+(?:that\s+|which\s+)?)(are|have|do|were)\b",
                   lambda m: m.group(1) + {"are": "is", "have": "has", "do": "does", "were": "was"}[m.group(2)], t)
    return Delexicalized(t, None)
