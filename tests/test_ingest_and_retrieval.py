import copy
from pathlib import Path

from conftest import catalog_at

from agent.settings import SAMPLE_DIR
from retrieval import Event, RetrievalConfig, Retriever, ingest
from retrieval.history import build_history
from retrieval.records import Candidate, Product, Provenance
from retrieval.sources import fuse
from retrieval.vectors import BEHAVIOUR, PRODUCTS, VectorIndex, chroma_client


def test_sample_ingest_counts(ingested):
    # two sample products have no title in either column: quarantined, and so are their events
    assert (ingested.catalogue.read, ingested.catalogue.loaded, ingested.catalogue.quarantined) == (2067, 2065, 2)
    assert (ingested.events.read, ingested.events.loaded, ingested.events.quarantined) == (2626, 2624, 2)
    assert ingested.new_events == 2624
    assert ingested.embedded_products == 2065


def test_reingest_is_idempotent_and_events_survive_a_restart(tmp_path: Path):
    config = RetrievalConfig(store_dir=tmp_path / "store")
    items, events = tmp_path / "items.csv", tmp_path / "events.csv"
    # a slice of the sample: small, and every event without a timestamp (NULLs must still dedupe)
    items.write_text("".join((SAMPLE_DIR / "items.csv").read_text().splitlines(keepends=True)[:60]))
    known = {line.split(",")[0] for line in items.read_text().splitlines()[1:]}
    lines = (SAMPLE_DIR / "interactions.csv").read_text().splitlines(keepends=True)
    events.write_text(lines[0] + "".join(line for line in lines[1:] if line.split(",")[1] in known))

    first = ingest(config, items, events, progress=False)
    second = ingest(config, items, events, progress=False)
    assert first.new_events == first.events.loaded > 0
    assert second.new_events == 0
    assert second.embedded_products == 0 and second.embedded_users == 0

    reopened = Retriever.open(config)  # a new process would do the same
    assert reopened.catalog.event_count() == first.events.loaded
    assert reopened.index.count(PRODUCTS) == first.catalogue.loaded
    assert reopened.index.count(BEHAVIOUR) == len(reopened.catalog.users())

    # a changed title is re-embedded, nothing else
    header, first_row, *rest = items.read_text().splitlines(keepends=True)
    title = first_row.split(",")[1]
    items.write_text(header + first_row.replace(title, title + " NEW EDITION", 1) + "".join(rest))
    third = ingest(config, items, events, progress=False)
    assert third.embedded_products == 1 and third.new_events == 0


def _product(i: str, brand: str = "B", category: str = "Face", price: float | None = 10.0) -> Product:
    return Product(i, f"Product {i}", ("Beauty", "Skin Care", category), brand, price)


def test_history_summary_is_pii_free_and_describes_the_items():
    products = {p.item_id: p for p in [_product("a", "Olay", "Face", 5), _product("b", "Olay", "Eyes", 15),
                                       _product("c", "Dove", "Face", 30)]}
    events = [Event("secret-user-42", i, seq_pos=n) for n, i in enumerate(["a", "b", "c"])]
    history = build_history("secret-user-42", events, products)
    assert "secret-user-42" not in history.summary
    assert "Top departments: Skin Care (3)" in history.summary
    assert "Favourite brands: Olay (2), Dove (1)" in history.summary
    assert "Price band: $5-$30, median $15" in history.summary
    assert "Most recent: Product c; Product b; Product a." in history.summary
    assert [p.item_id for p in history.recent(2)] == ["c", "b"]
    assert build_history("x", [], products).is_cold


def test_covisit_scores_by_hand(tmp_path: Path):
    catalog = catalog_at(tmp_path)
    catalog.upsert_products([_product(i, brand=i) for i in "abcdx"])
    # u1: a b c ; u2: a c ; u3: d a
    catalog.add_events([Event(u, i, seq_pos=n) for u, seq in [("u1", "abc"), ("u2", "ac"), ("u3", "da")]
                        for n, i in enumerate(seq)])
    from retrieval.sources import CoVisit, SourceContext

    source = CoVisit(SourceContext(catalog, index=None))
    # links of a: b 1 (u1, d=1), c 1/2 (u1, d=2) + 1 (u2) = 1.5, d 1 (u3)
    assert dict(source.links["a"]) == {"b": 1.0, "c": 1.5, "d": 1.0}
    history = build_history("new", [Event("new", "a", seq_pos=0)], catalog.products)
    ranked = source.candidates(history, 10)
    assert [(c.item_id, c.score) for c in ranked] == [("c", 1.5), ("b", 1.0), ("d", 1.0)]
    assert all(c.provenance[0].because == "a" for c in ranked)  # the evidence a reason cites


def test_covisit_options_by_hand(tmp_path: Path):
    """window 3, forward 2, pop_alpha 1 over u1: a b c, u2: a c, u3: d a (items bought a 3, b 1, c 2, d 1)."""
    catalog = catalog_at(tmp_path)
    catalog.upsert_products([_product(i, brand=i) for i in "abcdx"])
    catalog.add_events([Event(u, i, seq_pos=n) for u, seq in [("u1", "abc"), ("u2", "ac"), ("u3", "da")]
                        for n, i in enumerate(seq)])
    from retrieval.sources import CoVisit, SourceContext

    options = {"covisit": {"window": 3, "forward": 2.0, "pop_alpha": 1.0}}
    shared: dict = {}
    source = CoVisit(SourceContext(catalog, None, options=options, shared=shared))
    # a -> b: after a once at d=1, 2 x 1 / 1 buy of b; a -> c: 2 x 1/2 (u1) + 2 x 1 (u2) = 3 / 2 buys of c;
    # a -> d: d came before a, 1 / 1
    assert dict(source.links["a"]) == {"b": 2.0, "c": 1.5, "d": 1.0}
    # c -> a: a came before c, 1/2 + 1 = 1.5 / 3 buys of a; c -> b: 1 / 1
    assert dict(source.links["c"]) == {"a": 0.5, "b": 1.0}
    catalog.add_events([Event("u4", "a", seq_pos=0), Event("u4", "x", seq_pos=1)])
    # serving reads the store afresh; a shared context (evaluation's, on a store that does not change) does not
    assert "x" in CoVisit(SourceContext(catalog, None, options=options)).links["a"]
    assert "x" not in CoVisit(SourceContext(catalog, None, options=options, shared=shared)).links["a"]


def test_covisit_on_a_store_without_pairs(tmp_path: Path):
    """Was: a store whose users have one event each crashed the build (an int array divided by popularity)."""
    catalog = catalog_at(tmp_path)
    catalog.upsert_products([_product(i, brand=i) for i in "ab"])
    catalog.add_events([Event("u1", "a", seq_pos=0), Event("u2", "b", seq_pos=0)])
    from retrieval.sources import CoVisit, SourceContext

    source = CoVisit(SourceContext(catalog, None, options={"covisit": {"pop_alpha": 0.25}}))
    assert source.links == {} and source.candidates(build_history("u1", [], catalog.products), 5) == []


def test_fusion_is_weighted_reciprocal_rank_by_hand():
    def cands(source, ids):
        return [Candidate(i, 1.0, [Provenance(source, 1.0, r)]) for r, i in enumerate(ids)]

    fused = fuse({"x": cands("x", ["a", "b"]), "y": cands("y", ["b", "c"])}, {"x": 1.0, "y": 0.5}, k=3, rrf_k=60)
    scores = {c.item_id: c.score for c in fused}
    assert scores["b"] == 1 / 62 + 0.5 / 61
    assert scores["a"] == 1 / 61 and scores["c"] == 0.5 / 62
    assert [c.item_id for c in fused] == ["b", "a", "c"]
    assert [p.source for p in fused[0].provenance] == ["x", "y"]


def test_the_fused_top_counts_items_deeper_in_each_list_than_it_shows(retriever):
    """Was: each list was cut at k before fusing, so the page's top few differed from the evaluation's
    fused list. By hand (rrf_k 10, weights 1): a and c score 1/11 = 0.0909 each, b twice 1/12 =
    0.1667: b leads the top 1, though it is second in both lists."""
    def cands(ids):
        return [Candidate(i, 1.0, []) for i in ids]

    mine = copy.copy(retriever)
    mine.weights, mine.rrf_k = {"x": 1.0, "y": 1.0}, 10
    top = mine.fused(build_history("u", [], retriever.products), {"x": cands(["a", "b"]), "y": cands(["c", "b"])}, 1)
    assert [(c.item_id, round(c.score, 4)) for c in top] == [("b", 0.1667)]


def test_candidates_have_provenance_and_exclude_history(retriever, sample_users):
    user = sample_users[0]
    history = retriever.history(user)
    candidates = retriever.candidates(history, 30)
    assert len(candidates) == 30
    assert not {c.item_id for c in candidates} & set(history.item_ids)
    assert all(c.provenance and c.item_id in retriever.products for c in candidates)
    assert "semantic" in {p.source for c in candidates for p in c.provenance}
    fused = [retriever.candidates(retriever.history(u), 30) for u in sample_users[:10]]
    assert any(p.source == "covisit" for cands in fused for c in cands for p in c.provenance)


def test_cold_start_user_gets_popular_items(retriever):
    history = retriever.history("never-seen-before")
    assert history.is_cold and "New visitor" in history.summary
    candidates = retriever.candidates(history, 10)
    assert [c.source for c in candidates] == ["popularity"] * 10
    counts = [c.score for c in candidates]
    assert counts == sorted(counts, reverse=True)


def test_a_new_event_rebuilds_the_cached_history(tmp_path: Path, retriever, sample_users):
    user = sample_users[-1]
    before = retriever.history(user)
    assert retriever.history(user) is before  # cached
    item = next(i for i in retriever.products if i not in before.item_ids)
    assert retriever.record_events([Event(user, item, seq_pos=10_000, event_type="view")]) == [True]
    after = retriever.history(user)
    assert after.item_ids[-1] == item and len(after.events) == len(before.events) + 1
    assert retriever.record_events([Event(user, item, seq_pos=10_000, event_type="view")]) == [False]  # idempotent


def test_events_recorded_while_serving_update_covisit_and_popularity(tmp_path):
    """Hand-computed: window 3, decay 1, forward 2. Logs u1: A B, u2: A C; then u3 views B, C, A
    live. C after B adds B->C 2 (forward) and C->B 1; A after C (d=1) adds C->A 2, A->C 1; A after
    B (d=2) adds B->A 2/2 = 1, A->B 1/2. Popularity counts A 3, B 2, C 2 of 7."""

    catalog = catalog_at(tmp_path)
    catalog.upsert_products([Product(i, f"Product {i}", ("Beauty", "Skin Care")) for i in "ABC"])
    catalog.add_events([Event("u1", "A", seq_pos=0), Event("u1", "B", seq_pos=1),
                        Event("u2", "A", seq_pos=0), Event("u2", "C", seq_pos=1)])
    live = Retriever(catalog, None, {"covisit": 1.0}, {"covisit": {"forward": 2.0}})
    covisit = live.sources["covisit"]
    assert covisit.links["A"] == {"B": 2.0, "C": 2.0} and covisit.links["B"] == {"A": 1.0}
    added = live.record_events([Event("u3", "B", seq_pos=0), Event("u3", "C", seq_pos=1),
                                Event("u3", "A", seq_pos=2), Event("u3", "A", seq_pos=2)])
    assert added == [True, True, True, False]  # the repeat is stored once and counted once
    assert covisit.links["B"] == {"A": 2.0, "C": 2.0}
    assert covisit.links["C"] == {"A": 1.0 + 2.0, "B": 1.0}
    assert covisit.links["A"] == {"B": 2.5, "C": 3.0}
    popular = live.sources["popularity"].candidates(build_history("new", [], {}), 3)
    assert [(c.item_id, c.score) for c in popular] == [("A", 3 / 7), ("B", 2 / 7), ("C", 2 / 7)]
    rebuilt = Retriever(catalog, None, {"covisit": 1.0}, {"covisit": {"forward": 2.0}})
    assert rebuilt.sources["covisit"].links == covisit.links  # the same as learning from the whole log


def test_the_semantic_source_follows_the_catalogue_text_by_text(tmp_path: Path, retriever, monkeypatch):
    """Hand-made unit vectors; the user's one item is a = (1, 0, 0), so each score is the first
    component. A product's new text counts only once the vector store holds the vector made from it
    (the catalogue is written first); a new product is searched once the catalogue moves; with the
    vector store down the vectors held are searched."""

    catalog = catalog_at(tmp_path)
    index = VectorIndex(chroma_client(str(tmp_path / "chroma")), retriever.index.embeddings)

    def put(products: list[Product], vectors: list[list[float]]) -> None:
        index.upsert_embedded(PRODUCTS, [p.item_id for p in products], [p.text() for p in products], vectors,
                              [{"n": 0}] * len(products))

    shelf = [_product(i) for i in "abcd"]
    catalog.upsert_products(shelf)
    put(shelf, [[1, 0, 0], [0.6, 0.8, 0], [0, 1, 0], [0, 0, 1]])
    catalog.add_events([Event("u", "a", seq_pos=0)])
    live = Retriever(catalog, index, {"semantic": 1.0})
    semantic = live.source("semantic")

    def ranked() -> list[tuple[str, float, str]]:
        live.refresh()  # as each compose does
        found = semantic.candidates(live.history("u"), 10)
        return [(c.item_id, round(c.score, 4), c.provenance[0].because) for c in found]

    assert ranked() == [("b", 0.6, "a"), ("c", 0.0, "a"), ("d", 0.0, "a")]
    renamed = Product("c", "Product c, new formula", ("Beauty", "Skin Care", "Face"), "B", 10.0)
    catalog.upsert_products([renamed])
    assert ranked()[0] == ("b", 0.6, "a")  # the store still holds the old text's vector: not taken
    put([renamed], [[0.8, 0.6, 0]])
    semantic.table.retry_seconds = 0.0
    assert [i for i, _, _ in ranked()] == ["c", "b", "d"]
    catalog.upsert_products([_product("e")])
    put([_product("e")], [[0.28, 0.96, 0]])
    assert ranked() == [("c", 0.8, "a"), ("b", 0.6, "a"), ("e", 0.28, "a"), ("d", 0.0, "a")]
    with monkeypatch.context() as down:
        down.setattr(index, "stored", lambda *a: (_ for _ in ()).throw(ConnectionError("chromadb unreachable")))
        catalog.upsert_products([_product("f")])
        put([_product("f")], [[0.9, 0, 0.436]])  # written while this process could not read it
        assert [i for i, _, _ in ranked()] == ["c", "b", "e", "d"]  # f is not held yet
    assert ranked()[0] == ("f", 0.9, "a")  # read once the store answers again (retry_seconds 0)
    # a catalogue past ``exact_max`` is searched in the vector store: the same list
    in_store = Retriever(catalog, index, {"semantic": 1.0}, {"semantic": {"exact_max": 0}}).source("semantic")
    assert [(c.item_id, round(c.score, 4), c.provenance[0].because)
            for c in in_store.candidates(live.history("u"), 10)] == ranked()
