"""Business rules: configuration, checks, and the deterministic fix.

Each rule is a small function registered under its violation code; ``validate`` runs them all.
The page they check is a ``PageBody``: module types, titles and item ids, before expansion.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
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


def _bounds(mod: ModuleBody, rules: Rules) -> tuple[int, int]:
    return (max(mod.spec.min_items, rules.min_items_per_module), min(mod.spec.max_items, rules.max_items_per_module))


@rule("module_size")
def _size(page: PageBody, ctx: RuleContext) -> list[Violation]:
    found = []
    for m, mod in enumerate(page.modules):
        low, high = _bounds(mod, ctx.rules)
        if not low <= len(mod.items) <= high:
            found.append(Violation(code="module_size", module=m,
                                   message=f"module {mod.spec.type} has {len(mod.items)} items, needs {low}-{high}"))
    return found


@rule("brand_cap")
def _brand_cap(page: PageBody, ctx: RuleContext) -> list[Violation]:
    found = []
    for m, mod in enumerate(page.modules):
        counts: Counter = Counter()
        for i in mod.items:
            brand = ctx.products[i].brand if i in ctx.products else None
            if brand:
                counts[brand.lower()] += 1
                if counts[brand.lower()] > ctx.rules.max_items_per_brand:
                    found.append(Violation(code="brand_cap", module=m, item=i,
                                           message=f"more than {ctx.rules.max_items_per_brand} items of {brand}"))
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
    low, high = ctx.rules.title_min_chars, ctx.rules.title_max_chars
    return [
        Violation(code="title_length", module=m,
                  message=f"title {mod.title!r} has {len(mod.title)} chars, needs {low}-{high}")
        for m, mod in enumerate(page.modules)
        if not low <= len(mod.title.strip()) <= high
    ]


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


def fix(page: PageBody, pools: list[list[str]], reserve: list[str], ctx: RuleContext) -> PageBody:
    """Deterministic repair: drop what breaks a rule, then back-fill from the module's own pool,
    then from the reserve (popular items). Always returns a page that passes when the catalogue
    holds enough distinct items."""
    rules, products = ctx.rules, ctx.products
    used: set[str] = set()
    sponsored_left = ctx.skeleton.max_sponsored if ctx.skeleton else 0
    fixed = PageBody()

    def fits(item: str, items: list[str]) -> bool:
        p = products.get(item)
        if p is None or not p.in_stock or item in used:
            return False
        if ctx.skeleton is not None and ctx.skeleton.excludes(p):
            return False
        brand = (p.brand or "").lower()
        return not brand or sum((products[i].brand or "").lower() == brand for i in items) < rules.max_items_per_brand

    for mod, pool in zip(page.modules, pools, strict=True):
        low, high = _bounds(mod, rules)
        items: list[str] = []
        for item in mod.items:  # the chosen items first, up to the maximum
            sponsored = item in mod.sponsored  # over the page quota, a sponsored item loses its slot
            if len(items) < high and fits(item, items) and (not sponsored or sponsored_left > 0):
                items.append(item)
                used.add(item)
                sponsored_left -= sponsored
        for item in [*pool, *reserve]:  # then top up to the minimum
            if len(items) >= low:
                break
            if fits(item, items):
                items.append(item)
                used.add(item)
        title = mod.title.strip()
        if rules.banned_in(title) or not rules.title_min_chars <= len(title) <= rules.title_max_chars:
            title = mod.spec.title[: rules.title_max_chars]
        fixed.modules.append(ModuleBody(mod.spec, title, items, mod.sponsored & set(items)))

    _widen_categories(fixed, [*(i for pool in pools for i in pool), *reserve], ctx, used)
    return fixed


def _widen_categories(page: PageBody, candidates: list[str], ctx: RuleContext, used: set[str]) -> None:
    """Add items of categories not yet on the page where a module has room; otherwise swap out an
    item whose category appears more than once."""
    products = ctx.products

    def categories() -> Counter:
        return Counter(products[i].category for mod in page.modules for i in mod.items)

    for candidate in candidates:
        have = categories()
        if len(have) >= ctx.rules.min_categories:
            return
        p = products.get(candidate)
        if p is None or candidate in used or not p.in_stock or p.category in have:
            continue
        brand = (p.brand or "").lower()
        for mod in sorted(page.modules, key=lambda m: len(m.items)):
            same_brand = sum((products[i].brand or "").lower() == brand for i in mod.items) if brand else 0
            if same_brand >= ctx.rules.max_items_per_brand:
                continue
            if len(mod.items) < _bounds(mod, ctx.rules)[1]:
                mod.items.append(candidate)
            else:
                victims = [i for i in reversed(mod.items) if have[products[i].category] > 1]
                if not victims:
                    continue
                mod.items[mod.items.index(victims[0])] = candidate
                used.discard(victims[0])
            used.add(candidate)
            break
