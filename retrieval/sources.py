"""Candidate sources: each proposes scored items for a user, with provenance; fusion merges them.

A source is one small class registered under a name; the retriever builds the ones configured.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from retrieval.catalog import Catalog
from retrieval.history import History
from retrieval.records import Candidate, Provenance
from retrieval.vectors import BEHAVIOUR, PRODUCTS, VectorIndex


@dataclass
class SourceContext:
    catalog: Catalog
    index: VectorIndex


SOURCES: dict[str, type[CandidateSource]] = {}


def register_source(name: str) -> Callable[[type[CandidateSource]], type[CandidateSource]]:
    def add(cls: type[CandidateSource]) -> type[CandidateSource]:
        if name in SOURCES:
            raise ValueError(f"candidate source {name!r} is registered twice")
        cls.name = name
        SOURCES[name] = cls
        return cls

    return add


class CandidateSource:
    name = "base"

    def __init__(self, context: SourceContext):
        self.context = context

    def candidates(self, history: History, k: int) -> list[Candidate]:
        raise NotImplementedError

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
        counts = Counter(e.item_id for e in context.catalog.all_events())
        total = max(sum(counts.values()), 1)
        self.scores = {item: count / total for item, count in counts.items()}

    def candidates(self, history: History, k: int) -> list[Candidate]:
        products = self.context.catalog.products
        because = {i: products[i].department for i in self.scores if i in products}
        return self._ranked(self.scores, because, k, history)


@register_source("covisit")
class CoVisit(CandidateSource):
    """Item-to-item co-occurrence within users' sequences (window 3, weighted by 1/distance).
    Evidence: the history item that contributes most."""

    window = 3

    def __init__(self, context: SourceContext):
        super().__init__(context)
        by_user: dict[str, list[str]] = defaultdict(list)
        for e in context.catalog.all_events():
            by_user[e.user_id].append(e.item_id)
        links: dict[str, Counter] = defaultdict(Counter)
        for items in by_user.values():
            for i, a in enumerate(items):
                for d in range(1, self.window + 1):
                    if i + d >= len(items):
                        break
                    b = items[i + d]
                    if a != b:
                        links[a][b] += 1.0 / d
                        links[b][a] += 1.0 / d
        self.links = links

    def candidates(self, history: History, k: int) -> list[Candidate]:
        recent = history.recent(10)
        scores: dict[str, float] = defaultdict(float)
        best: dict[str, tuple[float, str]] = {}
        for weight, product in zip(_recency_weights(len(recent)), recent, strict=True):
            for item, strength in self.links.get(product.item_id, {}).items():
                contribution = weight * strength
                scores[item] += contribution
                if contribution > best.get(item, (0.0, ""))[0]:
                    best[item] = (contribution, product.item_id)
        return self._ranked(scores, {i: b[1] for i, b in best.items()}, k, history)


@register_source("semantic")
class Semantic(CandidateSource):
    """Products whose text embedding is near the user's recent items (recency-weighted mean).
    Evidence: the history item the candidate is most similar to."""

    def candidates(self, history: History, k: int) -> list[Candidate]:
        recent = history.recent(5)
        if not recent:
            return []
        found = self.context.index.vectors(PRODUCTS, [p.item_id for p in recent])
        ids = [p.item_id for p in recent if p.item_id in found]
        if not ids:
            return []
        own = np.array([found[i] for i in ids])
        query = (_recency_weights(len(ids))[:, None] * own).sum(axis=0)
        query /= np.linalg.norm(query) or 1.0
        hits = self.context.index.search(PRODUCTS, query, k + len(history.item_ids))
        if not hits:
            return []
        hit_vectors = self.context.index.vectors(PRODUCTS, [h for h, _ in hits])
        because = {h: ids[int(np.argmax(own @ np.array(hit_vectors[h])))] for h, _ in hits}
        return self._ranked(dict(hits), because, k, history)


@register_source("similar_users")
class SimilarUsers(CandidateSource):
    """Items of the users whose behaviour text is nearest this user's (user-based CF over the
    behaviour collection). Evidence: none beyond "shoppers like you"."""

    neighbours = 20

    def candidates(self, history: History, k: int) -> list[Candidate]:
        if history.is_cold:
            return []
        query = self.context.index.embeddings.embed_query(history.summary)
        hits = self.context.index.search(BEHAVIOUR, query, self.neighbours + 1)
        scores: dict[str, float] = defaultdict(float)
        for user, similarity in hits:
            if user == history.user_id:
                continue
            for e in self.context.catalog.user_events(user):
                scores[e.item_id] += similarity
        return self._ranked(scores, {}, k, history)


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
