"""Grounded copy: the slot filler, delexicalization, the grounding check, the fallback and
constrained decoding (a slot the record cannot fill is never sampled, nor is a digit)."""

from __future__ import annotations

import pytest
import torch

from core.catalog import Catalog, Product
from models.generate import generate_candidates
from models.sequences import EOS_TOKEN
from models.text.context import CopyContext, build_prompt, department, product_context
from models.text.filter import check_copy, check_grounding, fallback_copy
from models.text.slots import (
    SLOT_TOKENS,
    MissingSlot,
    available,
    delexicalize,
    display_title,
    fill,
    indefinite_article,
    money,
    plural_phrase,
    slots_in,
    without_quantity,
)
from models.training.student import add_slot_tokens
from tests.models.conftest import make_student


def ctx_of(**kw: object) -> CopyContext:
    base: dict[str, object] = dict(product_id="p-1", title="Aurora Wireless Headphones", category="electronics/audio",
                                   brand="Aurora", price=129.99, attributes=("wireless",), rating=4.6, reviews=1234,
                                   eco=False, discount_pct=0, noun="headphones")
    base.update(kw)
    return product_context(Product(**base), "pdp")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the filler

@pytest.mark.parametrize(("phrase", "article"), [
    ("apple", "an"), ("one-touch grill", "a"), ("8-inch pan", "an"), ("11-piece set", "an"), ("18 qt pot", "an"),
    ("7-in-1 cooker", "a"), ("SPF 50 cream", "an"), ("USB-C cable", "a"), ("LED lamp", "an"), ("hourglass", "an"),
    ("umbrella", "an"), ("unique gift", "a"), ("European kettle", "a"), ("honest price", "an"), ("", "a"),
])
def test_indefinite_article_by_sound(phrase: str, article: str) -> None:
    assert indefinite_article(phrase) == article


def test_articles_plurals_and_agreement_follow_the_record() -> None:
    t = "A {noun} that lasts: the {title} is {price}. Get a {attribute} {noun}."
    assert fill(t, ctx_of(noun="umbrella", title="Totes Auto Umbrella", attributes=("auto-open",))) == \
        "An umbrella that lasts: the Totes Auto Umbrella is $129.99. Get an auto-open umbrella."
    assert fill(t, ctx_of()) == \
        "Headphones that last: the Aurora Wireless Headphones are $129.99. Get wireless headphones."
    assert fill("The {title} has {reviews} reviews.", ctx_of(reviews=1)) == \
        "The Aurora Wireless Headphones have 1 review."
    assert fill("Loved by {reviews} shoppers.", ctx_of(reviews=1)) == "Loved by 1 shopper."
    t = "The {title} is rated {rating} stars, and it's only {price}. It's a gift."
    assert fill(t, ctx_of()) == \
        "The Aurora Wireless Headphones are rated 4.6 stars, and they're only $129.99. They're a gift."
    assert fill(t, ctx_of(title="Aurora Wireless Speaker", noun="speaker")) == \
        "The Aurora Wireless Speaker is rated 4.6 stars, and it's only $129.99. It's a gift."
    # later sentences refer to the plural product too; an opener before it is left alone
    t = "It's been a while! The {title} is built to last. Get it now, use it for years before it's gone."
    assert fill(t, ctx_of()) == ("It's been a while! The Aurora Wireless Headphones are built to last. "
                                 "Get them now, use them for years before they're gone.")
    assert fill(t, ctx_of(title="Aurora Wireless Speaker", noun="speaker")).endswith(
        "Get it now, use it for years before it's gone.")


def test_a_title_ending_in_a_quantity_is_as_plural_as_its_noun() -> None:
    """'Coffee Beans 1kg' is coffee beans (the quantity, size or bracketed note after the noun does not
    make it singular); a model number is not a quantity ('Canon EOS R50' stays singular)."""
    t = "The {title} is {noun} you will use every day, and it's only {price}."
    beans = ctx_of(title="Lavazza Qualita Oro Coffee Beans 1kg", noun="coffee beans", price=17.99)
    assert fill(t, beans) == ("The Lavazza Qualita Oro Coffee Beans 1kg are coffee beans you will use every day, "
                              "and they're only $17.99.")
    for title in ("Finish Dishwasher Tablets, 100 Count", "Pampers Diapers Size 4 (Pack of 120)",
                  "Mason Jars, Set of 3", "Hanes Crew Socks 6-Pack"):
        assert plural_phrase(title), title
    for title in ("Canon EOS R50", "Glass Jar 500 ml", "iPhone 15", "Apple AirPods Pro (2nd Generation)"):
        assert not plural_phrase(title), title
    assert without_quantity("Lavazza Qualita Oro Coffee Beans 1kg") == "Lavazza Qualita Oro Coffee Beans"


def test_no_double_article_and_one_full_stop() -> None:
    c = ctx_of(title="The North Face Denali Jacket", brand="The North Face", noun="fleece jacket")
    assert fill("Meet the {title}.", c) == "Meet The North Face Denali Jacket."
    assert fill("Meet the {title}.", ctx_of(title="Yahoo Co.")) == "Meet the Yahoo Co."
    quoted = ctx_of(title='"The Original" Snuggie Wearable Blanket', noun="wearable blanket")
    assert fill("Shoppers love the {title}.", quoted) == 'Shoppers love "The Original" Snuggie Wearable Blanket.'
    assert check_copy(fill("Shoppers love the {title}.", quoted), quoted).ok


def test_the_records_own_words_are_not_judged_as_the_models() -> None:
    """A banned word inside the product's name ("Miracle-Gro", "Massage Gun", "100% Whey") is the
    record's, not a claim of the copy; the same word written by the model is still refused."""
    for title, brand, noun in (("Miracle-Gro Indoor Potting Mix", "Miracle-Gro", "potting mix"),
                               ("Theragun Mini Massage Gun", "Therabody", "massage gun"),
                               ("Gold Standard 100% Whey Protein", "Optimum Nutrition", "protein powder")):
        c = ctx_of(title=title, brand=brand, noun=noun, attributes=())
        assert check_copy(f"Meet the {title}, loved by shoppers.", c).ok, title
    c = ctx_of(title="Miracle-Gro Indoor Potting Mix", brand="Miracle-Gro", noun="potting mix", attributes=())
    assert check_copy("The Miracle-Gro Indoor Potting Mix works like a miracle.", c).reason == "banned:miracle"


def test_money_and_numbers_formatted_per_record() -> None:
    c = ctx_of(price=1234.5, discount_pct=20)
    assert fill("Now {sale_price}, {discount} off {price}: save {saved}.", c) == \
        "Now $987.60, 20% off $1,234.50: save $246.90."
    assert money(1500, "JPY") == "¥1,500" and money(9.5, "EUR") == "€9.50" and money(3, "GBP") == "£3.00"
    assert fill("Rated {rating} by {reviews} shoppers.", ctx_of(rating=4.0, reviews=12500)) == \
        "Rated 4.0 by 12,500 shoppers."


def test_unicode_quotes_and_long_titles() -> None:
    torch_title = "Müller Crème Brûlée Torch 🔥"
    assert fill("Meet the {title}.", ctx_of(title=torch_title)) == f"Meet the {torch_title}."
    quoted = 'Samsung 65" Class "The Frame" QLED 4K TV'
    assert fill("Meet the {title}.", ctx_of(title=quoted)) == f"Meet the {quoted}."
    long = ("Amazon Basics Heavy Duty Steel Adjustable Shelving Unit, 5-Shelf Storage Rack for Garage, "
            "Kitchen and Pantry - 350 lbs per shelf, 36 x 14 x 72 inch " * 3)[:300]
    shown = display_title(long)
    assert shown == "Amazon Basics Heavy Duty Steel Adjustable Shelving Unit"
    text = fill("Meet the {title}, {price}.", ctx_of(title=long))
    assert len(text) < 100 and check_copy(text, ctx_of(title=long)).ok
    assert len(display_title("x" * 300)) <= 70


def test_a_missing_field_has_no_slot_and_cannot_be_filled() -> None:
    bare = ctx_of(brand="", noun="", attributes=(), reviews=0, discount_pct=0)
    assert available(bare) == {"title", "category", "price"}
    with pytest.raises(MissingSlot):
        fill("From {brand}: the {title}.", bare)
    assert "has price" in build_prompt(bare) and "brand" not in build_prompt(bare).split("\n")[0]
    assert {"sale_price", "discount", "saved"} <= available(ctx_of(discount_pct=15))


def test_prompt_holds_no_product_fact_and_unseen_categories_fall_back() -> None:
    prompt = build_prompt(ctx_of(title="Sony WH-1000XM5", brand="Sony", price=399.99))
    assert "Sony" not in prompt and "399" not in prompt
    assert department("automotive/tyres") == "general" and department("home/cookware") == "home"
    assert department("Health/Vitamins") == "beauty"


# --------------------------------------------------------------------------- delexicalization

def test_delexicalize_replaces_facts_and_refuses_invented_ones() -> None:
    c = ctx_of(discount_pct=20)
    d = delexicalize("Save 20% on the Aurora Wireless Headphones, now $103.99. Rated 4.6 by 1,234 fans.", c)
    assert d.text == "Save {discount} on the {title}, now {sale_price}. Rated {rating} by {reviews} fans."
    assert fill(d.text, c) == "Save 20% on the Aurora Wireless Headphones, now $103.99. Rated 4.6 by 1,234 fans."
    assert delexicalize("The Aurora Wireless Headphones, rated 4.9 by 21 shoppers.", c).reason == "number"
    assert delexicalize("Great value: the Kettle & Cup headphones.", c,
                        frozenset({"kettle & cup"})).reason == "foreign_name"
    assert delexicalize("Great value, act now.", c).reason == "off_product"
    assert delexicalize("The Aurora Wireless Headphones are here.", c).text == "The {title} is here."


# --------------------------------------------------------------------------- the grounding check

@pytest.mark.parametrize(("template", "reason"), [
    ("Shop the {title} from Kettle & Cup.", "other_product"),  # a brand of the training catalog
    ("Love your earbuds? Shop the {title}.", "other_product"),  # another product's noun
    ("Shop the {title}: rated 4.6 stars by 1,28 shoppers.", "invented_number"),
    ("Shop the {title}, just like the Brew Concentrate.", "ungrounded_name"),  # any unslotted name
    ("Shop the {title}, now {sale_price}.", "missing_field"),  # no discount in the record
])
def test_grounding_rejects_planted_errors(template: str, reason: str) -> None:
    c = ctx_of(title="Ray-Ban Aviator Classic Sunglasses", brand="Ray-Ban", noun="sunglasses")
    res = check_grounding(template, c)
    assert not res.ok and (res.reason or "").split(":")[0] == reason


def test_grounding_flags_exactly_the_other_products_names() -> None:
    """check_grounding finds names through precompiled patterns: on copy naming random catalog
    names, it says other_product exactly when a catalog name that is not the product's own (not
    inside one of its words, none of them inside it) is a whole word of it (the definition)."""
    import random
    import re

    from models.text.filter import foreign_names

    rng = random.Random(3)
    names = sorted(n for n in foreign_names() if not re.search(r"\d", n))  # a digit is invented_number first
    products = Catalog.generate(20, seed=8).products
    seen = 0
    for _ in range(400):
        p = rng.choice(products)
        name = rng.choice([*names, p.brand.lower(), p.noun] if rng.random() < 0.5 else [p.brand.lower(), p.noun])
        text = f"Better than any {name}: the {{title}}."
        low = text.lower().replace("{title}", "\x00")
        own = {w.lower() for w in (p.brand, p.noun, *p.title.split(), *p.attributes) if w}
        foreign = [n for n in foreign_names() if not any(n in o or o in n for o in own)]  # the definition
        want = any(re.search(r"(?<![\w])" + re.escape(n) + r"(?![\w])", low) for n in foreign)
        got = check_grounding(text, product_context(p)).reason == "other_product"
        assert got == want, (text, p.title)
        seen += want
    assert 0 < seen < 400
    own = products[0]
    assert check_grounding(f"The {{title}}: a {own.noun} to keep.", product_context(own)).ok


def test_grounding_accepts_copy_built_from_slots() -> None:
    c = ctx_of(discount_pct=10)
    for t in ("Welcome back! Save {discount} on the {title}. Order today.",
              "Picked for you: {brand}'s {attribute} {noun}, now {sale_price}.",
              "Quality you can feel: the {title}."):
        assert check_grounding(t, c).ok, t
        assert check_copy(fill(t, c), c).ok


# --------------------------------------------------------------------------- the fallback

@pytest.mark.parametrize("product", [
    Product("a", "Ninja Foodi 7-in-1 Pressure Cooker", "home/kitchen", "Ninja", 129.99,
            ("7 appliances in 1", "one-touch cleaning"), 4.7, 12000, False, 0, "pressure cooker"),
    Product("b", "Levi's 501 Original Fit Jeans", "fashion/apparel", "Levi's", 69.5, (), 4.5, 30000, False, 0, "jeans"),
    Product("c", "Generic Clothes Pegs (24 pack)", "home/laundry", "", 4.99, (), 0.0, 0, False, 0, ""),
    Product("d", "Weber Spirit II E-310 Gas Grill", "garden/grills", "Weber", 499.0, ("one-touch cleaning",), 4.6, 800,
            False, 15, "gas grill"),
])
def test_fallback_reads_right_and_passes_the_filter(product: Product) -> None:
    for slot in ("pdp", "feed", "cart"):
        ctx = product_context(product, slot)
        text = fallback_copy(ctx)
        assert check_copy(text, ctx).ok, text
        assert "an one" not in text and "a 7 appliances" not in text and "a jeans" not in text


# --------------------------------------------------------------------------- constrained decoding

def test_decoding_never_samples_a_missing_slot_or_a_digit(toy_raw_tokenizer) -> None:
    from tokenizers import Tokenizer

    from models.tokenizer import wrap_fast

    tok = wrap_fast(Tokenizer.from_str(toy_raw_tokenizer.to_str()))
    add_slot_tokens(tok)
    vocab = tok.get_vocab()
    model = make_student(len(tok), tok.convert_tokens_to_ids(EOS_TOKEN), seed=3)
    slot_ids = [vocab[t] for t in SLOT_TOKENS]
    with torch.no_grad():  # make every slot token likely at every step, so a ban is what keeps one out
        model.get_input_embeddings().weight[slot_ids] *= 40.0
    rich, bare = ctx_of(discount_pct=20), ctx_of(brand="", reviews=0, attributes=())
    prompts = [build_prompt(rich), build_prompt(bare)]
    groups = generate_candidates(model, tok, prompts, k=16, max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0,
                                 seed=1, slots_ok=[available(rich), available(bare)])
    seen: list[set[str]] = []
    for ctx, group in zip((rich, bare), groups, strict=True):
        used = {s for c in group for s in slots_in(c.text)}
        assert used <= available(ctx)
        assert not any(ch.isdigit() for c in group for ch in c.text)
        seen.append(used)
    assert {"brand", "reviews", "rating"} & seen[0]  # the rich record's own slots do get sampled
    assert seen[1] and seen[1] <= {"title", "noun", "category", "price"}
