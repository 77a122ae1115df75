"""Next-basket evaluation: repeat and explore metrics, paired intervals, the baselines, the fusion
gate, and a whole run on basket data whose columns are named as the shop names them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.baselines import rank_baselines, tifu_vector
from eval.metrics import paired_interval, per_user, subset_targets
from eval.ranking import RankingConfig, _fused, choose_fusion, run
from retrieval.columns import CatalogueColumns, EventColumns
from retrieval.records import Candidate, Event
from retrieval.sources import fuse
from retrieval.split import Split

pytestmark = pytest.mark.one_engine

DAY = 86_400.0


def test_repeat_and_explore_metrics_by_hand():
    ranked = {"u": ["a", "b", "c", "d"], "new": ["x"]}
    targets = {"u": ["b", "x", "d"], "new": ["x"]}
    history = {"u": ["b", "q"], "new": ["q"]}
    assert subset_targets(targets["u"], history["u"], "repeat") == ["b"]
    assert subset_targets(targets["u"], history["u"], "explore") == ["x", "d"]
    every = per_user(ranked, targets, history, "all", (2, 4))
    assert every["recall@2"]["u"] == pytest.approx(1 / 3)  # b of {b, x, d}
    repeat = per_user(ranked, targets, history, "repeat", (4,))
    assert set(repeat["ndcg@4"]) == {"u"}  # a user with no repeat item does not count
    assert repeat["ndcg@4"]["u"] == pytest.approx(1 / math.log2(3))  # b at rank 2, ideal 1
    explore = per_user(ranked, targets, history, "explore", (4,))
    assert explore["ndcg@4"]["u"] == pytest.approx((1 / math.log2(5)) / (1 + 1 / math.log2(3)))  # d at 4 of 2
    assert explore["ndcg@4"]["new"] == 1.0


def test_a_basket_larger_than_k_by_hand():
    """Three of a basket of five in the top 4: ours divides by the ideal of 4 hits, Li et al. by the
    ideal of all 5 (such a basket never scores 1 at K = 4)."""
    from eval.metrics import basket_ndcg

    ranked = ["t1", "a", "t2", "t3"]
    basket = ["t1", "t2", "t3", "t4", "t5"]
    dcg = 1 + 1 / math.log2(4) + 1 / math.log2(5)
    four = 1 + 1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)
    assert basket_ndcg(ranked, basket, 4) == pytest.approx(dcg / four)
    assert basket_ndcg(ranked, basket, 4, full_ideal=True) == pytest.approx(dcg / (four + 1 / math.log2(6)))
    perfect = ["t1", "t2", "t3", "t4"]
    assert basket_ndcg(perfect, basket, 4) == 1.0 and basket_ndcg(perfect, basket, 4, full_ideal=True) < 1.0


def test_paired_interval():
    users = [f"u{n}" for n in range(50)]
    assert paired_interval(dict.fromkeys(users, 1.0), dict.fromkeys(users, 0.0)) == (1.0, 1.0, 1.0)
    a = {u: float(n % 2) for n, u in enumerate(users)}  # half better by one, half worse by one
    b = {u: float(1 - n % 2) for n, u in enumerate(users)}
    mean, low, high = paired_interval(a, b)
    assert mean == 0.0 and low < 0.0 < high


def _basket(user: str, day: int, items: str) -> list[Event]:
    return [Event(user, item, day * DAY, None, "purchase") for item in items]


def test_topfreq_baselines_by_hand():
    # baskets holding each item: A 2, B 3, C 1, D 1
    train = [*_basket("u1", 1, "AB"), *_basket("u1", 2, "AC"), *_basket("u2", 1, "B"), *_basket("u2", 2, "BD")]
    ranked = rank_baselines(train, ["u1", "u2", "stranger"], k=4, neighbours=1)
    assert ranked["g_topfreq"]["u1"] == ["B", "A", "C", "D"]
    assert ranked["p_topfreq"]["u1"] == ["A", "B", "C", "D"]  # A twice; B before C, being more popular
    assert ranked["p_topfreq"]["u2"] == ["B", "D", "A", "C"]
    assert ranked["p_topfreq"]["stranger"] == ranked["tifu_knn"]["stranger"] == ["B", "A", "C", "D"]


def test_published_p_topfreq_keeps_first_bought_order_and_adds_nothing():
    # u1 bought C, then B, then A and C: C twice; B and A once each, B first (A is the more popular)
    train = [*_basket("u1", 1, "C"), *_basket("u1", 2, "B"), *_basket("u1", 3, "AC"), *_basket("u2", 1, "A"),
             *_basket("u2", 2, "AD")]
    ours = rank_baselines(train, ["u1"], k=4, neighbours=1)["p_topfreq"]["u1"]
    published = rank_baselines(train, ["u1"], k=4, neighbours=1, published=True)["p_topfreq"]["u1"]
    assert ours == ["C", "A", "B", "D"]  # ties by popularity, then best-sellers
    assert published == ["C", "B", "A"]  # ties in first-bought order, nothing added


def test_tifu_vector_by_hand():
    # groups of 2 from the newest: [[a]] and [[b], [a]]; the older group weighs 0.7 / 2, the newer 1 / 2;
    # inside the newer, b (older) weighs 0.9 / 2 and a 1 / 2
    vector = tifu_vector([["a"], ["b"], ["a"]], group=2, within=0.9, between=0.7)
    assert vector["a"] == pytest.approx(0.35 + 0.25) and vector["b"] == pytest.approx(0.5 * 0.45)


def test_a_source_enters_the_fusion_only_where_it_wins():
    users = [f"u{n:03d}" for n in range(400)]
    targets = {u: [f"t{u}"] for u in users}
    fillers = [f"f{n}" for n in range(10)]

    def listed(items):
        return list(items)

    # "good" finds three users in four; "copy" is the same list; "helper" knows only the fourth user
    good = {u: listed([f"t{u}", *fillers] if n % 4 else fillers) for n, u in enumerate(users)}
    helper = {u: listed([] if n % 4 else [f"t{u}"]) for n, u in enumerate(users)}
    split = Split("valid", [], targets, {u: [] for u in users})
    mixes = choose_fusion({"good": good, "copy": dict(good), "helper": helper}, users, split, 500, 0)
    assert mixes[0].added in {"good", "copy"} and mixes[0].entered
    entered = {m.added: m.entered for m in mixes[1:]}
    assert entered == {"copy" if mixes[0].added == "good" else "good": False, "helper": True}
    helped = next(m for m in mixes if m.added == "helper")
    assert helped.val_ndcg10 == 1.0 and helped.gain[1] > 0


def test_the_fusion_gate_splits_users_at_random():
    """Was: the halves were the sorted ids' first and second half. Source "early" finds the target of
    each user before u200, "late" of each user after: split in id order, the first source is chosen
    on early users and judged on late ones (0.0); split at random, each half holds both (about 0.5)."""
    users = [f"u{n:03d}" for n in range(400)]
    split = Split("valid", [], {u: [f"t{u}"] for u in users}, {u: [] for u in users})
    early = {u: [f"t{u}"] if n < 200 else [] for n, u in enumerate(users)}
    late = {u: [] if n < 200 else [f"t{u}"] for n, u in enumerate(users)}
    mixes = choose_fusion({"early": early, "late": late}, users, split, 200, 0)
    assert 0.35 < mixes[0].val_ndcg10 < 0.65
    assert mixes[1].entered and mixes[1].val_ndcg10 == 1.0


def test_the_evaluation_fuses_ids_as_the_retriever_fuses_candidates():
    rng = np.random.default_rng(1)
    catalogue = [f"i{n}" for n in range(30)]
    lists = {name: list(rng.choice(catalogue, 12, replace=False)) for name in ("a", "b", "c")}
    weights = {"a": 1.0, "b": 0.5, "c": 2.0}
    as_candidates = {n: [Candidate(i, 0.0) for i in found] for n, found in lists.items()}
    for rrf_k in (10, 60):
        expected = [c.item_id for c in fuse(as_candidates, weights, 15, rrf_k)]
        assert _fused(lists, weights, rrf_k, 15) == expected


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """40 shoppers, each with a staple bought in every basket and two other items per basket; the
    last basket again holds the staple and one item new to the shopper. Columns named as the shop
    names them."""
    folder = tmp_path_factory.mktemp("shop")
    rng = np.random.default_rng(0)
    staples = [f"s{n}" for n in range(5)]
    others = [f"o{n:02d}" for n in range(40)]
    (folder / "items.csv").write_text("sku,name,aisle\n" + "".join(
        f"{i},Item {i},Grocery > Aisle {n % 6}\n" for n, i in enumerate(staples + others)))
    rows = []
    for u in range(40):
        mine = list(rng.choice(others, 9, replace=False))
        for b in range(5):
            day = 1 + u % 7 + 7 * b
            for item in [staples[u % 5], *(mine[2 * b:2 * b + 2] if b < 4 else [mine[8]])]:
                rows.append(f"c{u},{item},2001-01-{day:02d}\n")
    (folder / "interactions.csv").write_text("customer,sku,bought_on\n" + "".join(rows))
    return folder


@pytest.mark.slow
def test_a_run_on_basket_data_with_mapped_columns(shop, tmp_path):
    config = RankingConfig(
        data=shop, out=tmp_path / "out", cache=None, tune_users=40, progress=False, bootstrap=200, llm_users=0,
        sources=("popularity", "covisit", "buy_again"),
        catalogue_columns=CatalogueColumns(item_id="sku", title="name", category="aisle"),
        event_columns=EventColumns(user_id="customer", item_id="sku", timestamp="bought_on"))
    report = run(config)
    results, meta = report["results"], report["meta"]
    assert meta["users_evaluated"] == 40
    # the staple is each basket's one repeat item: the shopper's own items find it first
    assert results["buy_again"]["repeat"]["ndcg@10"] == 1.0 and results["p_topfreq"]["repeat"]["recall@10"] == 1.0
    assert results["buy_again"]["explore"]["recall@50"] == 0.0  # it proposes nothing new
    assert results["covisit"]["repeat"].get("recall@50", 0.0) == 0.0  # discovery leaves owned items out
    assert results["page"]["repeat"]["ndcg@10"] == 1.0  # the buy-again module comes first
    assert {r["versus"] for r in meta["comparisons"]} >= {"g_topfreq", "p_topfreq", "tifu_knn", "covisit"}
    assert meta["transfer"][0]["entered"] and "test_ndcg10" in meta["transfer"][0]
    text = (tmp_path / "out" / "ranking.md").read_text()
    assert "## Repeat items" in text and "## Explore items" in text and "(published)" not in text
