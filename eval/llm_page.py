"""The LLM's page in the ranking suite: the verbalizer's blend chosen on validation users.

The composer orders each module by ``log p(handle) - prior * ln(position in the pool)``
(``agent.stages.draft.handle_order``). On validation users the model scores every module's handles
once (``record``: one generation each, the pool order written so every module reads the same
context); each ``prior`` of the grid then re-ranks those scores into a page (``page_for``: the
composer's own assembly and fix), so the whole grid costs one generation per user. ``inf`` is the
pool's order (the deterministic page's items): the model's order is kept only where it wins.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from agent.rules import validate
from agent.schema import DraftModule, PageDraft
from agent.stages.assemble import assemble
from agent.stages.draft import handle_order
from agent.stages.fix import fix
from agent.stages.pools import Pools

PRIOR_GRID = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, math.inf)


@dataclass
class Scored:
    """One validation user's pools and the model's log-probability of each handle, per module."""

    pools: Pools
    scores: list[dict[int, float]]
    costs: dict = field(default_factory=dict)  # seconds and prompt tokens of the scoring pass


def record(composer, history) -> Scored:
    """The model's handle scores for each written module of this user's pools (``composer.retriever``
    already answers from this user's retrieved lists)."""
    pools = composer.pools(history)
    messages, schema = composer.messages(history, pools), composer.schema(pools)
    generation = composer.backend.generate(messages, schema, composer.max_new_tokens,
                                           order=handle_order(pools, composer.rules, math.inf))
    return Scored(pools, generation.handle_logprobs)


ARRAY_OPEN = '"items":['


def score(composer, history) -> Scored:
    """The ranking-only path: every written module's handle scores from ONE forward pass, no
    generation. The model reads the prompt and a draft of each module's configured title and its
    handles in pool order (as ``record`` has the order written); the titles are the configured ones
    rather than the model's own (the copy path is measured separately), so a page costs its prefill
    alone (~1 s on this CPU instead of ~2.5 s)."""
    started = time.perf_counter()
    rules = composer.rules
    pools = composer.pools(history)
    written = pools.written()
    draft = PageDraft(modules=[DraftModule(title=m.title, items=list(range(1, m.count(rules) + 1)))
                               for m in written])
    prompt = composer.backend.prompt_ids(composer.messages(history, pools))
    scores = draft_scores(composer.backend, prompt, draft.model_dump_json(), [len(m.candidates) for m in written])
    return Scored(pools, scores, {"seconds": time.perf_counter() - started, "prompt_tokens": len(prompt)})


def draft_scores(backend, prompt: list[int], text: str, sizes: list[int]) -> list[dict[int, float]]:
    """Per item array of the draft ``text`` read after ``prompt``, the log-probability of each
    handle 1..size as its first value, normalised over those handles (the tokens the grammar allows
    there), from one forward pass of the transformers backend's model."""
    import torch

    tokenizer = backend.tokenizer
    answer = tokenizer.encode(text, add_special_tokens=False)
    # indices of the answer tokens that are an array's first value (as fine-tuning's labels find them)
    opened = [i for i in range(1, len(answer)) if tokenizer.decode(answer[:i]).endswith(ARRAY_OPEN)]
    if len(opened) != len(sizes):
        raise ValueError(f"found {len(opened)} item arrays in the draft, expected {len(sizes)}")
    keep = len(answer) + 1  # logits of the draft's positions only: the vocabulary projection is not free
    with backend._lock, torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor([prompt + answer]), logits_to_keep=keep).logits[0]
    scores = []
    for i, size in zip(opened, sizes, strict=True):
        handles = list(range(1, size + 1))
        tokens = torch.tensor([backend._single[str(h)] for h in handles])
        # the kept rows start at the prompt's last position: row i predicts answer[i]
        logp = torch.log_softmax(logits[i, tokens].float(), -1)
        scores.append({h: float(v) for h, v in zip(handles, logp, strict=True)})
    return scores


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
