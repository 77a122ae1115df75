"""Candidate sources: each proposes scored items for a user, with provenance; fusion merges them.

A source is one small class registered under a name; the retriever builds the ones configured.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retrieval.catalog import Catalog
from retrieval.history import History
from retrieval.records import Candidate, Event, Provenance
from retrieval.repeat import RepeatModel, cycle_days, purchase_baskets
from retrieval.vectors import BEHAVIOUR, ITEM_VECTORS, PRODUCTS, VectorIndex

log = logging.getLogger(__name__)


@dataclass
class SourceContext:
    catalog: Catalog
    index: VectorIndex
    store_dir: Path | None = None  # where trained models live (``<store>/sasrec``)
    options: dict[str, dict] = field(default_factory=dict)  # source name -> its settings
    # what sources built on one store that does not change may share (evaluation builds a covisit
    # source per option it tries); None: each source reads the store afresh, as serving must
    shared: dict | None = None

    def settings(self, source: str) -> dict:
        return dict(self.options.get(source, {}))


@dataclass(frozen=True)
class ItemSequences:
    """Every user's items in order, as integer codes: one array pass per pair distance."""

    items: list[str]
    codes: np.ndarray  # the item of each event; a user's events consecutive, oldest first
    users: np.ndarray  # the user of each event

    @classmethod
    def of(cls, context: SourceContext) -> ItemSequences:
        if context.shared is not None and "item_sequences" in context.shared:
            return context.shared["item_sequences"]
        events = context.catalog.all_events()  # ordered by user, then time
        items = sorted({e.item_id for e in events})
        code = {item: n for n, item in enumerate(items)}
        users = np.zeros(len(events), dtype=np.int64)
        for n in range(1, len(events)):
            users[n] = users[n - 1] + (events[n].user_id != events[n - 1].user_id)
        found = cls(items, np.fromiter((code[e.item_id] for e in events), dtype=np.int64, count=len(events)), users)
        if context.shared is not None:
            context.shared["item_sequences"] = found
        return found

    def pairs(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """(earlier, later) item codes of one user's events ``d`` steps apart, the two items differing."""
        if d >= len(self.codes):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        a, b = self.codes[:-d], self.codes[d:]
        keep = (self.users[:-d] == self.users[d:]) & (a != b)
        return a[keep], b[keep]


SOURCES: dict[str, type[CandidateSource]] = {}


def register_source(name: str) -> Callable[[type[CandidateSource]], type[CandidateSource]]:
    def add(cls: type[CandidateSource]) -> type[CandidateSource]:
        if name in SOURCES:
            raise ValueError(f"candidate source {name!r} is registered twice")
        cls.name = name
        SOURCES[name] = cls
        return cls

    return add


class SourceOptions(BaseModel):
    """A source's options (``source_options.<name>`` in the settings); each source declares its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, source: str, given: dict) -> SourceOptions:
        """The options from settings, or ``ValueError`` naming the source and every problem."""
        unknown = set(given) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {sorted(unknown)}; known: {sorted(cls.model_fields)}")
        try:
            return cls.model_validate(given)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"{source}: {problems}") from None


class CandidateSource:
    name = "base"
    Options: ClassVar[type[SourceOptions]] = SourceOptions

    def __init__(self, context: SourceContext):
        self.context = context
        self.options = self.Options.parse(self.name, context.settings(self.name))

    @classmethod
    def defaults(cls) -> dict:
        """The options' defaults, as a plain mapping (what ``source_options`` would spell out)."""
        return cls.Options().model_dump()

    def candidates(self, history: History, k: int) -> list[Candidate]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Read what the source keeps in memory now (at a service's warm-up), not in a shopper's
        request."""

    def observe(self, event: Event, earlier: list[Event]) -> None:
        """A new event recorded while serving (``earlier``: the user's events before it). Sources
        that learn from the whole log and can update cheaply do so here; the others (behaviour
        vectors, SASRec, the repeat model's population prior) learn at the next build: an ingest,
        a reload or a restart."""

    def _ranked(
        self, scores: dict[str, float], because: dict[str, str], k: int, history: History
    ) -> list[Candidate]:
        """Top k in-stock catalogue items, the user's own items left out (repurchases are rare)."""
        seen = set(history.item_ids)
        products = self.context.catalog.products
        ranked = sorted(
            (i for i in scores if i not in seen and i in products and products[i].in_stock),
            key=lambda i: (-scores[i], i),
        )[:k]
        return [
            Candidate(i, scores[i], [Provenance(self.name, scores[i], rank, because.get(i))])
            for rank, i in enumerate(ranked)
        ]


def _recency_weights(n: int, half_life: float = 3.0) -> np.ndarray:
    """Weight of the i-th newest item: the newest counts 1, one `half_life` older counts 0.5."""
    return 0.5 ** (np.arange(n) / half_life)


@register_source("popularity")
class Popularity(CandidateSource):
    """Most interacted-with items; the cold-start source. Evidence: the item's department."""

    def __init__(self, context: SourceContext):
        super().__init__(context)
        self._counts = Counter(e.item_id for e in context.catalog.all_events())
        self._lock = threading.Lock()
        self._rank()

    def _rank(self) -> None:
        """Scores and the ranked list, replaced whole so that a page being composed meanwhile reads
        one consistent pair. Ranked once per change: a request only skips the user's own items."""
        total = max(sum(self._counts.values()), 1)
        scores = {item: count / total for item, count in self._counts.items()}
        products = self.context.catalog.products
        self.scores, self.ranked = scores, [i for i in sorted(scores, key=lambda i: (-scores[i], i))
                                            if i in products and products[i].in_stock]
        self._stale = False

    def observe(self, event: Event, earlier: list[Event]) -> None:
        with self._lock:
            self._counts[event.item_id] += 1
            self._stale = True

    def candidates(self, history: History, k: int) -> list[Candidate]:
        if self._stale:
            with self._lock:
                if self._stale:
                    self._rank()
        products = self.context.catalog.products
        seen = set(history.item_ids)
        # ranked when built; products removed or out of stock since are skipped
        top = list(islice((i for i in self.ranked if i not in seen and i in products and products[i].in_stock), k))
        return [Candidate(i, self.scores[i], [Provenance(self.name, self.scores[i], rank, products[i].department)])
                for rank, i in enumerate(top)]


class SegmentOptions(SourceOptions):
    attributes: list[str] = Field(default_factory=list, description="user attributes that make a segment, most "
                                  "telling first (e.g. [age_group, region]); a thin segment drops the last one")
    min_users: int = Field(30, ge=1, description="a segment with fewer shoppers backs off to a coarser one, and at "
                           "last to every shopper")


@register_source("segment_popularity")
class SegmentPopularity(CandidateSource):
    """Best-sellers among shoppers who share the configured attributes (who they are, where the shop
    knows it), backing off to coarser segments and to every shopper where a segment is thin; the
    cold-start source for a shop that knows its shoppers. Evidence: the item's department (never
    the attributes: they stay out of prompts)."""

    Options = SegmentOptions

    def __init__(self, context: SourceContext):
        super().__init__(context)
        self._attributes = context.catalog.all_attributes()
        self._counts: dict[tuple, Counter] = defaultdict(Counter)  # segment -> item counts
        self._shoppers: dict[tuple, set[str]] = defaultdict(set)
        self._ranked_by: dict[tuple, tuple[list[str], int]] = {}  # segment -> (items by count, count), on first use
        self._lock = threading.Lock()
        for event in context.catalog.all_events():
            self._count(event)

    def segments(self, user_id: str) -> list[tuple[tuple[str, str], ...]]:
        """The user's segments, finest first; the last, ``()``, is every shopper."""
        values, names = self._attributes.get(user_id, {}), self.options.attributes
        return [tuple((name, values[name]) for name in names[:n]) for n in range(len(names), -1, -1)
                if all(name in values for name in names[:n])]

    def _count(self, event: Event) -> None:
        for segment in self.segments(event.user_id):
            self._counts[segment][event.item_id] += 1
            self._shoppers[segment].add(event.user_id)
            self._ranked_by.pop(segment, None)

    def observe(self, event: Event, earlier: list[Event]) -> None:
        with self._lock:
            self._count(event)

    def segment_of(self, user_id: str) -> tuple[tuple[str, str], ...]:
        """The finest of the user's segments with enough shoppers."""
        return next(s for s in self.segments(user_id) if not s or len(self._shoppers[s]) >= self.options.min_users)

    def candidates(self, history: History, k: int) -> list[Candidate]:
        segment = self.segment_of(history.user_id)
        with self._lock:  # ranked and summed once per change of the segment, not per page
            counts = self._counts[segment]
            if segment not in self._ranked_by:
                self._ranked_by[segment] = (sorted(counts, key=lambda i: (-counts[i], i)), max(sum(counts.values()), 1))
            ranked, total = self._ranked_by[segment]
        products = self.context.catalog.products
        seen = set(history.item_ids)
        top = list(islice((i for i in ranked if i not in seen and i in products and products[i].in_stock), k))
        share = {i: counts[i] / total for i in top}
        return [Candidate(i, share[i], [Provenance(self.name, share[i], rank, products[i].department)])
                for rank, i in enumerate(top)]


class CoVisitOptions(SourceOptions):
    window: int = Field(3, ge=1, description="how many steps apart two items of a sequence still count as a pair")
    decay: float = Field(1.0, ge=0, description="a pair d steps apart counts 1 / d**decay")
    forward: float = Field(1.0, gt=0, description="weight of a pair in the order it happened (b after a)")
    pop_alpha: float = Field(0.0, ge=0, description="a candidate's strength is divided by its count ** pop_alpha")
    recent: int = Field(10, ge=1, description="how many of the shopper's latest items are followed")
    half_life: float = Field(3.0, gt=0, description="recency: an item this many steps older counts half")


class Links(Mapping):
    """Read-only ``item -> {neighbour: strength}``: the links built from the log (a sparse matrix)
    plus those observed since (``CoVisit.observe``), merged per item."""

    def __init__(self, items: list[str], code: dict[str, int], matrix, added: dict[str, Counter]):
        self._items, self._code, self._matrix, self._added = items, code, matrix, added

    def __getitem__(self, item: str) -> dict[str, float]:
        row: dict[str, float] = {}
        if item in self._code:
            built = self._matrix[self._code[item]]
            row = {self._items[j]: float(v) for j, v in zip(built.indices.tolist(), built.data.tolist(), strict=True)}
        for other, strength in self._added.get(item, {}).items():
            row[other] = row.get(other, 0.0) + strength
        if not row:
            raise KeyError(item)
        return row

    def __iter__(self):
        counts = np.diff(self._matrix.indptr)
        built = [self._items[i] for i in np.flatnonzero(counts).tolist()]
        return iter(dict.fromkeys([*built, *self._added]))

    def __len__(self) -> int:
        return sum(1 for _ in self)


@register_source("covisit")
class CoVisit(CandidateSource):
    """Item-to-item co-occurrence within users' sequences. A pair ``d`` steps apart counts
    ``1 / d**decay`` (``forward`` times that when the candidate came after the history item), and a
    candidate's link strength is divided by its popularity ** ``pop_alpha`` so that best-sellers do
    not follow every item. The defaults are the original behaviour; ``homepage eval ranking`` tunes
    the options on the validation split (Amazon Beauty: window 8, forward 2.5, pop_alpha 0.25,
    half_life 1) and they are set per store with ``RetrievalConfig.source_options``.
    Evidence: the history item that contributes most.

    The links built from the log are a sparse matrix (rows: an item, columns: its neighbours), and a
    shopper's scores are their recent items' rows weighted and summed with numpy; links observed
    while serving sit beside it, item by item, until the next build."""

    Options = CoVisitOptions

    def __init__(self, context: SourceContext):
        from scipy.sparse import csr_matrix

        super().__init__(context)
        window, decay, forward = self.options.window, self.options.decay, self.options.forward
        seqs = ItemSequences.of(context)
        n = len(seqs.items)
        counts = np.bincount(seqs.codes, minlength=n)
        self._counts = Counter({item: int(c) for item, c in zip(seqs.items, counts, strict=True) if c})
        # every pair d steps apart, both ways: b followed a (forward x strength), a preceded b (strength)
        heads, tails, weights = [], [], []
        for d in range(1, window + 1):
            a, b = seqs.pairs(d)
            strength = 1.0 / d**decay
            heads += [a, b]
            tails += [b, a]
            weights += [np.full(len(a), forward * strength), np.full(len(a), strength)]
        head, tail = np.concatenate(heads or [np.zeros(0, np.int64)]), np.concatenate(tails or [np.zeros(0, np.int64)])
        key, where = np.unique(head * n + tail, return_inverse=True)
        # float even with no pair at all (bincount of nothing is an int array)
        strength = np.bincount(where, weights=np.concatenate(weights or [np.zeros(0)]), minlength=len(key))
        strength = strength.astype(np.float64)
        if self.options.pop_alpha:
            strength /= counts[key % n] ** self.options.pop_alpha
        # item ids are sorted, so a column's number orders ties as the ids do
        self._items, self._code = seqs.items, {item: j for j, item in enumerate(seqs.items)}
        self._matrix = csr_matrix((strength, (key // n, key % n)), shape=(n, n))
        self._added: dict[str, Counter] = {}  # links observed since the build, per history item
        self._lock = threading.Lock()

    @property
    def links(self) -> Links:
        return Links(self._items, self._code, self._matrix, self._added)

    def observe(self, event: Event, earlier: list[Event]) -> None:
        """The new item follows the user's last ``window`` items. Its pairs are divided by the
        popularity each item has now; links counted before keep the popularity they were built
        with until the next build (the popularity correction drifts by one event per event)."""
        window, decay, forward = self.options.window, self.options.decay, self.options.forward
        b = event.item_id
        with self._lock:
            self._counts[b] += 1
            alpha = self.options.pop_alpha
            # an item in a history counts at least once (it may have come after this source was built)
            norm = (lambda item: max(self._counts[item], 1) ** alpha) if alpha else (lambda item: 1.0)
            for d, e in enumerate(reversed(earlier[-window:]), start=1):
                a = e.item_id
                if a == b:
                    continue
                strength = 1.0 / d**decay
                # copied, not changed in place: a page reading the old neighbours is never disturbed
                ahead, back = Counter(self._added.get(a, ())), Counter(self._added.get(b, ()))
                ahead[b] += forward * strength / norm(b)
                back[a] += strength / norm(a)
                self._added[a], self._added[b] = ahead, back

    def candidates(self, history: History, k: int) -> list[Candidate]:
        recent = history.recent(self.options.recent)
        if not recent:
            return []
        weights = _recency_weights(len(recent), self.options.half_life)
        # strength[r, j]: how strongly recent item r leads to item j (built + observed), then weighted
        strength = np.zeros((len(recent), len(self._items)))
        rows = [r for r, p in enumerate(recent) if p.item_id in self._code]
        if rows:
            strength[rows] = self._matrix[[self._code[recent[r].item_id] for r in rows]].toarray()
        added = self._added
        outside = False
        for r, p in enumerate(recent):
            for item, s in added.get(p.item_id, {}).items():
                if item in self._code:
                    strength[r, self._code[item]] += s
                else:
                    outside = True
        if outside:  # an item first seen while serving: scored the plain way (rare; until the next build)
            return self._scored_by_dict(recent, weights, k, history)
        contribution = strength * weights[:, None]
        scores = contribution[0].copy()
        for row in contribution[1:]:  # newest first, as the sum was always taken
            scores += row
        best = contribution.argmax(axis=0)  # the first recent item with the largest contribution
        found = np.flatnonzero(scores > 0)
        order = found[np.lexsort((found, -scores[found]))]  # score, then item id
        seen = set(history.item_ids)
        products = self.context.catalog.products
        out = []
        for j in order.tolist():
            item = self._items[j]
            if item in seen or item not in products or not products[item].in_stock:
                continue
            because = recent[int(best[j])].item_id
            out.append(Candidate(item, float(scores[j]), [Provenance(self.name, float(scores[j]), len(out), because)]))
            if len(out) == k:
                break
        return out

    def _scored_by_dict(self, recent, weights, k: int, history: History) -> list[Candidate]:
        links = self.links
        scores: dict[str, float] = defaultdict(float)
        best: dict[str, tuple[float, str]] = {}
        for weight, product in zip(weights, recent, strict=True):
            for item, strength in links.get(product.item_id, {}).items():
                contribution = weight * strength
                scores[item] += contribution
                if contribution > best.get(item, (0.0, ""))[0]:
                    best[item] = (contribution, product.item_id)
        return self._ranked(scores, {i: b[1] for i, b in best.items()}, k, history)


class BuyAgainOptions(SourceOptions):
    min_count: int = Field(1, ge=1, description="baskets an item must have been in")
    min_probability: float = Field(0.0, ge=0, description="least probability that the next basket holds it "
                                   "(above 1: the source proposes nothing)")
    min_cycle_days: float = Field(2.0, ge=0, description="a purchase cycle shorter than this (days) is no cycle")


@register_source("buy_again")
class BuyAgain(CandidateSource):
    """The shopper's own items, for a module that may show them (a skeleton module's
    ``show_owned``), ranked by the probability that the next basket holds them
    (``retrieval.repeat.RepeatModel``, learned from this store's logs when the source is built).
    Items below ``min_probability`` or bought fewer than ``min_count`` times are not proposed.
    "Now" is the latest event time in the store (or the shopper's own, if later), so replayed logs
    and live traffic are scored alike. Evidence: the cycle in days ("every 28 days"), or how many
    times ("3 times", "once")."""

    Options = BuyAgainOptions

    def __init__(self, context: SourceContext):
        super().__init__(context)
        self.now = context.catalog.latest_time()
        by_user: dict[str, list] = defaultdict(list)
        for e in context.catalog.all_events():
            by_user[e.user_id].append(e)
        self.model = RepeatModel(self.options.min_cycle_days).fit(by_user)

    def candidates(self, history: History, k: int) -> list[Candidate]:
        baskets = purchase_baskets(history.events)
        known = [t for basket in baskets for e in basket if (t := e.timestamp) is not None]
        now = max([t for t in [self.now, *known] if t is not None], default=None)
        products = self.context.catalog.products
        scores, because = {}, {}
        for item, (probability, owned) in self.model.probabilities(baskets, now).items():
            if (owned.baskets < self.options.min_count or probability < self.options.min_probability
                    or item not in products or not products[item].in_stock):
                continue
            scores[item] = probability
            cycle = cycle_days(owned)
            because[item] = (f"every {round(cycle)} days" if cycle and cycle >= self.options.min_cycle_days
                             else "once" if owned.baskets == 1 else f"{owned.baskets} times")
        ranked = sorted(scores, key=lambda i: (-scores[i], i))[:k]
        return [Candidate(i, scores[i], [Provenance(self.name, scores[i], rank, because[i])])
                for rank, i in enumerate(ranked)]


class SemanticOptions(SourceOptions):
    # At depth 200 on Beauty (12k products) the source took 20.6 ms a shopper searching the vector store
    # (which must return every hit's vector, for the evidence), 4.1 ms in memory (docs/results/fusion-depth/)
    exact_max: int = Field(100_000, ge=0, description="a catalogue of up to this many products is searched "
                           "exactly, its text vectors held in memory (8 bytes a dimension each: 12k x 384 = 37 MB); "
                           "a larger one in the vector store (approximate)")


class TextTable:
    """The products' text vectors in memory, one row each, following the catalogue: when its version
    moves, only the products whose text is new or changed are read from the vector store. The
    catalogue is written before the vector store, so a vector stored under another text than the
    product's is read again later (at most once a second), never kept as current. With the vector
    store unreachable the vectors held are searched, and it is asked again a second later."""

    retry_seconds = 1.0

    def __init__(self, index: VectorIndex):
        self.index = index
        self._texts: dict[str, str] = {}  # the text each row's vector was made from
        self._pending: set[str] = set()
        self._version: int | None = -1  # no catalogue followed yet (None: one never refreshed)
        self._retried = self._failed = -math.inf
        self._lock = threading.Lock()
        empty = np.zeros((0, 0), np.float32)
        self.snapshot: tuple[list[str], dict[str, int], np.ndarray, np.ndarray] = ([], {}, empty, empty)

    def current(self, catalog: Catalog) -> tuple[list[str], dict[str, int], np.ndarray, np.ndarray]:
        """(ids, row of each id, vectors as rows, the same as columns): one consistent view; rows of
        removed products may remain (callers keep to the catalogue's products). Both layouts, as
        each product is fastest on its own (Beauty, torch): a query times the columns 0.7 ms, times
        the rows 2.6; gathering 205 rows and their product with the history 0.15 ms, columns 0.6."""
        products, version = catalog.products, catalog.loaded_version
        now = time.monotonic()
        if now - self._failed > self.retry_seconds and (
                version != self._version or (self._pending and now - self._retried > self.retry_seconds)):
            with self._lock:
                if version != self._version or self._pending:
                    try:
                        self._follow(products)
                    except Exception:
                        self._failed = time.monotonic()
                        if not self._texts:  # nothing held to search: the source fails, and the page says so
                            raise
                        log.warning("the products' vectors could not be read; the ones held are searched",
                                    exc_info=True)
                    else:
                        self._version = version
        return self.snapshot

    def _follow(self, products: Mapping) -> None:
        texts = {i: p.text() for i, p in products.items()}
        wanted = [i for i, text in texts.items() if self._texts.get(i) != text]
        self._retried, self._pending = time.monotonic(), set()
        found = {}
        for start in range(0, len(wanted), 2000):
            found.update(self.index.stored(PRODUCTS, wanted[start:start + 2000]))
        current = {i: vector for i, (vector, document) in found.items() if document == texts[i]}
        self._pending = set(wanted) - set(current)
        if not current:
            return
        ids, rows, table, _ = self.snapshot
        ids, rows = list(ids), dict(rows)
        new = [i for i in current if i not in rows]
        width = len(next(iter(current.values())))
        table = np.vstack([table.reshape(-1, width), np.zeros((len(new), width), np.float32)])
        for i in new:
            rows[i] = len(ids)
            ids.append(i)
        for i, vector in current.items():
            table[rows[i]] = vector
            self._texts[i] = texts[i]
        self.snapshot = (ids, rows, table, np.ascontiguousarray(table.T))


@register_source("semantic")
class Semantic(CandidateSource):
    """Products whose text embedding is near the user's recent items (recency-weighted mean).
    Evidence: the history item the candidate is most similar to."""

    Options = SemanticOptions

    def __init__(self, context: SourceContext):
        super().__init__(context)
        self.table = TextTable(context.index)
        self._vectors: dict[str, np.ndarray] = {}  # history vectors fetched, past exact_max

    def prepare(self) -> None:
        if len(self.context.catalog.products) <= self.options.exact_max:
            self.table.current(self.context.catalog)

    def candidates(self, history: History, k: int) -> list[Candidate]:
        recent = [p.item_id for p in history.recent(5)]
        if not recent:
            return []
        n = k + len(history.item_ids)
        if len(self.context.catalog.products) > self.options.exact_max:
            return self._from_store(history, recent, n, k)
        ids, rows, table, columns = self.table.current(self.context.catalog)
        recent = [i for i in recent if i in rows]
        if not recent:
            return []
        own = table[[rows[i] for i in recent]]
        # in torch, as the sasrec source does: numpy's product of this size wakes BLAS threads that
        # then spin against torch's (the model's) threads
        import torch

        scores, top = torch.topk(torch.from_numpy(self._query(own)) @ torch.from_numpy(columns), min(n, len(ids)))
        top = top.tolist()
        nearest = np.argmax(table[top] @ own.T, axis=1)
        because = {ids[r]: recent[j] for r, j in zip(top, nearest, strict=True)}
        return self._ranked(dict(zip((ids[r] for r in top), scores.tolist(), strict=True)), because, k, history)

    def _from_store(self, history: History, recent: list[str], n: int, k: int) -> list[Candidate]:
        """The vector store's approximate search, for catalogues too large to hold in memory."""
        missing = [i for i in recent if i not in self._vectors]
        if missing:
            found = self.context.index.vectors(PRODUCTS, missing)
            self._vectors.update({i: np.asarray(v, dtype=np.float32) for i, v in found.items()})
        recent = [i for i in recent if i in self._vectors]
        if not recent:
            return []
        own = np.array([self._vectors[i] for i in recent])
        hits = self.context.index.search_with_vectors(PRODUCTS, self._query(own), n)
        because = {h: recent[int(np.argmax(own @ np.asarray(v)))] for h, _, v in hits}
        return self._ranked({h: score for h, score, _ in hits}, because, k, history)

    @staticmethod
    def _query(own: np.ndarray) -> np.ndarray:
        query = (_recency_weights(len(own))[:, None] * own).sum(axis=0).astype(np.float32)
        return query / (np.linalg.norm(query) or 1.0)


@register_source("similar_users")
class SimilarUsers(CandidateSource):
    """Items of the users whose behaviour text is nearest this user's (user-based CF over the
    behaviour collection). Evidence: none beyond "shoppers like you"."""

    neighbours = 20

    def candidates(self, history: History, k: int) -> list[Candidate]:
        if history.is_cold:
            return []
        # the user's own behaviour vector from ingestion; embedding the summary per request costs
        # a MiniLM forward pass (tens of ms, far more on a busy CPU)
        stored = self.context.index.vectors(BEHAVIOUR, [history.user_id]).get(history.user_id)
        query = stored if stored is not None else self.context.index.embeddings.embed_query(history.summary)
        hits = self.context.index.search(BEHAVIOUR, query, self.neighbours + 1)
        scores: dict[str, float] = defaultdict(float)
        for user, similarity in hits:
            if user == history.user_id:
                continue
            for e in self.context.catalog.user_events(user):
                scores[e.item_id] += similarity
        return self._ranked(scores, {}, k, history)


# learned item vectors are searched exactly up to this many items: at 12k x 64 an exact query takes
# 0.6 ms here, the vector store's approximate one 2 ms (scripts/sasrec_search_recall.py)
EXACT_SEARCH_MAX = 250_000


@register_source("sasrec")
class Sequential(CandidateSource):
    """The SASRec-style model of ``retrieval.sequential``, trained by ``homepage train sasrec``: the
    user's sequence encoding is the query of one inner-product search over the learned item vectors.
    Evidence: the recent history item whose learned vector is nearest the candidate's."""

    def __init__(self, context: SourceContext):
        super().__init__(context)
        import torch  # loads only when the source is used

        from retrieval.sequential import MODEL_DIR, Trained

        if context.store_dir is None:
            raise ValueError("sasrec: the source needs the store folder that holds the trained model")
        self.model = Trained.load(Path(context.store_dir) / MODEL_DIR)
        self.index = self.model.index
        self.table = self.model.vectors()
        self.torch_table = torch.from_numpy(self.table)  # the same memory, for the exact search

    def candidates(self, history: History, k: int) -> list[Candidate]:
        known = [i for i in history.item_ids if i in self.index]
        if not known:
            return []
        query = self.model.encode([known])[0]
        hits = self._nearest(query, k + len(set(known)))
        recent = list(dict.fromkeys(reversed(known)))[:10]
        own = self.table[[self.index[i] - 1 for i in recent]]
        because = {h: recent[int(np.argmax(own @ self.table[self.index[h] - 1]))] for h, _ in hits if h in self.index}
        return self._ranked(dict(hits), because, k, history)

    def _nearest(self, query: np.ndarray, n: int) -> list[tuple[str, float]]:
        """The n items of largest inner product with the query: exact while the table (held in
        memory anyway, for the evidence) is small enough; the vector store's approximate search
        beyond. Exact because the approximate one loses a shopper's best item now and then, and
        which one changes with each build of the index (docs/results/ranking-beauty/)."""
        if len(self.table) > EXACT_SEARCH_MAX:
            return self.context.index.search_vectors(ITEM_VECTORS, query, n)
        # in torch, on the encoder's threads: numpy's product of this size wakes BLAS threads that
        # then spin against the encoder's (encode and search 16.4 ms a shopper, against 1.8 ms so)
        import torch

        scores, top = torch.topk(self.torch_table @ torch.from_numpy(query), min(n, len(self.table)))
        return [(self.model.item_ids[i], score) for i, score in zip(top.tolist(), scores.tolist(), strict=True)]


def fuse(
    lists: dict[str, list[Candidate]], weights: dict[str, float], k: int, rrf_k: int = 60
) -> list[Candidate]:
    """Weighted reciprocal-rank fusion; every candidate keeps the provenance of each source."""
    merged: dict[str, Candidate] = {}
    for source, candidates in lists.items():
        weight = weights.get(source, 1.0)
        for rank, cand in enumerate(candidates):
            entry = merged.setdefault(cand.item_id, Candidate(cand.item_id, 0.0, []))
            entry.score += weight / (rrf_k + rank + 1)
            entry.provenance.extend(cand.provenance)
    return sorted(merged.values(), key=lambda c: (-c.score, c.item_id))[:k]
