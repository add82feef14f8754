"""A deterministic e-commerce relevance sample: queries, product documents, graded labels, reasons.

No dataset hub is reachable, so the default `make distill` run trains on data this module writes.
Each query names a product type and one to three attributes (brand, colour, material, size); each
product document describes a product with all four. The gold grade follows a fixed rubric:

    4  same product type, every attribute the query names matches
    3  same type, one named attribute differs
    2  same type, two or more named attributes differ
    1  another product type of the same category (running socks for running shoes)
    0  another category altogether

and the reason says what matched and what did not ("Matches: type, brand.\\nMisses: size (asked
42, has 44)."). Everything is a pure function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# category -> (product types, brands, materials, sizes)
CATALOG: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "footwear": (
        ("running shoes", "hiking boots", "sandals", "sneakers", "running socks", "slippers"),
        ("Nike", "Asics", "Salomon", "Merrell", "Adidas"),
        ("mesh", "leather", "suede", "canvas"),
        ("size 38", "size 40", "size 42", "size 44", "size 46"),
    ),
    "audio": (
        ("wireless headphones", "earbuds", "bluetooth speaker", "soundbar", "headphone stand"),
        ("Sony", "Bose", "JBL", "Sennheiser", "Anker"),
        ("plastic", "aluminium", "fabric", "walnut"),
        ("compact", "mid size", "full size"),
    ),
    "kitchen": (
        ("frying pan", "chef knife", "water bottle", "coffee grinder", "kettle", "cutting board"),
        ("Tefal", "Zwilling", "Bodum", "Stanley", "Le Creuset"),
        ("stainless steel", "cast iron", "ceramic", "bamboo", "glass"),
        ("500 ml", "1 litre", "20 cm", "28 cm"),
    ),
    "electronics": (
        ("laptop charger", "usb-c cable", "power bank", "phone case", "wireless mouse"),
        ("Anker", "Belkin", "Logitech", "Ugreen", "Samsung"),
        ("silicone", "nylon", "plastic", "aluminium"),
        ("45 W", "65 W", "100 W", "1 m", "2 m"),
    ),
    "home": (
        ("desk lamp", "pillow", "bath towel", "storage box", "wall clock", "curtains"),
        ("Ikea", "Philips", "Muji", "Brabantia", "Dyson"),
        ("cotton", "linen", "oak", "metal", "plastic"),
        ("small", "medium", "large", "extra large"),
    ),
    "sport": (
        ("yoga mat", "dumbbells", "tennis racket", "bike helmet", "jump rope", "gym bag"),
        ("Decathlon", "Wilson", "Giro", "Manduka", "Reebok"),
        ("rubber", "foam", "carbon", "neoprene", "polyester"),
        ("2 kg", "5 kg", "6 mm", "size M", "size L"),
    ),
    "clothing": (
        ("rain jacket", "wool sweater", "t-shirt", "jeans", "winter coat", "hoodie"),
        ("Patagonia", "Levi's", "Uniqlo", "The North Face", "Columbia"),
        ("wool", "cotton", "denim", "fleece", "polyester"),
        ("size S", "size M", "size L", "size XL"),
    ),
}
COLOURS = ("red", "blue", "black", "white", "green", "grey", "yellow", "pink", "navy", "orange")
ATTRIBUTES = ("brand", "colour", "material", "size")

# Sentences that make a document read like a product page; {type} is filled in.
FILLER = (
    "Free delivery on orders over 50 euros.",
    "Rated 4.5 out of 5 by more than two hundred customers.",
    "Easy to clean and built to last for years of daily use.",
    "Ships in recycled packaging within two working days.",
    "Comes with a two year warranty and free returns.",
    "A popular {type} for everyday use at home or on the go.",
    "Designed in Europe and tested for comfort and durability.",
    "Lightweight and easy to carry, with a clean modern look.",
    "Available in several colours and sizes while stocks last.",
    "Our customers often buy this {type} as a gift.",
    "Check the size chart before ordering to get the right fit.",
    "Made with care from responsibly sourced materials.",
)
FEATURES = (
    "water resistant", "machine washable", "dishwasher safe", "fast charging", "non slip", "ergonomic grip",
    "noise cancelling", "breathable", "foldable", "insulated", "scratch resistant", "adjustable",
)


@dataclass(frozen=True)
class Product:
    category: str
    type: str
    brand: str
    colour: str
    material: str
    size: str


def random_product(rng: random.Random, category: str | None = None, type_: str | None = None) -> Product:
    category = category or rng.choice(sorted(CATALOG))
    types, brands, materials, sizes = CATALOG[category]
    return Product(
        category=category,
        type=type_ or rng.choice(types),
        brand=rng.choice(brands),
        colour=rng.choice(COLOURS),
        material=rng.choice(materials),
        size=rng.choice(sizes),
    )


def catalogue_title(product: Product) -> tuple[str, dict[str, tuple[int, int]]]:
    """The catalogue writer's title, "{brand} {type} in {colour}, {material}, {size}.", and the
    character span of each field in it."""
    spans, text = {}, ""
    for field, after in (("brand", " "), ("type", " in "), ("colour", ", "), ("material", ", "), ("size", ".")):
        value = getattr(product, field)
        spans[field] = (len(text), len(text) + len(value))
        text += value + after
    return text, spans


# Token tags: what each word of a catalogue title says about the page's relevance to the query. The
# sample teacher learns to predict them on the title's tokens beside its grade (train.py, the tag
# term): a dense signal that shows it where to compare the query with the page.
TAG_NAMES = (
    "type asked",  # the title's product type is the query's
    "type of the category",  # another type of the query's category
    "type of another category",
    "attribute as asked",  # brand / colour / material / size equal to the query's
    "attribute not as asked",  # the query names this attribute with another value
    "attribute not asked",  # the query does not name it
)


def title_tags(query_product: Product, named: tuple[str, ...], doc: Product) -> list[list[int]]:
    """[[start, end, tag], ...]: character spans of the catalogue title's fields, tagged by index into
    TAG_NAMES (the `tags` of a catalogue row; the title opens its page)."""
    _, spans = catalogue_title(doc)
    if doc.type == query_product.type:
        type_tag = 0
    else:
        type_tag = 1 if doc.category == query_product.category else 2
    tags = [[*spans["type"], type_tag]]
    for attribute in ATTRIBUTES:
        if attribute not in named:
            tag = 5
        else:
            tag = 3 if getattr(doc, attribute) == getattr(query_product, attribute) else 4
        tags.append([*spans[attribute], tag])
    return sorted(tags)


def describe(rng: random.Random, product: Product, target_words: int) -> str:
    """A product page of about `target_words` words: a title with every attribute, then features
    and shop filler. The attributes always appear verbatim, so relevance is decidable from the text."""
    title, _ = catalogue_title(product)
    features = rng.sample(FEATURES, 2)
    sentences = [title, f"This {product.type} is {features[0]} and {features[1]}."]
    pool = list(FILLER)
    rng.shuffle(pool)
    words = sum(len(s.split()) for s in sentences)
    while words < target_words:
        if not pool:
            pool = list(FILLER)
            rng.shuffle(pool)
        sentence = pool.pop().format(type=product.type)
        sentences.append(sentence)
        words += len(sentence.split())
    text = " ".join(sentences)
    cut = text.split()
    return " ".join(cut[: max(target_words, len(title.split()))]) if len(cut) > target_words + 8 else text


# The second writer's pieces: extra title words, and sentences that state an attribute in prose.
TITLE_WORDS = ("Classic", "New", "Premium", "Everyday", "Original", "Pro", "Essential", "Comfort")
PROSE_TITLES = (
    "{brand} {extra} {type} {size} {colour}",
    "{extra} {colour} {type} by {brand}",
    "{type} from {brand} {extra} edition",
    "{brand} {type} {extra} {material} {size}",
)
PROSE_FACTS = {
    "brand": ("Made by {brand}.", "A product of the {brand} range.", "{brand} designed it for daily use."),
    "colour": ("The colour is {colour}.", "It comes in a {colour} finish.", "Shown here in {colour}."),
    "material": ("It is made of {material}.", "The body is {material}.", "Crafted from {material} for a long life."),
    "size": ("Size: {size}.", "This one is the {size} version.", "It is sold in {size}."),
}


def describe_prose(rng: random.Random, product: Product, target_words: int) -> str:
    """The same product written by another shop: a title in another word order without commas and
    with an extra word, and every attribute the title leaves out stated in its own prose sentence,
    in random order, among the filler. Held-out evaluation only: no model trains on this writer."""
    fields = {a: getattr(product, a) for a in ATTRIBUTES} | {"type": product.type, "extra": rng.choice(TITLE_WORDS)}
    template = rng.choice(PROSE_TITLES)
    title = template.format(**fields) + "."
    stated = [a for a in ATTRIBUTES if "{" + a + "}" not in template]
    facts = [rng.choice(PROSE_FACTS[a]).format(**fields) for a in stated]
    pool = [s.format(type=product.type) for s in FILLER]
    rng.shuffle(pool)
    body = facts + pool[: max(0, (target_words - len(title.split())) // 8 - len(facts) + 1)]
    rng.shuffle(body)
    return " ".join([title, *body])


def product_text(rng: random.Random, target_words: int) -> str:
    """Realistic product-description text of about `target_words` words (the latency benchmark builds
    its documents with it)."""
    if target_words < 1:
        raise ValueError(f"target_words must be >= 1, got {target_words}")
    return describe(rng, random_product(rng), target_words)


def _query(rng: random.Random, product: Product) -> tuple[str, tuple[str, ...]]:
    """Query text naming the product type and 1-3 attributes; returns (text, the attributes named)."""
    named = tuple(sorted(rng.sample(ATTRIBUTES, rng.choice((1, 2, 2, 3))), key=ATTRIBUTES.index))
    words = []
    if "brand" in named:
        words.append(product.brand)
    if "colour" in named:
        words.append(product.colour)
    if "material" in named:
        words.append(product.material)
    words.append(product.type)
    if "size" in named:
        words.append(product.size)
    text = " ".join(words)
    return (text.lower() if rng.random() < 0.5 else text), named


def _variant(rng: random.Random, target: Product, change: tuple[str, ...]) -> Product:
    """A product of the target's type that differs exactly in the attributes `change`."""
    _, brands, materials, sizes = CATALOG[target.category]
    options = {"brand": brands, "colour": COLOURS, "material": materials, "size": sizes}
    values = {a: getattr(target, a) for a in ATTRIBUTES}
    for attribute in ATTRIBUTES:
        if attribute in change:
            values[attribute] = rng.choice([v for v in options[attribute] if v != values[attribute]])
    return Product(target.category, target.type, values["brand"], values["colour"], values["material"], values["size"])


def grade_and_reason(query_product: Product, named: tuple[str, ...], doc: Product) -> tuple[int, str]:
    """The gold grade of `doc` for a query about `query_product` naming attributes `named`, and why."""
    if doc.category != query_product.category:
        return 0, f"Matches: nothing.\nMisses: a {doc.type} is not a {query_product.type}."
    if doc.type != query_product.type:
        return 1, f"Matches: category {doc.category}.\nMisses: a {doc.type}, not a {query_product.type}."
    matched = [a for a in named if getattr(doc, a) == getattr(query_product, a)]
    missed = [a for a in named if getattr(doc, a) != getattr(query_product, a)]
    matches = "Matches: " + ", ".join(["type", *matched]) + "."
    if not missed:
        return 4, matches + "\nMisses: nothing."
    detail = ", ".join(f"{a} (asked {getattr(query_product, a)}, has {getattr(doc, a)})" for a in missed)
    return (3 if len(missed) == 1 else 2), matches + f"\nMisses: {detail}."


# Cross-selling lines, as shops append them to product pages: they name products and attributes the
# page is NOT about. {values} and {type} come from the query (a page that misses what the searcher
# wants often advertises it) or, on pages that match, from other products of the category; so
# counting the query's words in the page (what a lexical ranker does) is misled, and a reader is not.
CROSS_SELL = (
    "Also available in {values}.",
    "Customers also viewed the {values} {type}.",
    "Compare it with our {values} {type}.",
    "Pairs well with a {values} {type}.",
)


def cross_sell(rng: random.Random, query_product: Product, named: tuple[str, ...], doc: Product, grade: int) -> str:
    """A cross-selling line for `doc`: on a page that misses the query (grade < 4) it names what the
    query asks for; on a matching page it names another product of the category."""
    template = rng.choice(CROSS_SELL)
    if grade < 4:
        wanted = [getattr(query_product, a) for a in named if getattr(doc, a) != getattr(query_product, a)]
        values = wanted or [getattr(query_product, a) for a in named] or [query_product.colour]
        return template.format(values=" ".join(values), type=query_product.type)
    other = random_product(rng, query_product.category)
    attribute = rng.choice([a for a in ATTRIBUTES if getattr(other, a) != getattr(doc, a)] or ["colour"])
    return template.format(values=getattr(other, attribute), type=other.type)


# The default run's sample (`make distill`; the demo's examples are its held-out queries): short
# product pages, so the small sample models see many pairs within the run's time.
N_QUERIES = 2400
HELDOUT_QUERIES = 180
DOC_WORDS = (8, 14)


def sample_pairs(
    seed: int = 0,
    n_queries: int = N_QUERIES,
    docs_per_query: int = 8,
    heldout_fraction: float = HELDOUT_QUERIES / N_QUERIES,
    doc_words: tuple[int, int] = DOC_WORDS,
    cross_sell_rate: float = 0.5,
    writer: str = "catalogue",
) -> list[dict]:
    """Graded (query, product document) pairs: rows {"id", "query", "doc", "label", "reason", "split"},
    and on the catalogue writer's rows "tags" (title_tags: what each title word says of the match).

    Every query gets `docs_per_query` documents spread over the grades (about two of each of 4, 3
    and 2, and one or two each of 1 and 0); `split` is "heldout" for a `heldout_fraction` share of
    the queries (all their documents), else "train". A `cross_sell_rate` share of the documents ends
    with a cross-selling line (see CROSS_SELL). `writer` writes the documents' text: "catalogue"
    (describe) or "prose" (describe_prose, another shop's style, for held-out evaluation). Queries,
    products, grades and splits depend on `seed` alone, so the two writers give the same pairs in
    other words. Deterministic in (`seed`, `writer`). The defaults are the default run's (`make distill`)."""
    writers = {"catalogue": describe, "prose": describe_prose}
    if writer not in writers:
        raise ValueError(f"sample_pairs: writer must be one of {', '.join(writers)}, got {writer!r}")
    if n_queries < 2 or docs_per_query < 2:
        raise ValueError("sample_pairs: need n_queries >= 2 and docs_per_query >= 2")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"sample_pairs: heldout_fraction must be in (0, 1), got {heldout_fraction}")
    rng = random.Random(seed)
    text_rng = random.Random(f"text-{writer}-{seed}")  # the wording; the pairs come from `rng` alone
    sell_rng = random.Random(f"cross-sell-{seed}")  # its own stream: the rate leaves the rest unchanged
    n_heldout = max(1, round(heldout_fraction * n_queries))
    heldout = set(rng.sample(range(n_queries), n_heldout))
    rows, seen_queries = [], set()
    q = 0
    while q < n_queries:
        target = random_product(rng)
        query, named = _query(rng, target)
        if query.lower() in seen_queries:
            continue  # a held-out query must never also be a training query
        seen_queries.add(query.lower())
        types = CATALOG[target.category][0]
        plan = ["exact", "exact", "one", "one", "two", "type", "other"]
        plan += rng.choices(["exact", "one", "two", "type", "other"], k=max(0, docs_per_query - len(plan)))
        plan = plan[:docs_per_query]
        docs = []
        for kind in plan:
            if kind == "exact":
                doc = _variant(rng, target, tuple(a for a in ATTRIBUTES if a not in named and rng.random() < 0.5))
            elif kind in ("one", "two"):
                k = min(len(named), 1 if kind == "one" else rng.choice((2, 3)))
                change = tuple(rng.sample(named, k)) + tuple(a for a in ATTRIBUTES if a not in named and rng.random() < 0.3)
                doc = _variant(rng, target, change)
            elif kind == "type":
                doc = random_product(rng, target.category, rng.choice([t for t in types if t != target.type]))
            else:
                doc = random_product(rng, rng.choice([c for c in sorted(CATALOG) if c != target.category]))
            docs.append(doc)
        rng.shuffle(docs)
        for d, doc in enumerate(docs):
            label, reason = grade_and_reason(target, named, doc)
            text = writers[writer](text_rng, doc, text_rng.randint(*doc_words))
            if sell_rng.random() < cross_sell_rate:
                text += " " + cross_sell(sell_rng, target, named, doc, label)
            row = {
                "id": f"q{q:04d}-d{d}",
                "query": query,
                "doc": text,
                "label": label,
                "reason": reason,
                "split": "heldout" if q in heldout else "train",
            }
            if writer == "catalogue":
                row["tags"] = title_tags(target, named, doc)
            rows.append(row)
        q += 1
    return rows


def corpus_texts(rows: list[dict]) -> list[str]:
    """Text to train the shared sample tokenizer on: every query, document and reason."""
    return [t for r in rows for t in (r["query"], r["doc"], r["reason"])]
