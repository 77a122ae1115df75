"""The assemble stage: the body (what check reads) from the model's or the deterministic choices
plus what configuration fixes, then the ``Homepage`` a caller gets, with catalogue facts and reasons."""

from __future__ import annotations

from agent.rules import ModuleBody, PageBody, Rules
from agent.schema import Homepage, PageItem, PageMeta, PageModule
from agent.stages.pools import Pools
from agent.stages.reasons import reason
from retrieval import Product


def assemble(pools: Pools, chosen: list[tuple[str, list[str]]]) -> PageBody:
    """``chosen``: (title, item ids) per written module. Campaign modules as configured; pinned
    items first; sponsored items at their slots."""
    picks = iter(chosen)
    body = PageBody()
    for module in pools.modules:
        if not module.written:
            body.modules.append(ModuleBody(module.spec, module.title, list(module.pinned)))
            continue
        title, items = next(picks)
        items = [*module.pinned, *items]
        for offset, item in enumerate(module.ads):
            items.insert(min(module.spec.sponsored_position - 1 + offset, len(items)), item)
        body.modules.append(ModuleBody(module.spec, title, items, set(module.ads)))
    return body


def deterministic(pools: Pools, rules: Rules) -> PageBody:
    """Retrieval order and the configured (or planned) copy; no model."""
    return assemble(pools, [(m.title, [c.item_id for c in m.candidates[: m.count(rules)]]) for m in pools.written()])


def expand(user_id: str, body: PageBody, pools: Pools, meta: PageMeta, products: dict[str, Product],
           rules: Rules) -> Homepage:
    known = {c.item_id: c for module in pools.modules for c in module.candidates} | {
        c.item_id: c for c in pools.reserve}
    modules = []
    for mod in body.modules:
        items = []
        for item_id in mod.items:
            p, c = products[item_id], known.get(item_id)
            if item_id in mod.sponsored:
                why, source = "Sponsored", "sponsored"
            elif mod.spec.is_campaign or item_id in mod.spec.pinned:
                why = f"Featured: {mod.spec.title}"
                source = "campaign" if mod.spec.is_campaign else "pinned"
            else:
                why, source = reason(c, products), c.source if c else "popularity"
                if rules.banned_in(why):  # a cited title may carry a banned word: cite nothing
                    why = "Picked for you"
            items.append(PageItem(
                item_id=item_id, title=p.title, brand=p.brand, category=" > ".join(p.category_path),
                price=p.price, reason=why, source=source, score=round(c.score, 6) if c else 0.0,
                sponsored=item_id in mod.sponsored,
            ))
        modules.append(PageModule(type=mod.spec.type, title=mod.title, items=items))
    return Homepage(user_id=user_id, modules=modules, meta=meta)
