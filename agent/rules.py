"""Business rules: their configuration and their checks — the one home of each rule.

Each rule is a small function registered under its violation code; ``validate`` runs them all.
The page they check is a ``PageBody``: module types, titles and item ids, before expansion. The
deterministic fix (``agent.repair``) and the stages that build pools use the same helpers
(``BrandQuota``, ``Rules.title_problem``, ``module_bounds``), never their own copy of a rule.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.configfile import load_yaml_model
from agent.schema import Violation
from agent.skeleton import ModuleSpec, Skeleton
from retrieval import Product


class Rules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_items_per_module: int = Field(2, ge=1)
    max_items_per_module: int = Field(8, ge=1)
    max_items_per_brand: int = Field(2, ge=1, description="per module")
    min_categories: int = Field(3, ge=1, description="distinct leaf categories on the page")
    title_min_chars: int = Field(3, ge=1)
    title_max_chars: int = Field(40, ge=5)
    banned_words: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _bounds(self) -> Rules:
        if self.min_items_per_module > self.max_items_per_module:
            raise ValueError("min_items_per_module must be <= max_items_per_module")
        if self.title_min_chars > self.title_max_chars:
            raise ValueError("title_min_chars must be <= title_max_chars")
        return self

    @classmethod
    def load(cls, path: Path) -> Rules:
        return load_yaml_model(path, cls)

    def banned_in(self, text: str) -> list[str]:
        return [w for w in self.banned_words if re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE)]

    def title_length_problem(self, title: str) -> str | None:
        low, high = self.title_min_chars, self.title_max_chars
        if not low <= len(title) <= high:
            return f"title {title!r} has {len(title)} chars, needs {low}-{high}"
        return None

    def title_problem(self, title: str) -> str | None:
        """Why ``title`` cannot be a module title on its own (length, form, banned words), or None."""
        if problem := self.title_length_problem(title) or title_form_problem(title):
            return problem
        if words := self.banned_in(title):
            return f"title {title!r} uses banned word(s) {words}"
        return None


# Inside a title: letters and digits of any script, spaces and these marks; it starts with a
# letter or digit and ends with one or with "!" or "?" (no dangling comma or dash).
TITLE_MARKS = " ,'’&!?-"
_WORD = re.compile(r"\w+")


def title_form_problem(title: str) -> str | None:
    if not title:
        return "the title is empty"
    odd = sorted({c for c in title if not (c.isalnum() or c in TITLE_MARKS)})
    if odd:
        return f"title {title!r} has characters a title may not use: {''.join(odd)!r}"
    if not title[0].isalnum():
        return f"title {title!r} must start with a letter or digit"
    if not (title[-1].isalnum() or title[-1] in "!?"):
        return f"title {title!r} ends with {title[-1]!r}: dangling punctuation"
    if "  " in title:
        return f"title {title!r} has a double space"
    return None


def title_key(title: str) -> str:
    """Titles compared as a shopper reads them: case and runs of spaces folded."""
    return " ".join(title.split()).casefold()


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def _contains(words: list[str], run: list[str]) -> bool:
    return any(words[i : i + len(run)] == run for i in range(len(words) - len(run) + 1))


@dataclass
class ModuleBody:
    spec: ModuleSpec
    title: str
    items: list[str]
    sponsored: set[str] = field(default_factory=set)


@dataclass
class PageBody:
    modules: list[ModuleBody] = field(default_factory=list)


@dataclass
class RuleContext:
    rules: Rules
    products: dict[str, Product]
    skeleton: Skeleton | None = None  # exclusions and the sponsored quota live in the skeleton


RuleCheck = Callable[[PageBody, RuleContext], list[Violation]]
RULES: dict[str, RuleCheck] = {}


def rule(code: str) -> Callable[[RuleCheck], RuleCheck]:
    def add(check: RuleCheck) -> RuleCheck:
        if code in RULES:
            raise ValueError(f"rule {code!r} is registered twice")
        RULES[code] = check
        return check

    return add


@rule("unknown_item")
def _known(page: PageBody, ctx: RuleContext) -> list[Violation]:
    return [
        Violation(code="unknown_item", message=f"item {i} is not in the catalogue", module=m, item=i)
        for m, mod in enumerate(page.modules) for i in mod.items if i not in ctx.products
    ]


@rule("out_of_stock")
def _in_stock(page: PageBody, ctx: RuleContext) -> list[Violation]:
    return [
        Violation(code="out_of_stock", message=f"item {i} is out of stock", module=m, item=i)
        for m, mod in enumerate(page.modules) for i in mod.items
        if i in ctx.products and not ctx.products[i].in_stock
    ]


@rule("duplicate_item")
def _unique(page: PageBody, ctx: RuleContext) -> list[Violation]:
    seen: set[str] = set()
    found = []
    for m, mod in enumerate(page.modules):
        for i in mod.items:
            if i in seen:
                found.append(Violation(code="duplicate_item", message=f"item {i} appears twice", module=m, item=i))
            seen.add(i)
    return found


def module_bounds(mod: ModuleBody, rules: Rules) -> tuple[int, int]:
    return (max(mod.spec.min_items, rules.min_items_per_module), min(mod.spec.max_items, rules.max_items_per_module))


@rule("module_size")
def _size(page: PageBody, ctx: RuleContext) -> list[Violation]:
    found = []
    for m, mod in enumerate(page.modules):
        low, high = module_bounds(mod, ctx.rules)
        if not low <= len(mod.items) <= high:
            found.append(Violation(code="module_size", module=m,
                                   message=f"module {mod.spec.type} has {len(mod.items)} items, needs {low}-{high}"))
    return found


class BrandQuota:
    """Items per brand within one module, counted by ``Product.brand_key``: the one count that
    pools, the rule, the fix, category widening and fine-tuning targets all use."""

    def __init__(self, cap: int, products: dict[str, Product], items: Iterable[str] = ()):
        self.cap, self.products = cap, products
        self.counts: Counter = Counter()
        for item in items:
            self.add(item)

    def _key(self, item: str) -> str | None:
        product = self.products.get(item)
        return product.brand_key if product else None

    def admits(self, item: str) -> bool:
        key = self._key(item)
        return key is None or self.counts[key] < self.cap

    def add(self, item: str) -> None:
        if (key := self._key(item)) is not None:
            self.counts[key] += 1


@rule("brand_cap")
def _brand_cap(page: PageBody, ctx: RuleContext) -> list[Violation]:
    found = []
    for m, mod in enumerate(page.modules):
        quota = BrandQuota(ctx.rules.max_items_per_brand, ctx.products)
        for i in mod.items:
            if not quota.admits(i):
                found.append(Violation(code="brand_cap", module=m, item=i, message=f"more than "
                                       f"{ctx.rules.max_items_per_brand} items of {ctx.products[i].brand}"))
            quota.add(i)
    return found


@rule("few_categories")
def _categories(page: PageBody, ctx: RuleContext) -> list[Violation]:
    categories = {ctx.products[i].category for mod in page.modules for i in mod.items if i in ctx.products}
    if len(categories) < ctx.rules.min_categories:
        return [Violation(code="few_categories",
                          message=f"{len(categories)} categories on the page, needs {ctx.rules.min_categories}")]
    return []


@rule("title_length")
def _title_length(page: PageBody, ctx: RuleContext) -> list[Violation]:
    return [Violation(code="title_length", module=m, message=problem)
            for m, mod in enumerate(page.modules) if (problem := ctx.rules.title_length_problem(mod.title))]


@rule("title_form")
def _title_form(page: PageBody, ctx: RuleContext) -> list[Violation]:
    return [Violation(code="title_form", module=m, message=problem)
            for m, mod in enumerate(page.modules) if (problem := title_form_problem(mod.title))]


@rule("duplicate_title")
def _duplicate_title(page: PageBody, ctx: RuleContext) -> list[Violation]:
    seen: set[str] = set()
    found = []
    for m, mod in enumerate(page.modules):
        key = title_key(mod.title)
        if key in seen:
            found.append(Violation(code="duplicate_title", module=m, message=f"title {mod.title!r} is used twice"))
        seen.add(key)
    return found


@rule("product_name_title")
def _product_name_title(page: PageBody, ctx: RuleContext) -> list[Violation]:
    """A module title is copy about the module, not a product's name (the model tends to echo the
    first candidate's title): three or more of its words in a row from a title on the page fail."""
    titles = [_words(ctx.products[i].title) for mod in page.modules for i in mod.items if i in ctx.products]
    found = []
    for m, mod in enumerate(page.modules):
        words = _words(mod.title)
        if mod.title == mod.spec.title:
            continue  # the merchandiser's own copy
        if len(words) >= 3 and any(_contains(title, words) for title in titles):
            found.append(Violation(code="product_name_title", module=m,
                                   message=f"title {mod.title!r} is a product's name, not copy"))
    return found


@rule("banned_word")
def _banned(page: PageBody, ctx: RuleContext) -> list[Violation]:
    return [
        Violation(code="banned_word", module=m, message=f"title {mod.title!r} uses banned word(s) {words}")
        for m, mod in enumerate(page.modules) if (words := ctx.rules.banned_in(mod.title))
    ]


@rule("excluded")
def _excluded(page: PageBody, ctx: RuleContext) -> list[Violation]:
    if ctx.skeleton is None:
        return []
    return [
        Violation(code="excluded", message=f"item {i} is in an excluded category or brand", module=m, item=i)
        for m, mod in enumerate(page.modules) for i in mod.items
        if i in ctx.products and ctx.skeleton.excludes(ctx.products[i])
    ]


@rule("sponsored_quota")
def _sponsored(page: PageBody, ctx: RuleContext) -> list[Violation]:
    quota = ctx.skeleton.max_sponsored if ctx.skeleton else 0
    count = sum(len(mod.sponsored & set(mod.items)) for mod in page.modules)
    if count > quota:
        return [Violation(code="sponsored_quota", message=f"{count} sponsored items on the page, quota {quota}")]
    return []


def validate(page: PageBody, ctx: RuleContext) -> list[Violation]:
    return [v for check in RULES.values() for v in check(page, ctx)]
