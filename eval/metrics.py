"""Top-K ranking metrics for one held-out target per user (leave-one-out), as in the published
protocol: Recall@K is a hit rate, NDCG@K is 1/log2(rank + 1) for a hit at 1-based rank.

A held-out basket (several items bought at one time) is scored by ``basket_recall``/``basket_ndcg``:
the share of the basket found, and DCG over the ideal DCG; for one item both equal the above."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence


def recall_at_k(ranked: Sequence[str], target: str, k: int) -> float:
    return 1.0 if target in ranked[:k] else 0.0


def ndcg_at_k(ranked: Sequence[str], target: str, k: int) -> float:
    for rank, item in enumerate(ranked[:k], start=1):
        if item == target:
            return 1.0 / math.log2(rank + 1)
    return 0.0


def basket_recall(ranked: Sequence[str], targets: Collection[str], k: int) -> float:
    return len(set(ranked[:k]) & set(targets)) / max(len(set(targets)), 1)


def basket_ndcg(ranked: Sequence[str], targets: Collection[str], k: int) -> float:
    wanted = set(targets)
    dcg = sum(1.0 / math.log2(rank + 1) for rank, item in enumerate(ranked[:k], start=1) if item in wanted)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(wanted), k) + 1))
    return dcg / ideal if ideal else 0.0


def mean_metrics(
    rankings: Sequence[tuple[Sequence[str], str | Collection[str]]], ks: Sequence[int] = (5, 10, 20, 50)
) -> dict[str, float]:
    """Mean Recall@K and NDCG@K over (ranked list, target) pairs; a target may be a basket."""
    n = max(len(rankings), 1)
    result = {}
    for k in ks:
        recall = ndcg = 0.0
        for ranked, target in rankings:
            if isinstance(target, str):
                recall, ndcg = recall + recall_at_k(ranked, target, k), ndcg + ndcg_at_k(ranked, target, k)
            else:
                recall, ndcg = recall + basket_recall(ranked, target, k), ndcg + basket_ndcg(ranked, target, k)
        result[f"recall@{k}"], result[f"ndcg@{k}"] = recall / n, ndcg / n
    return result
