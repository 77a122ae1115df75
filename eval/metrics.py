"""Top-K ranking metrics for one held-out target per user (leave-one-out), as in the published
protocol: Recall@K is a hit rate, NDCG@K is 1/log2(rank + 1) for a hit at 1-based rank."""

from __future__ import annotations

import math
from collections.abc import Sequence


def recall_at_k(ranked: Sequence[str], target: str, k: int) -> float:
    return 1.0 if target in ranked[:k] else 0.0


def ndcg_at_k(ranked: Sequence[str], target: str, k: int) -> float:
    for rank, item in enumerate(ranked[:k], start=1):
        if item == target:
            return 1.0 / math.log2(rank + 1)
    return 0.0


def mean_metrics(
    rankings: Sequence[tuple[Sequence[str], str]], ks: Sequence[int] = (5, 10, 20, 50)
) -> dict[str, float]:
    """Mean Recall@K and NDCG@K over (ranked list, target) pairs."""
    n = max(len(rankings), 1)
    result = {}
    for k in ks:
        result[f"recall@{k}"] = sum(recall_at_k(r, t, k) for r, t in rankings) / n
        result[f"ndcg@{k}"] = sum(ndcg_at_k(r, t, k) for r, t in rankings) / n
    return result
