"""Business rules: their configuration and their checks — the one home of each rule.

Each rule is a small function registered under its violation code; ``validate`` runs them all.
The page they check is a ``PageBody``: module types, titles and item ids, before expansion. The
deterministic fix (``agent.stages.fix``) and the stages that build pools use the same helpers
(``BrandQuota``, ``Rules.title_problem``, ``module_bounds``), never their own copy of a rule.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.configfile import load_yaml_model
from agent.errors import ConfigError
from agent.schema import Violation
from agent.skeleton import MODULE_KINDS, ModuleSpec, Skeleton
from retrieval import Product
from retrieval.sources import SOURCES

# copy words that describe no product (prompts/rules.yaml repeats them for merchandisers to edit)
GENERIC_WORDS = (
    "pick", "picked", "picks", "edit", "favourite", "favourites", "favorite", "favorites", "trending", "popular",
    "top", "best", "new", "now", "more", "loved", "love", "must", "have", "today", "week", "find", "finds",
    "selection", "collection", "curated", "handpicked", "recommended", "discover", "explore", "treat", "shop",
    "again", "buy", "it", "something", "everyone", "people", "customers", "others", "essentials", "staples",
    "hot", "right", "go", "goes", "well", "match", "matches", "matching",
)


class TitleGrounding(BaseModel):
    """A model-written title must describe its module's products (``ungrounded_title``)."""

    model_config = ConfigDict(extra="forbid")

    min_share: float = Field(0.3, gt=0, le=1, description="share of the module's products the title must "
                             "describe: more than half of its content words (stemmed) among a product's title, "
                             "category path and brand words")
    generic_words: list[str] = Field(default_factory=lambda: list(GENERIC_WORDS), description="copy words that "
                                     "name no product (picks, edit, trending): never evidence; a title of only "
                                     "these is generic copy, allowed on any module")
    retry: bool = Field(False, description="ask the model again for an ungrounded title (a second generation); "
                        "false: the fix writes the module's grounded title at once")


class Rules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_items_per_module: int = Field(2, ge=1)
    max_items_per_module: int = Field(8, ge=1)
    max_items_per_brand: int = Field(2, ge=1, description="per module")
    min_categories: int = Field(3, ge=1, description="distinct leaf categories on the page")
    title_min_chars: int = Field(3, ge=1)
    title_max_chars: int = Field(40, ge=5)
    banned_words: list[str] = Field(default_factory=list)
    title_grounding: TitleGrounding = Field(default_factory=TitleGrounding)

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


# English function words: never what a title says about its products
STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "in", "into", "is", "it", "its", "just", "of",
    "on", "or", "our", "the", "this", "these", "that", "to", "up", "with", "you", "your", "yours", "we", "us", "my",
    "me", "all",
})


def stem(word: str) -> str:
    """A plural folded to its singular, crudely ("nails" -> "nail", "accessories" -> "accessory"):
    enough to match a title's word with a category's."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us")):
        return word[:-1]
    return word


def title_words(title: str) -> set[str]:
    """A title's words as a shopper reads them: stemmed, function words and numbers left out."""
    return {stem(w) for w in _words(title) if w not in STOPWORDS and not w.isdigit()}


@lru_cache(maxsize=100_000)
def product_words(product: Product) -> frozenset[str]:
    """What a product is called and filed under: its title, category path and brand, stemmed."""
    text = " ".join([product.title, *product.category_path, product.brand or ""])
    return frozenset(title_words(text))


def grounded_share(title: str, items: Iterable[str], products: dict[str, Product], rules: Rules) -> float | None:
    """The share of ``items`` that the title describes: more than half of its content words are
    among the product's (so "skin care" needs both words, and "hair care" does not match it). None
    for generic copy (no content word besides the configured generic ones) or no known items."""
    generic = {stem(w.casefold()) for w in rules.title_grounding.generic_words}
    words = title_words(title) - generic
    known = [products[i] for i in items if i in products]
    if not words or not known:
        return None
    return sum(2 * len(words & product_words(p)) > len(words) for p in known) / len(known)


def top_label(items: Iterable[str], products: dict[str, Product]) -> str | None:
    """The leaf category most of the module's products are filed under (for a violation's hint)."""
    counts = Counter(products[i].category for i in items if i in products)
    return counts.most_common(1)[0][0] if counts else None


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

    @cached_property
    def categories(self) -> int:
        """Distinct leaf categories of the in-stock catalogue, up to what the rules ask (counted once
        per context: the fix validates many times)."""
        return catalogue_categories(self.products, self.rules.min_categories)


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


def catalogue_categories(products: dict[str, Product], enough: int) -> int:
    """Distinct leaf categories of the in-stock catalogue, counted up to ``enough`` (a catalogue
    without categories files everything under one, "Other")."""
    seen: set[str] = set()
    for product in products.values():
        if product.in_stock:
            seen.add(product.category)
            if len(seen) >= enough:
                break
    return len(seen)


@rule("few_categories")
def _categories(page: PageBody, ctx: RuleContext) -> list[Violation]:
    categories = {ctx.products[i].category for mod in page.modules for i in mod.items if i in ctx.products}
    wanted = ctx.rules.min_categories
    if len(categories) < wanted:
        # the rule asks only what the catalogue has, and at least one: an empty page is never valid
        wanted = max(min(wanted, ctx.categories), 1)
    if len(categories) < wanted:
        return [Violation(code="few_categories", message=f"{len(categories)} categories on the page, needs {wanted}")]
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
    """The same title twice, or one whose words are all in another's ("Trending" beside "Trending
    in Makeup"): a shopper reads them as one heading repeated. Of two clashing titles the one that is
    not its module's configured title is flagged (configured titles differ from each other, checked
    at load), so the fix, which falls back to configured titles, always ends the clash."""
    seen: list[tuple[int, str, set[str], bool]] = []
    found = []
    for m, mod in enumerate(page.modules):
        key, words, configured = title_key(mod.title), title_words(mod.title), mod.title == mod.spec.title
        for i, other_key, other_words, other_configured in seen:
            similar = bool(words and other_words and (words <= other_words or other_words <= words))
            if key == other_key or (similar and not (configured and other_configured)):
                flagged = i if configured and not other_configured else m
                found.append(Violation(code="duplicate_title", module=flagged, message=f"title "
                                       f"{page.modules[flagged].title!r} repeats another module's title"))
                break
        seen.append((m, key, words, configured))
    return found


@rule("ungrounded_title")
def _ungrounded_title(page: PageBody, ctx: RuleContext) -> list[Violation]:
    """A title the model wrote must describe its module's products: at least ``min_share`` of them
    it describes (``grounded_share``). The merchandiser's configured title and generic copy pass."""
    found = []
    for m, mod in enumerate(page.modules):
        if mod.title == mod.spec.title or mod.spec.is_campaign or ctx.rules.title_problem(mod.title):
            continue  # the merchandiser's copy; or a title already refused by its own rule
        share = grounded_share(mod.title, mod.items, ctx.products, ctx.rules)
        if share is not None and share < ctx.rules.title_grounding.min_share:
            found.append(Violation(code="ungrounded_title", module=m, message=(
                f"title {mod.title!r} does not describe its products (it fits {share:.0%} of them); "
                f"they are mostly {top_label(mod.items, ctx.products)}")))
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


def check_skeleton(rules: Rules, skeleton: Skeleton, products: dict) -> None:
    """What a skeleton can get wrong against the rules and the catalogue, refused before any
    page: unknown item ids, configured titles that break a title rule, configured items over the
    brand quota of their module. An empty catalogue (nothing ingested yet) skips the id check."""
    problems = []
    if products:
        unknown = {i: where for i, where in skeleton.configured_items().items() if i not in products}
        problems += [f"{where}: item {i!r} is not in the catalogue" for i, where in unknown.items()]
    titles: set[str] = set()
    for m in skeleton.modules:
        if m.source not in {*MODULE_KINDS, *SOURCES}:
            problems.append(f"modules.{m.type}.source: unknown source {m.source!r}; known: {', '.join(MODULE_KINDS)}, "
                            f"{', '.join(sorted(SOURCES))}")
        if problem := rules.title_problem(m.title):
            problems.append(f"modules.{m.type}.title: {problem}")
        if title_key(m.title) in titles:
            problems.append(f"modules.{m.type}.title: {m.title!r} is another module's title too")
        titles.add(title_key(m.title))
        quota = BrandQuota(rules.max_items_per_brand, products)
        for i in [*m.items, *m.pinned]:
            if not quota.admits(i):
                problems.append(f"modules.{m.type}: configured item {i!r} exceeds the brand quota "
                                f"({rules.max_items_per_brand} per module)")
            quota.add(i)
    if problems:
        where = f"{skeleton.path}: " if skeleton.path else ""
        raise ConfigError(where + "; ".join(problems))
