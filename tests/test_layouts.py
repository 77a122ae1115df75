"""The page layouts ``eval ranking`` tries on validation (``eval.ranking.layouts``): the grid, and
the ``fused`` layout whose deterministic page shows the fused list in its own order."""

from __future__ import annotations

import itertools

import pytest

from agent.rules import check_skeleton
from agent.skeleton import PERSONAL, Skeleton
from agent.stages.pools import POOL_DEPTH
from eval.ranking import layouts
from prompts import PROMPTS_DIR as PROMPTS

pytestmark = pytest.mark.one_engine


def test_the_layout_grid_of_the_shipped_skeleton(composer):
    skeleton = Skeleton.load(PROMPTS / "skeleton.yaml")  # buy_again 6, for_you 6, bought_together, trending
    found = layouts(skeleton, composer.rules)  # the rules' cap: 8 a module
    assert set(found) == {"configured", "personal_full", "personal_twice",
                          "configured, buy_again 3", "personal_full, buy_again 3", "personal_twice, buy_again 3",
                          "configured, buy_again 8", "personal_full, buy_again 8", "personal_twice, buy_again 8",
                          "fused", "fused, cards of 4", "fused, cards of 3",
                          "fused, cards of 4 in order", "fused, cards of 3 in order"}
    sizes = {m.type: m.max_items for m in found["personal_twice, buy_again 8"].modules}
    assert sizes == {"buy_again": 8, "for_you": 8, "more_for_you": 8, "bought_together": 4, "trending": 4}
    fused = found["fused"].modules
    assert [m.type for m in fused] == ["for_you", "more_for_you", "bought_together", "trending"]
    assert [(m.source, m.show_owned, m.pool_size, m.max_items) for m in fused[:2]] == [(PERSONAL, True, 8, 8)] * 2
    cards = found["fused, cards of 4"].modules  # the same 16 personal items, four to a card
    assert [m.type for m in cards] == ["for_you", "more_for_you", "more_for_you_2", "more_for_you_3",
                                       "bought_together", "trending"]
    assert [(m.source, m.show_owned, m.pool_size, m.max_items) for m in cards[:4]] == [(PERSONAL, True, 4, 4)] * 4
    threes = found["fused, cards of 3"].modules  # 15 of them, three to a card
    assert [(m.type, m.pool_size, m.max_items) for m in threes[:5]] == [
        ("for_you", 3, 3), ("more_for_you", 3, 3), ("more_for_you_2", 3, 3), ("more_for_you_3", 3, 3),
        ("more_for_you_4", 3, 3)]
    assert [m.type for m in threes[5:]] == ["bought_together", "trending"]
    for size in (4, 3):  # the same cards, closing before an item the brand quota refuses
        kept, skipping = found[f"fused, cards of {size} in order"].modules, found[f"fused, cards of {size}"].modules
        assert [m.keep_order for m in kept] == [m.type.startswith(("for_you", "more_for_you")) for m in kept]
        assert [m.min_items for m in kept[:2]] == [2, 2]  # the rules' least module: a card may close at 2
        unkept = [m.model_copy(update={"keep_order": False, "min_items": n.min_items})
                  for m, n in zip(kept, skipping, strict=True)]
        assert unkept == skipping
    # every layout is a skeleton a shop can serve: valid, and refused by none of the rules' checks
    for skeleton in found.values():
        Skeleton.model_validate(skeleton.model_dump())
        check_skeleton(composer.rules, skeleton, composer.retriever.products)


@pytest.mark.parametrize(("layout", "personal"), [("fused", 2), ("fused, cards of 4", 4),
                                                         ("fused, cards of 3", 5)])
def test_the_fused_layouts_show_the_fused_list_in_its_order(composer, sample_users, layout, personal):
    laid_out = composer.using(skeleton=layouts(composer.skeleton, composer.rules)[layout])
    checked = 0
    for user in sample_users[:12]:
        history = composer.retriever.history(user)
        if history.is_cold:
            continue
        fused = [c.item_id for c in composer.retriever.candidates(history, POOL_DEPTH)]
        page = laid_out.compose(user, use_llm=False, use_cache=False)
        products = composer.retriever.products
        shown: set[str] = set()
        modules = [[x.item_id for x in m.items] for m in page.modules[:personal]]
        assert len(modules) == personal
        for n, items in enumerate(modules):
            # each personal module: the fused list's next items in its order, none skipped but for
            # the brand quota (2 a module: a skipped item waits for the next module, unless that
            # one holds 2 of its brand too)
            at = [fused.index(i) for i in items]
            assert at == sorted(at), (user, n, at)
            skipped = [fused[k] for k in range(at[-1]) if fused[k] not in shown and k not in at]
            brands = [products[i].brand for i in items]
            assert all(brands.count(products[i].brand) >= 2 for i in skipped), (user, n, skipped)
            if n + 1 < personal:
                after = [products[i].brand for i in modules[n + 1]]
                assert all(i in modules[n + 1] or after.count(products[i].brand) >= 2 for i in skipped), (user, n)
            shown.update(items)
        assert page.modules[0].items[0].item_id == fused[0]
        checked += 1
    assert checked >= 8


def test_product_vectors_are_cached_whole(tmp_path):
    """Embedded once, read back from the cache; the file is written under another name and renamed,
    so no partial file is left beside it."""
    from eval.ranking import product_vectors
    from retrieval.records import Product

    class Counting:
        model_spec, calls = "counting", 0

        def embed_documents(self, texts):
            Counting.calls += 1
            return [[float(len(t)), 1.0] for t in texts]

    products = [Product(item_id=str(i), title="x" * (i + 1)) for i in range(3)]
    first = product_vectors(products, Counting(), tmp_path, progress=False)
    again = product_vectors(products, Counting(), tmp_path, progress=False)
    assert first.tolist() == again.tolist() and Counting.calls == 1
    assert [p.suffix for p in tmp_path.iterdir()] == [".npy"]  # no partial file left behind
    assert first[:, 0].tolist() == [len(p.text()) for p in products]


def test_a_skeleton_without_a_personal_module_still_tries_buy_again_sizes(composer):
    skeleton = Skeleton.load(PROMPTS / "skeleton.yaml")
    without = skeleton.model_copy(update={"modules": [m for m in skeleton.modules if m.source != PERSONAL]})
    found = layouts(without, composer.rules)
    assert set(found) == {"configured", "configured, buy_again 3", "configured, buy_again 8"}
    assert [m.max_items for m in found["configured, buy_again 3"].modules if m.type == "buy_again"] == [3]


def test_cards_in_order_show_the_fused_list_unchanged(composer, sample_users):
    """Read card after card, the page is the fused list itself: a card the brand quota would break
    closes early (never below its minimum of 2) and the refused item opens the next card."""
    products, checked, short = composer.retriever.products, 0, 0
    for layout, personal in [("fused, cards of 4 in order", 4), ("fused, cards of 3 in order", 5)]:
        laid_out = composer.using(skeleton=layouts(composer.skeleton, composer.rules)[layout])
        size = laid_out.skeleton.modules[0].max_items
        for user in sample_users:
            history = composer.retriever.history(user)
            if history.is_cold:
                continue
            fused = [c.item_id for c in composer.retriever.candidates(history, POOL_DEPTH)]
            page = laid_out.compose(user, use_llm=False, use_cache=False)
            cards = [[x.item_id for x in m.items] for m in page.modules[:personal]]
            read = [i for card in cards for i in card]
            assert read == fused[:len(read)], (layout, user)
            for card, after in itertools.pairwise(cards):
                assert 2 <= len(card) <= size
                if len(card) < size:  # closed early: the next item is a third of a brand the card holds twice
                    brand = products[after[0]].brand_key
                    assert [products[i].brand_key for i in card].count(brand) == 2, (user, card, after)
                    short += 1
            checked += 1
    assert checked >= 16 and short >= 1  # the sample has cards the quota closes early

