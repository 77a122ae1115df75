"""The fix stage, deterministic: drop what breaks a rule and back-fill honestly.

What configuration fixes is never changed here: campaign modules stay exactly as configured, and
pinned and sponsored items keep their places (the pools stage already placed only available ones,
within the sponsored quota). The fix edits the model's picks alone: it drops picks that break a
rule, tops a module up from its own pool (and popular items, only where the module may show them),
replaces an unusable title with the configured one, and widens the page's categories.
"""

from __future__ import annotations

from collections import Counter

from agent.rules import BrandQuota, ModuleBody, PageBody, RuleContext, module_bounds, validate
from agent.stages.pools import TOPPED_UP, Pools

TITLE_CODES = frozenset({"title_length", "title_form", "duplicate_title", "product_name_title", "banned_word",
                         "ungrounded_title"})


def _configured(mod: ModuleBody) -> set[str]:
    return set(mod.items) if mod.spec.is_campaign else set(mod.spec.pinned) | mod.sponsored


def _within_quota(page: PageBody, ctx: RuleContext) -> None:
    """Sponsored items past the page's quota (also configuration) lose their slot, in page order;
    the pools stage never places more, so this only guards a hand-made body."""
    left = ctx.skeleton.max_sponsored if ctx.skeleton else 0
    for mod in page.modules:
        for item in [i for i in mod.items if i in mod.sponsored]:
            if left > 0:
                left -= 1
            else:
                mod.items.remove(item)
                mod.sponsored.discard(item)


def fix(page: PageBody, pools: Pools, ctx: RuleContext) -> PageBody:
    rules, products = ctx.rules, ctx.products
    page = PageBody([ModuleBody(m.spec, m.title, list(m.items), set(m.sponsored)) for m in page.modules])
    _within_quota(page, ctx)
    reserve = [c.item_id for c in pools.reserve]
    used = {i for mod in page.modules for i in mod.items if i in _configured(mod)}
    fixed = PageBody()

    def fits(item: str, quota: BrandQuota) -> bool:
        p = products.get(item)
        excluded = ctx.skeleton is not None and p is not None and ctx.skeleton.excludes(p)
        return p is not None and p.in_stock and not excluded and item not in used and quota.admits(item)

    for mod, pool in zip(page.modules, pools.modules, strict=True):
        if mod.spec.is_campaign:
            fixed.modules.append(mod)  # a copy already: configuration, never edited
            continue
        low, high = module_bounds(mod, rules)
        kept = _configured(mod)
        configured = [(pos, i) for pos, i in enumerate(mod.items) if i in kept]
        quota = BrandQuota(rules.max_items_per_brand, products, [i for _, i in configured])
        picks: list[str] = []
        offered = [c.item_id for c in pool.candidates] + (reserve if mod.spec.source in TOPPED_UP else [])
        chosen = [i for i in mod.items if i not in kept]
        for item in [*chosen, *offered]:  # the model's picks first, then top up to the minimum
            room = high if item in chosen else low
            if len(picks) + len(configured) >= room:
                continue
            if fits(item, quota):
                picks.append(item)
                used.add(item)
                quota.add(item)
        for pos, item in configured:  # configuration's items back at their places
            picks.insert(min(pos, len(picks)), item)
        fixed.modules.append(ModuleBody(mod.spec, mod.title.strip(), picks, set(mod.sponsored)))

    _widen_categories(fixed, pools, ctx, used)
    # a module's new title can clash with another's: until none is left (each round ends at least one
    # module on its configured title, which clashes with no other configured one)
    for _ in range(len(fixed.modules) + 1):
        flagged = _title_faults(fixed, ctx)
        if not flagged:
            break
        for m in sorted({m for m, _ in flagged}):  # top to bottom: the same page in every process
            _retitle(fixed, m, ctx)
    return fixed


def _title_faults(page: PageBody, ctx: RuleContext) -> set[tuple[int, str]]:
    return {(v.module, v.code) for v in validate(page, ctx)
            if v.code in TITLE_CODES and v.module is not None and not page.modules[v.module].spec.is_campaign}


def _retitle(page: PageBody, m: int, ctx: RuleContext) -> None:
    """Module ``m``'s copy, from its own products: its ``title_template`` filled with the category
    most of them are filed under (leaf first, then department), the first that breaks no title rule
    and makes no other module's title clash; else the configured title (checked at load)."""
    mod = page.modules[m]
    mod.title = mod.spec.title
    others = {f for f in _title_faults(page, ctx) if f[0] != m}
    for title in template_titles(mod, ctx):
        mod.title = title
        faults = _title_faults(page, ctx)
        if not any(f[0] == m for f in faults) and faults <= others:
            return
    mod.title = mod.spec.title


def template_titles(mod: ModuleBody, ctx: RuleContext) -> list[str]:
    products = [ctx.products[i] for i in mod.items if i in ctx.products]
    if not mod.spec.title_template or not products:
        return []
    labels = [Counter(getattr(p, level) for p in products).most_common(1)[0][0] for level in ("category", "department")]
    return [mod.spec.title_template.format(category=label) for label in dict.fromkeys(labels)]


def _widen_categories(page: PageBody, pools: Pools, ctx: RuleContext, used: set[str]) -> None:
    """Add items of categories not yet on the page to a module that may show them: where it has
    room, else in place of one of its picks whose category appears more than once. Candidates
    come from the module's own pool (popular items only where the module may show them)."""
    products = ctx.products

    def categories() -> Counter:
        return Counter(products[i].category for mod in page.modules for i in mod.items)

    reserve = [c.item_id for c in pools.reserve]
    for mod, pool in sorted(zip(page.modules, pools.modules, strict=True), key=lambda mp: len(mp[0].items)):
        if mod.spec.is_campaign:
            continue
        configured = _configured(mod)
        offered = [c.item_id for c in pool.candidates] + (reserve if mod.spec.source in TOPPED_UP else [])
        for candidate in offered:
            have = categories()
            if len(have) >= ctx.rules.min_categories:
                return
            p = products.get(candidate)
            if p is None or candidate in used or not p.in_stock or p.category in have:
                continue
            if ctx.skeleton is not None and ctx.skeleton.excludes(p):
                continue
            if len(mod.items) < module_bounds(mod, ctx.rules)[1]:
                if not BrandQuota(ctx.rules.max_items_per_brand, products, mod.items).admits(candidate):
                    continue
                mod.items.append(candidate)
            else:
                victims = [i for i in reversed(mod.items) if i not in configured and have[products[i].category] > 1
                           and BrandQuota(ctx.rules.max_items_per_brand, products,
                                          [j for j in mod.items if j != i]).admits(candidate)]
                if not victims:
                    continue
                mod.items[mod.items.index(victims[0])] = candidate
                used.discard(victims[0])
            used.add(candidate)
