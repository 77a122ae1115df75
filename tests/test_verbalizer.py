"""The verbalizer: one forward pass scores every candidate handle of a module; the order blended from
those scores is written at once. Checked on the real model against its own greedy decoding."""

import math

import pytest

from agent.rules import Rules
from agent.skeleton import ModuleSpec
from agent.stages.draft import handle_order, parse_draft
from agent.stages.pools import ModulePool, Pools
from retrieval import Candidate

pytestmark = pytest.mark.one_engine


def _pools(counts: list[tuple[int, int]]) -> Pools:
    """Pools of ``n`` candidates, each module picking ``count`` (max_items)."""
    modules = [ModulePool(ModuleSpec(type=f"m{k}", source="popularity", title=f"Module {k}", min_items=2,
                                     max_items=count), f"Module {k}",
                          [Candidate(f"i{k}-{h}", 1.0, []) for h in range(1, n + 1)])
               for k, (n, count) in enumerate(counts)]
    return Pools(modules, [])


def test_handle_order_by_hand():
    rules = Rules()
    order = handle_order(_pools([(3, 2), (3, 3)]), rules, 0.0)
    scores = {1: -2.0, 2: -1.0, 3: -1.5}
    assert order(0, scores) == [2, 3]  # the model alone, its count of handles
    assert order(1, scores) == [2, 3, 1]
    # prior 1: 1*ln(h) - log p -> h1: 0 + 2 = 2, h2: 0.693 + 1 = 1.693, h3: 1.099 + 1.5 = 2.599
    assert handle_order(_pools([(3, 3)]), rules, 1.0)(0, scores) == [2, 1, 3]
    assert handle_order(_pools([(3, 3)]), rules, math.inf)(0, scores) == [1, 2, 3]  # the pool's order


@pytest.fixture(scope="module")
def request_of(composer, full_users):
    history = composer.retriever.history(full_users[0])
    pools = composer.pools(history)
    return pools, composer.messages(history, pools), composer.schema(pools)


def test_scores_are_the_models_own_greedy_choice(composer, request_of):
    pools, messages, schema = request_of
    backend = composer.backend
    free = backend.generate(messages, schema, 160)  # the model writes every handle itself
    ordered = backend.generate(messages, schema, 160, order=handle_order(pools, composer.rules, 0.0))
    scores = ordered.handle_logprobs
    assert len(scores) == len(pools.written())
    for module, module_scores in zip(pools.written(), scores, strict=True):
        assert sorted(module_scores) == list(range(1, len(module.candidates) + 1))  # every handle, nothing else
        assert sum(math.exp(v) for v in module_scores.values()) == pytest.approx(1.0, abs=1e-4)
    # the first module's first handle, written greedily, is the best-scored handle
    first_free = parse_draft(free.text, pools)[0][1][0]
    assert first_free == pools.written()[0].candidates[max(scores[0], key=scores[0].get) - 1].item_id
    # with prior 0 each module is its handles by score, best first
    for (_, items), module, module_scores in zip(parse_draft(ordered.text, pools), pools.written(), scores,
                                                 strict=True):
        best = sorted(module_scores, key=lambda h: -module_scores[h])[: module.count(composer.rules)]
        assert items == [module.candidates[h - 1].item_id for h in best]
    assert ordered.forward_passes < free.forward_passes  # no step per item


def test_the_order_given_is_written_and_batches_agree(composer, request_of):
    pools, messages, schema = request_of
    backend = composer.backend

    def reversed_pool(index, scores):
        return sorted(scores, reverse=True)[: pools.written()[index].count(composer.rules)]

    single = backend.generate(messages, schema, 160, order=reversed_pool)
    for (_, items), module in zip(parse_draft(single.text, pools), pools.written(), strict=True):
        n = len(module.candidates)
        assert items == [module.candidates[h - 1].item_id for h in range(n, n - module.count(composer.rules), -1)]
    # batched rows are padded, so a title may round differently; the order written is the same
    batch = backend.generate_batch([(messages, schema)] * 2, 160, orders=[reversed_pool] * 2)
    for generation in batch:
        assert [items for _, items in parse_draft(generation.text, pools)] == [
            items for _, items in parse_draft(single.text, pools)]


def test_an_infinite_prior_gives_the_pool_order(settings, composer, full_users):
    from agent.service import composer_for

    pool_first = composer_for(settings, composer.retriever, composer.backend, handle_prior=math.inf)
    for user in full_users[:2]:
        page = pool_first.compose(user, use_cache=False)
        assert page.meta.path in ("llm", "repaired") and page.meta.llm_calls >= 1
        assert page.item_ids() == pool_first.compose(user, use_llm=False, use_cache=False).item_ids()


def test_ranking_only_scores_match_the_decode_loops(composer, request_of, full_users):
    """eval.llm_page.draft_scores (one forward pass over a whole draft) reads the same handle
    scores as the decode loop did while writing that very draft."""
    from eval.llm_page import draft_scores, page_for, score

    pools, messages, schema = request_of
    backend = composer.backend
    written = backend.generate(messages, schema, 160, order=handle_order(pools, composer.rules, math.inf))
    again = draft_scores(backend, backend.prompt_ids(messages), written.text, [len(m.candidates) for m in
                                                                               pools.written()])
    assert len(again) == len(written.handle_logprobs) == len(pools.written())
    for mine, loops in zip(again, written.handle_logprobs, strict=True):
        assert sorted(mine) == sorted(loops)
        for h in mine:
            assert mine[h] == pytest.approx(loops[h], abs=2e-3)
    # the ranking-only page: the pool order at prior inf (the deterministic page), the scores' at 0
    history = composer.retriever.history(full_users[0])
    scored = score(composer, history)
    assert page_for(composer, scored, math.inf) == composer.compose(history.user_id, use_llm=False,
                                                                    use_cache=False).item_ids()
    best = max(scored.scores[0], key=scored.scores[0].get)
    assert page_for(composer, scored, 0.0)[0] == scored.pools.written()[0].candidates[best - 1].item_id
