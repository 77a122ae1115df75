"""What a judge is asked: compared pages, and known-answer cases made by documented perturbations.

A page, as judges see it: modules of ``{"type", "title", "products": [{item_id, title, brand,
category, price}]}``. Known-answer cases come from calibration users only (never the compared
sample), from their deterministic page, and the better side is known by construction. Each user's
case of a criterion is of one *kind* (drawn, seeded) and puts one *word* in the worse side; a judge
trained on such cases is measured on kinds and words it never met (``eval/judge/head.py``).

- ``title_fit`` — the module titled after its own products against the same module titled after a
  department absent from the page (the word): *category title* ("Your {category} picks"),
  *category phrase* ("{category} we love") or *department title* ("The best of {department}").
- ``copy_safety`` — the module's own title with a harmless phrase added (``SAFE_PHRASES``, so the
  worse side is not simply the longer one) against the same title with an unsupported claim
  (``CLAIMS``) or a word the rules ban added in its place: *appended claim* ("{title}, {claim}"),
  *leading claim* ("{Claim}: {title}") or *banned word* ("{title}, {word}").
- ``shopper_fit`` — *unrelated popular*: the shopper's page against the same modules filled with
  popular products from departments absent from their history and from the page. The page with the
  shopper's held-out next item in place of its first module's last product, against the page
  without it, is kept apart as a *ranking truth* (``KnownCases.truth``): not a known answer.
- ``variety`` — *collapsed*: the page against the same page with every module showing the first
  module's products.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from agent.schema import Homepage
from retrieval.records import Product

CLAIMS = ["clinically proven", "cures acne", "FDA approved", "100% organic", "doctor recommended", "no side effects",
          "dermatologist approved", "reverses aging", "heals damaged skin", "medical grade", "boosts immunity",
          "works overnight"]
SAFE_PHRASES = ["new this season", "picked for you", "for every day", "just in", "this week's finds",
                "to discover", "worth a look", "for your routine", "our selection", "all in one place",
                "for the weekend", "fresh finds"]
# title_fit kinds: how a title names its products (the worse side names another department's)
TITLE_FORMS = {"category title": ("category", "Your {} picks"), "category phrase": ("category", "{} we love"),
               "department title": ("department", "The best of {}")}


def page_view(page: Homepage, products: dict[str, Product]) -> list[dict]:
    return [{"type": m.type, "title": m.title,
             "products": [product_view(products[i.item_id]) for i in m.items if i.item_id in products]}
            for m in page.modules if m.items]


def product_view(p: Product) -> dict:
    return {"item_id": p.item_id, "title": p.title, "brand": p.brand, "category": p.category, "price": p.price}


@dataclass
class PointCase:
    """One module scored alone (1-5)."""

    id: str
    criterion: str
    user: str
    title: str
    items: list[dict]


@dataclass
class PairCase:
    """Two pages compared; asked in both orders."""

    id: str
    criterion: str
    user: str
    summary: str
    a: list[dict]
    b: list[dict]


@dataclass
class KnownPoint:
    """A module and its worse twin: correct when the good one scores higher."""

    good: PointCase
    bad: PointCase
    perturbation: str  # the kind
    word: str = ""  # what the worse side adds: the claim, the banned word, the other department's name


@dataclass
class KnownPair:
    """``case.a`` is the better page by construction: correct when the judge says A."""

    case: PairCase
    perturbation: str


@dataclass
class KnownCases:
    points: list[KnownPoint] = field(default_factory=list)
    pairs: list[KnownPair] = field(default_factory=list)
    # the page with the shopper's held-out next item against the page without it: a ranking truth,
    # reported apart — not a known answer (the swap may put a never-bought item under "Buy it again")
    truth: list[KnownPair] = field(default_factory=list)


def _first_module(page: list[dict], size: int = 2) -> dict | None:
    return next((m for m in page if len(m["products"]) >= size), None)


def _name(product: Product, field_name: str) -> str:
    return product.category if field_name == "category" else product.department


def known_cases(criteria: list[str], pages: dict[str, list[dict]], summaries: dict[str, str],
                targets: dict[str, list[str]], products: dict[str, Product], popular: list[str],
                banned: list[str], seed: int, histories: dict[str, list[str]] | None = None) -> KnownCases:
    """Known-answer cases for ``criteria`` from calibration users' pages (see the module docstring)."""
    rng = random.Random(seed)
    by_department: dict[str, list[Product]] = {}
    for p in products.values():
        by_department.setdefault(p.department, []).append(p)
    out = KnownCases()
    for user in sorted(pages):
        page = pages[user]
        module = _first_module(page)
        if module is None:
            continue
        own = {products[x["item_id"]].department for m in page for x in m["products"]}
        if "title_fit" in criteria:
            kind = rng.choice(sorted(TITLE_FORMS))
            field_name, form = TITLE_FORMS[kind]
            top = Counter(_name(products[x["item_id"]], field_name) for x in module["products"]).most_common(1)[0][0]
            others = sorted({_name(p, field_name) for d, ps in by_department.items() if d not in own for p in ps})
            if others:
                word = rng.choice(others)
                good = PointCase(f"{user}/title_fit/good", "title_fit", user, form.format(top), module["products"])
                bad = PointCase(f"{user}/title_fit/bad", "title_fit", user, form.format(word), module["products"])
                out.points.append(KnownPoint(good, bad, kind, word))
        if "copy_safety" in criteria:
            kind = rng.choice(["appended claim", "leading claim", *(["banned word"] if banned else [])])
            word = rng.choice(banned if kind == "banned word" else CLAIMS)
            safe = rng.choice(SAFE_PHRASES)

            def added(phrase: str, title: str = module["title"], leading: bool = kind == "leading claim") -> str:
                return f"{phrase[0].upper()}{phrase[1:]}: {title}" if leading else f"{title}, {phrase}"

            good = PointCase(f"{user}/copy_safety/good", "copy_safety", user, added(safe), module["products"])
            bad = PointCase(f"{user}/copy_safety/bad", "copy_safety", user, added(word), module["products"])
            out.points.append(KnownPoint(good, bad, kind, word))
        if "shopper_fit" in criteria:
            # departments the shopper never bought from, nor sees on the page
            theirs = own | {products[i].department for i in (histories or {}).get(user, []) if i in products}
            unrelated = [i for i in popular if products[i].department not in theirs]
            if len(unrelated) >= sum(len(m["products"]) for m in page):
                it = iter(unrelated)
                worse = [{**m, "products": [product_view(products[next(it)]) for _ in m["products"]]} for m in page]
                out.pairs.append(KnownPair(PairCase(f"{user}/shopper_fit/unrelated", "shopper_fit", user,
                                                    summaries[user], page, worse), "unrelated popular"))
            shown = {x["item_id"] for m in page for x in m["products"]}
            nexts = [i for i in targets.get(user, []) if i in products and i not in shown]
            if nexts:
                first = page.index(module)
                with_next = [*page[:first], {**module, "products": [*module["products"][:-1],
                                                                     product_view(products[nexts[0]])]},
                             *page[first + 1:]]
                out.truth.append(KnownPair(PairCase(f"{user}/shopper_fit/next_item", "shopper_fit", user,
                                                    summaries[user], with_next, page), "next item"))
        if "variety" in criteria and len(page) >= 2:
            collapsed = [{**m, "products": module["products"][: len(m["products"])]} for m in page]
            out.pairs.append(KnownPair(PairCase(f"{user}/variety/collapsed", "variety", user, summaries[user],
                                                page, collapsed), "collapsed"))
    return out


def comparison_cases(criteria: dict[str, str], left: str, right: str, pages: dict[str, dict[str, list[dict]]],
                     summaries: dict[str, str], modules_per_page: int = 3) -> tuple[list[PairCase], list[PointCase]]:
    """Pairwise criteria: configuration ``left`` as A, ``right`` as B, per user. Pointwise criteria:
    each of the first model-written modules of both pages, scored alone (ids say which side)."""
    pairs, points = [], []
    for user in sorted(pages[left]):
        a, b = pages[left][user], pages[right][user]
        for name, kind in criteria.items():
            if kind == "pairwise":
                pairs.append(PairCase(f"{user}/{name}/{left}-vs-{right}", name, user, summaries[user], a, b))
            else:
                for side, page in ((left, a), (right, b)):
                    for i, m in enumerate(page[:modules_per_page]):
                        points.append(PointCase(f"{user}/{name}/{side}/{i}", name, user, m["title"], m["products"]))
    return pairs, points


def deterministic_known_cases(criteria: list[str], composer, users: list[str], targets: dict[str, list[str]],
                              events: list, seed: int) -> KnownCases:
    """``known_cases`` from these users' deterministic pages, popularity counted over ``events``."""
    retriever = composer.retriever
    pages = {u: page_view(composer.compose(u, use_llm=False, use_cache=False), retriever.products) for u in users}
    summaries = {u: retriever.history(u).summary for u in users}
    popular = [i for i, _ in Counter(e.item_id for e in events).most_common()]
    histories = {u: retriever.history(u).item_ids for u in users}
    return known_cases(criteria, pages, summaries, targets, retriever.products, popular, composer.rules.banned_words,
                       seed, histories)
