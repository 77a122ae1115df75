"""A cheap judge: sentence embeddings (the store's MiniLM) and fixed rules of thumb, no generation and
nothing trained — the baseline a model judge must beat to be worth its cost.

- ``title_fit``: the cosine between the title and the mean of its products' texts (title and
  category), cut into scores 1-5 at ``SCORE_EDGES``.
- ``shopper_fit``: the page whose products' mean is closer to the shopper's history summary wins.
- ``variety``: the page whose modules' means are less alike (lower mean pairwise cosine) wins.

Pairwise answers do not depend on which page comes first, so they never flip. Other criteria
(``copy_safety``: whether a claim is supported is not a matter of similarity) get no verdict,
counted as failures, so the judge is never trusted for them. The edges and the margin were set once
from MiniLM's usual ranges (unrelated text ~0-0.2, same topic ~0.4+), not fitted to known answers.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from eval.judge.cases import PairCase, PointCase
from eval.judge.judging import Asked, PairVerdict, PointVerdict

SCORE_EDGES = (0.1, 0.2, 0.3, 0.45)  # cosine below the first: 1, ..., at or above the last: 5
MARGIN = 0.01  # pairwise: closer than this is a tie


def product_text(product: dict) -> str:
    return f"{product['title']}. {product['category']}"


class EmbeddingJudge:
    """The interface of ``eval.judge.judging.Judge`` (``score``, ``compare``, ``calls``)."""

    def __init__(self, name: str, embeddings):
        self.name, self.embeddings = name, embeddings
        self.calls = 0
        self._vectors: dict[str, np.ndarray] = {}

    def _embed(self, texts: list[str]) -> None:
        new = sorted({t for t in texts if t not in self._vectors})
        if new:
            self.calls += len(new)
            for text, vector in zip(new, self.embeddings.embed_documents(new), strict=True):
                self._vectors[text] = np.asarray(vector, dtype=np.float32)

    def _mean(self, products: list[dict]) -> np.ndarray:
        vector = np.mean([self._vectors[product_text(p)] for p in products], axis=0)
        return vector / (np.linalg.norm(vector) or 1.0)

    def score(self, cases: list[PointCase]) -> list[PointVerdict]:
        judged = [c for c in cases if c.criterion == "title_fit" and c.items]
        self._embed([c.title for c in judged] + [product_text(p) for c in judged for p in c.items])
        out = []
        for case in cases:
            if case not in judged:
                out.append(PointVerdict(case, None, [Asked("", None, None, f"{case.criterion}: not judged by "
                                                           "an embedding judge")]))
                continue
            cosine = float(self._vectors[case.title] @ self._mean(case.items))
            score = 1 + sum(cosine >= edge for edge in SCORE_EDGES)
            out.append(PointVerdict(case, score, [Asked("", f"cosine {cosine:.3f}", score)]))
        return out

    def compare(self, cases: list[PairCase]) -> list[PairVerdict]:
        judged = [c for c in cases if c.criterion in ("shopper_fit", "variety")]
        self._embed([c.summary for c in judged if c.criterion == "shopper_fit"]
                    + [product_text(p) for c in judged for page in (c.a, c.b) for m in page for p in m["products"]])
        out = []
        for case in cases:
            if case not in judged:
                out.append(PairVerdict(case, None, False, [Asked("", None, None, f"{case.criterion}: not judged "
                                                                 "by an embedding judge")]))
                continue
            a, b = (self._fit(case.summary, page) if case.criterion == "shopper_fit" else self._variety(page)
                    for page in (case.a, case.b))
            winner = "tie" if a is None or b is None or abs(a - b) < MARGIN else ("A" if a > b else "B")
            out.append(PairVerdict(case, winner, False, [Asked("", f"A {a} B {b}", winner)]))
        return out

    def _fit(self, summary: str, page: list[dict]) -> float | None:
        products = [p for m in page for p in m["products"]]
        return round(float(self._vectors[summary] @ self._mean(products)), 4) if products else None

    def _variety(self, page: list[dict]) -> float | None:
        means = [self._mean(m["products"]) for m in page if m["products"]]
        if len(means) < 2:
            return None
        return round(1 - float(np.mean([x @ y for x, y in combinations(means, 2)])), 4)
