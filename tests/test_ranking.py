"""SASRec, the learned item-vector collection, the sasrec source, basket metrics and the ranking
evaluation on small real parts (a real chromadb in tmp_path, the packaged MiniLM, the sample data)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import catalog_at, sample_slice

from agent.settings import SAMPLE_DIR
from eval.metrics import basket_ndcg, basket_recall, mean_metrics
from retrieval import Event, Product, Retriever
from retrieval.retriever import CHROMA_DIR
from retrieval.sequential import MODEL_DIR, SASRecConfig, Trained, holdout_ndcg, publish, train_sasrec
from retrieval.split import leave_last_out
from retrieval.vectors import ITEM_VECTORS, LocalEmbeddings, VectorIndex, chroma_client

pytestmark = pytest.mark.one_engine

ITEMS = [f"p{i:02d}" for i in range(30)]
TINY = SASRecConfig(hidden=16, blocks=1, heads=1, max_len=8, dropout=0.0, lr=0.01, batch_size=16, seed=0, threads=1)


def _cycles(users: int = 120, length: int = 6) -> dict[str, list[str]]:
    """Every user walks the catalogue in order from a random start: the next item is p(i+1)."""
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(ITEMS), size=users)
    return {f"u{u}": [ITEMS[(s + j) % len(ITEMS)] for j in range(length)] for u, s in enumerate(starts)}


@pytest.fixture(scope="module")
def trained() -> Trained:
    return train_sasrec(_cycles(), ITEMS, TINY, epochs=30, progress=False)


def test_sasrec_learns_the_next_item(trained):
    sequences = _cycles()
    histories = [s[:-1] for s in sequences.values()]
    targets = [s[-1] for s in sequences.values()]
    # chance is ~1/25 for a hit in the top 10, NDCG far lower; the pattern is deterministic
    assert holdout_ndcg(trained, histories, targets) > 0.8
    assert trained.facts["epochs_run"] == 30 and trained.facts["log"][-1]["loss"] < trained.facts["log"][0]["loss"]


def test_two_steps_then_save_and_load_give_identical_scores(tmp_path):
    model = train_sasrec(_cycles(users=40), ITEMS, TINY, epochs=2, progress=False)
    model.save(tmp_path / "m")
    loaded = Trained.load(tmp_path / "m")
    histories = [["p01", "p02"], ["p07"], ["p29", "p00", "p01"]]
    assert loaded.item_ids == model.item_ids
    np.testing.assert_array_equal(loaded.encode(histories), model.encode(histories))
    np.testing.assert_array_equal(loaded.vectors(), model.vectors())
    assert json.loads((tmp_path / "m" / "config.json").read_text())["config"]["hidden"] == 16


def test_training_is_seeded():
    first = train_sasrec(_cycles(users=40), ITEMS, TINY, epochs=1, progress=False)
    second = train_sasrec(_cycles(users=40), ITEMS, TINY, epochs=1, progress=False)
    np.testing.assert_array_equal(first.vectors(), second.vectors())


def test_load_without_a_model_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="homepage train sasrec"):
        Trained.load(tmp_path)


@pytest.fixture(scope="module")
def sasrec_store(tmp_path_factory, trained):
    """A real store: catalogue, events, chromadb with the learned item vectors, the saved model."""
    store = tmp_path_factory.mktemp("sasrec-store")
    catalog = catalog_at(store)
    catalog.upsert_products([Product(i, f"Product {i}", ("Beauty", "Skin Care", "Face")) for i in ITEMS])
    catalog.add_events([Event(u, i, seq_pos=p) for u, items in _cycles().items() for p, i in enumerate(items)])
    index = VectorIndex(chroma_client(store / CHROMA_DIR), LocalEmbeddings())
    trained.save(store / MODEL_DIR)
    publish(trained, index)
    yield catalog, index
    catalog.close()


def test_item_vector_collection_is_queryable(sasrec_store, trained):
    _, index = sasrec_store
    query = trained.encode([["p03", "p04"]])[0]
    hits = index.search_vectors(ITEM_VECTORS, query, 5)
    exact = trained.vectors() @ query
    assert [h for h, _ in hits] == [ITEMS[i] for i in np.argsort(-exact)[:5]]
    assert hits[0][1] == pytest.approx(float(exact.max()), rel=1e-4)
    assert index.client.get_collection(ITEM_VECTORS).count() == len(ITEMS)


def test_sasrec_source_serves_from_the_store(sasrec_store):
    catalog, index = sasrec_store
    retriever = Retriever(catalog, index, {"sasrec": 1.0, "covisit": 1.0})
    history = retriever.history("u0")
    found = retriever.per_source(history, 5)["sasrec"]
    assert found and not {c.item_id for c in found} & set(history.item_ids)
    last = history.item_ids[-1]
    assert found[0].item_id == ITEMS[(ITEMS.index(last) + 1) % len(ITEMS)]
    assert found[0].provenance[0].source == "sasrec" and found[0].provenance[0].because in history.item_ids


def test_sasrec_candidates_are_the_exact_inner_product_order(sasrec_store, trained, monkeypatch):
    """Exact search over the learned vectors (the index's approximate one loses a best item now and
    then); past EXACT_SEARCH_MAX items the vector store answers, the same items on this small table."""
    import retrieval.sources as sources

    catalog, index = sasrec_store
    retriever = Retriever(catalog, index, {"sasrec": 1.0})
    table = trained.vectors()
    exact_orders = {}
    for user in ["u0", "u3", "u7"]:
        history = retriever.history(user)
        scores = table @ trained.encode([history.item_ids])[0]
        expected = [ITEMS[i] for i in np.argsort(-scores) if ITEMS[i] not in history.item_ids][:6]
        found = retriever.per_source(history, 6)["sasrec"]
        assert [c.item_id for c in found] == expected
        assert [c.score for c in found] == pytest.approx(sorted(scores[[ITEMS.index(i) for i in expected]])[::-1],
                                                         rel=1e-5)
        exact_orders[user] = expected
    monkeypatch.setattr(sources, "EXACT_SEARCH_MAX", 0)
    approximate = Retriever(catalog, index, {"sasrec": 1.0})
    assert {u: [c.item_id for c in approximate.per_source(approximate.history(u), 6)["sasrec"]]
            for u in exact_orders} == exact_orders


def test_basket_metrics_by_hand():
    ranked = ["a", "t1", "b", "t2"]
    assert basket_recall(ranked, {"t1", "t2"}, 2) == 0.5 and basket_recall(ranked, {"t1", "t2"}, 4) == 1.0
    ideal = 1 + 1 / math.log2(3)
    assert basket_ndcg(ranked, {"t1", "t2"}, 4) == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / ideal)
    # one item as a basket scores as the single-target metric does
    assert mean_metrics([(ranked, {"t2"})], ks=(4,)) == mean_metrics([(ranked, "t2")], ks=(4,))


def test_the_evaluation_store_holds_no_target(tmp_path):
    """Leakage end to end: the store built for each split, and the histories the retriever reads
    from it, hold exactly the training part; no held-out event is in them."""
    from eval.ranking import EvalStore, load_data

    products, events = load_data(SAMPLE_DIR, tmp_path / "quarantine")
    products = products[:300]  # a slice keeps the MiniLM embedding short
    known = {p.item_id for p in products}
    events = [e for e in events if e.item_id in known]
    embeddings = LocalEmbeddings()
    vectors = np.asarray(embeddings.embed_documents([p.text() for p in products]), dtype=np.float32)
    store = EvalStore(tmp_path / "store", products, vectors, embeddings)
    try:
        for part in ("valid", "test"):
            split = leave_last_out(events, part)
            model = train_sasrec(split.history, sorted(known), TINY, epochs=1, progress=False)
            store.load(split, model)
            assert set(store.catalog.all_events()) == set(split.train)
            retriever = store.retriever({"covisit": 1.0, "sasrec": 1.0}, {})
            held_out = set(events) - set(split.train)
            assert held_out  # the test could not fail without targets
            for user in split.targets:
                history = retriever.history(user)
                assert held_out.isdisjoint(history.events)
                assert history.item_ids == split.history[user]
    finally:
        store.close()


def test_sasrec_the_validation_reads_never_saw_a_validation_basket(tmp_path, monkeypatch):
    """Was: on basket data the early-stopping model dropped each user's last item, not the last
    basket, so the rest of the validation basket trained the model the fusion gate reads. Through the
    real path (``eval.ranking.sasrec_models`` -> ``fit``), what each training call saw is recorded."""
    import retrieval.sequential as sequential
    from eval.ranking import RankingConfig, sasrec_models

    events = []  # per user four baskets of two items (one time each): history, history, validation, test
    for u in range(40):
        for b in range(4):
            for j in range(2):
                events.append(Event(f"u{u}", ITEMS[(u + 2 * b + j) % len(ITEMS)], float(b), 2 * b + j, "purchase"))
    test, valid = leave_last_out(events, "test"), leave_last_out(events, "valid")
    seen = []
    real = sequential.train_sasrec

    def recording(sequences, *args, **kwargs):
        seen.append({u: list(s) for u, s in sequences.items()})
        return real(sequences, *args, **kwargs)

    monkeypatch.setattr(sequential, "train_sasrec", recording)
    config = RankingConfig(data=tmp_path, sasrec=SASRecConfig(hidden=8, blocks=1, heads=1, max_len=8, epochs=1,
                                                              threads=1), cache=None, progress=False)
    sasrec_models(test, valid, sorted(ITEMS), config)
    holdout = seen[0]  # the first training call is the model validation reads
    for u, basket in valid.targets.items():
        assert len(basket) == 2
        assert holdout[u] == valid.history[u] and len(holdout[u]) == 4  # two history baskets, nothing more
        assert test.history[u][-2:] == basket  # the validation basket is what the final model adds


@pytest.mark.slow
def test_ranking_run_on_the_sample_writes_the_report(tmp_path):
    from eval.ranking import RankingConfig, run

    config = RankingConfig(data=sample_slice(tmp_path / "data"), users=40, tune_users=40, out=tmp_path / "out",
                           cache=tmp_path / "cache",
                           sasrec=SASRecConfig(hidden=32, epochs=2, eval_every=1, threads=1), progress=False,
                           llm_users=3, llm_tune_users=3, llm_before_users=2)
    report = run(config)
    systems = {"popularity", "covisit", "semantic", "sasrec", "buy_again", "fused", "pools", "page", "page_discovery",
               "g_topfreq", "p_topfreq", "tifu_knn", "llm_page", "llm_page_before"}
    assert set(report["results"]) == systems
    saved = json.loads((tmp_path / "out" / "ranking.json").read_text())
    fused = saved["fused"]["all"]
    assert set(saved) == systems and 0.0 <= fused["ndcg@10"] <= fused["recall@10"] <= 1.0  # one item per basket
    assert fused["retrieval_recall@200"] >= fused["recall@50"]
    assert (tmp_path / "out" / "ranking.png").stat().st_size > 0
    text = (tmp_path / "out" / "ranking.md").read_text()
    assert "| pools |" in text and "| page |" in text and "LlamaRec (published)" not in text  # not Beauty's folder
    # seeded: a second run (the trained model and the product vectors from the cache) gives the same numbers
    assert run(config)["results"] == report["results"]
    meta = report["meta"]
    assert meta["users_evaluated"] == 40 and meta["llm"]["users"] == 3 and meta["llm"]["before"]["users"] == 2
    # the ranking-only path: one forward pass a page, no adapter named, none trained
    assert meta["llm"]["path"] == "ranking" and meta["llm"]["paths"] == {"ranking-only": 3}
    assert meta["llm"]["forward_passes_median"] == 1 and meta["llm"]["adapter_training"] is None
    # the earlier configuration reads the longer prompt and writes every handle itself
    assert meta["llm"]["before"]["prompt_tokens_median"] > meta["llm"]["prompt_tokens_median"]
    assert meta["llm"]["before"]["templates"]["compose"] != meta["llm"]["templates"]["compose"]
    # per-user metrics saved: the LLM page against the deterministic page, paired by hand on its 3 users
    per = json.loads((tmp_path / "out" / "per_user.json").read_text())
    llm, page = per["llm_page"]["all"]["ndcg@10"], per["page"]["all"]["ndcg@10"]
    assert len(llm) == 3 and len(page) == 40
    by_hand = sum(llm[u] - page[u] for u in llm) / 3
    row = next(r for r in meta["comparisons"] if (r["system"], r["versus"], r["subset"]) == ("llm_page", "page", "all"))
    assert row["ndcg@10"][0] == pytest.approx(by_hand)
    assert {(v["source"], v["variant"]) for v in meta["direction"]["variants"]} == {
        ("covisit", "symmetric (forward 1)"), ("covisit", "last two in random order"),
        ("sasrec", "last two in random order")}
    assert "## The LLM page" in text and "## Direction" in text
    # the page's layout chosen on validation, written as a skeleton a shop serves
    assert set(meta["layout_tried"]) == {"configured", "personal_full", "personal_twice", "fused",
                                         "fused, cards of 4", "fused, cards of 3", "fused, cards of 4 in order",
                                         "fused, cards of 3 in order"} | {
        f"{name}, buy_again {size}" for name in ("configured", "personal_full", "personal_twice") for size in (3, 8)}
    best = max(v["all"] for v in meta["layout_tried"].values())
    assert meta["layout_tried"][meta["layout"]]["all"] == best
    from agent.skeleton import Skeleton

    served = Skeleton.load(tmp_path / "out" / "skeleton.yaml")
    assert served.model_dump(mode="json", exclude_defaults=True) == meta["layout_skeleton"]
    assert "Page layout" in text


def test_li_et_al_split_users_72_8_20_and_never_show_a_target():
    from retrieval.split import user_split

    events = [Event(f"u{u:03d}", ITEMS[(u + b) % len(ITEMS)], float(b), b, "purchase")
              for u in range(200) for b in range(3)]  # every user: three baskets of one item
    test, valid = user_split(events, "test", seed=1), user_split(events, "valid", seed=1)
    assert test.protocol == valid.protocol == "li"
    assert (len(test.targets), len(valid.targets)) == (40, 16)  # 20 % and 8 % of 200 users
    assert not set(test.targets) & set(valid.targets)
    assert user_split(events, "test", seed=1).targets == test.targets  # seeded
    assert user_split(events, "test", seed=2).targets != test.targets
    held = {(e.user_id, e.item_id) for e in events if e.timestamp == 2.0}  # every user's last basket
    for split in (test, valid):
        trained = {(e.user_id, e.item_id) for e in split.train}
        for user, basket in split.targets.items():
            assert not {(user, i) for i in basket} & trained and split.history[user] == [e.item_id for e in events
                                                                                        if e.user_id == user][:2]
    # the validation split never shows a test user's last basket; the test split trains on validation ones
    assert not {(u, i) for (u, i) in held if u in test.targets} & {(e.user_id, e.item_id) for e in valid.train}
    assert {(u, i) for (u, i) in held if u in valid.targets} <= {(e.user_id, e.item_id) for e in test.train}
    # a training user's every basket trains
    trainer = next(u for u in test.history if u not in test.targets and u not in valid.targets)
    assert len(test.history[trainer]) == 3


@pytest.mark.slow
def test_segment_popularity_and_the_light_shoppers_table_with_a_users_file(tmp_path):
    from eval.ranking import RankingConfig, run
    from retrieval.split import baskets, leave_last_out

    data = sample_slice(tmp_path / "data")
    users = sorted({line.split(",")[0] for line in (data / "interactions.csv").read_text().splitlines()[1:]})
    (data / "users.csv").write_text("user_id,group\n" + "".join(f"{u},{'AB'[n % 2]}\n" for n, u in enumerate(users)))
    config = RankingConfig(data=data, users=60, tune_users=40, out=tmp_path / "out", cache=tmp_path / "cache",
                           sources=("popularity", "segment_popularity", "covisit"), progress=False, llm_users=0)
    report = run(config)
    assert {"popularity", "segment_popularity"} <= set(report["results"])
    light = report["meta"]["light_shoppers"]
    # by hand: the evaluated users whose test history holds one basket
    from eval.ranking import load_data

    _, events = load_data(data, tmp_path / "q")
    history: dict[str, list] = {}
    for e in leave_last_out(events, "test").train:
        history.setdefault(e.user_id, []).append(e)
    per = json.loads((tmp_path / "out" / "per_user.json").read_text())
    evaluated = per["popularity"]["all"]["ndcg@10"]
    expected = [u for u in evaluated if len(baskets(history[u])) <= 1]
    assert light["users"] == len(expected) > 0
    seg, pop = per["segment_popularity"]["all"]["ndcg@10"], per["popularity"]["all"]["ndcg@10"]
    by_hand = sum(seg[u] - pop[u] for u in expected) / len(expected)
    assert light["segment_vs_popularity"]["ndcg@10"][0] == pytest.approx(by_hand)
    assert "## Cold and light shoppers" in (tmp_path / "out" / "ranking.md").read_text()
    # without a users file the source has nothing to segment by and is left out
    (data / "users.csv").unlink()
    assert "segment_popularity" not in run(config)["results"]
