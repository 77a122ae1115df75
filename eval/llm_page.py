"""The LLM's page in the ranking suite: the verbalizer's blend chosen on validation users.

The composer orders each module by ``log p(handle) - prior * ln(position in the pool)``
(``agent.drafting.handle_order``). On validation users the model scores every module's handles
once (``record``: one generation each, the pool order written so every module reads the same
context); each ``prior`` of the grid then re-ranks those scores into a page (``page_for``: the
composer's own assembly and fix), so the whole grid costs one generation per user. ``inf`` is the
pool's order (the deterministic page's items): the model's order is kept only where it wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.assembly import assemble
from agent.drafting import handle_order
from agent.pools import Pools
from agent.repair import fix
from agent.rules import validate

PRIOR_GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, math.inf)


@dataclass
class Scored:
    """One validation user's pools and the model's log-probability of each handle, per module."""

    pools: Pools
    scores: list[dict[int, float]]


def record(composer, history) -> Scored:
    """The model's handle scores for each written module of this user's pools (``composer.retriever``
    already answers from this user's retrieved lists)."""
    pools = composer.pools(history)
    messages, schema = composer.messages(history, pools), composer.schema(pools)
    generation = composer.backend.generate(messages, schema, composer.max_new_tokens,
                                           order=handle_order(pools, composer.rules, math.inf))
    return Scored(pools, generation.handle_logprobs)


def page_for(composer, scored: Scored, prior: float) -> list[str]:
    """The page's items, top to bottom, when ``prior`` blends the recorded scores with pool order."""
    order = handle_order(scored.pools, composer.rules, prior)
    written = scored.pools.written()
    chosen = []
    for index, module in enumerate(written):
        scores = scored.scores[index] if index < len(scored.scores) else {}
        handles = order(index, scores) if scores else range(1, module.count(composer.rules) + 1)
        chosen.append((module.title, [module.candidates[h - 1].item_id for h in handles]))
    body = assemble(scored.pools, chosen)
    if validate(body, composer.ctx):
        body = fix(body, scored.pools, composer.ctx)
    return [i for m in body.modules for i in m.items]
