"""The draft and retry stages' parts: the prompt the model reads, the grammar it writes under, and
the reading of what it wrote. The model decides only copy and the order of its module's handles."""

from __future__ import annotations

import math

from pydantic import ValidationError

from agent.backends import HandleOrder
from agent.prompting import Prompt
from agent.rules import Rules
from agent.schema import PageDraft, Violation, draft_json_schema
from agent.stages.pools import Pools
from retrieval import History, Product


class UnusableDraft(ValueError):
    """The model's text is not a page of this request (bad JSON, wrong shape)."""


def draft_messages(prompt: Prompt, rules: Rules, history: History, pools: Pools,
                   products: dict[str, Product]) -> list[dict[str, str]]:
    modules = []
    for module in pools.written():
        theme = pools.themes.get(module.spec.type)
        scores = [c.score for c in module.candidates]
        # rank: the candidate's place by retrieval score in its module (1 = retrieval's first choice,
        # whatever order the lines are in); source: the retrieval source that scored it highest
        candidates = [
            {"handle": h, "title": products[c.item_id].title, "brand": products[c.item_id].brand,
             "category": products[c.item_id].category, "price": products[c.item_id].price,
             "rank": 1 + sum(s > c.score for s in scores), "source": c.source}
            for h, c in enumerate(module.candidates, start=1)
        ]
        modules.append({"type": module.spec.type, "title": module.spec.title, "theme": theme.title if theme else None,
                        "count": module.count(rules), "min_items": module.spec.min_items,
                        "max_items": module.spec.max_items, "candidates": candidates})
    return prompt.render(summary=history.summary, modules=modules, rules=rules.model_dump())


def draft_schema(rules: Rules, pools: Pools) -> dict:
    slots = []
    for module in pools.written():
        theme = pools.themes.get(module.spec.type)
        slots.append((len(module.candidates), module.count(rules), theme.title if theme else None))
    return draft_json_schema(slots, rules.title_min_chars, rules.title_max_chars)


def retry_messages(prompt: Prompt, rules: Rules, messages: list[dict[str, str]], text: str,
                   violations: list[Violation]) -> list[dict[str, str]]:
    """The first request, the model's draft, and what broke which rule."""
    return [*messages, {"role": "assistant", "content": text},
            *prompt.render(violations=[v.model_dump() for v in violations], rules=rules.model_dump())]


def parse_draft(text: str, pools: Pools) -> list[tuple[str, list[str]]]:
    """(title, item ids) per written module, in page order; ``UnusableDraft`` if it is not one."""
    try:
        draft = PageDraft.model_validate_json(text)
    except ValidationError as exc:
        raise UnusableDraft(f"the draft is not a valid page: {exc.errors()[0]['msg']}") from None
    written = pools.written()
    if len(draft.modules) != len(written):
        raise UnusableDraft(f"the draft has {len(draft.modules)} modules, the page {len(written)}")
    return [(module.title, [pool.candidates[h - 1].item_id for h in module.items if 1 <= h <= len(pool.candidates)])
            for module, pool in zip(draft.modules, written, strict=True)]


def handle_order(pools: Pools, rules: Rules, prior: float) -> HandleOrder:
    """How the model's handle scores order a module (the verbalizer): by the model's log-probability
    of each handle blended with the pool's retrieval order, ``log p(h) - prior * ln(h)``; ``prior``
    0 is the model's order alone, ``inf`` the pool's order. Each module gets its count of handles."""
    counts = [module.count(rules) for module in pools.written()]

    def order(index: int, scores: dict[int, float]) -> list[int]:
        if math.isinf(prior):
            return sorted(scores)[: counts[index]]
        return sorted(scores, key=lambda h: (prior * math.log(h) - scores[h], h))[: counts[index]]

    return order
