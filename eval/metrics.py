"""Top-K ranking metrics for one held-out target per user (leave-one-out), as in the published
protocol: Recall@K is a hit rate, NDCG@K is 1/log2(rank + 1) for a hit at 1-based rank.

A held-out basket (several items bought at one time) is scored by ``basket_recall``/``basket_ndcg``:
the share of the basket found, and DCG over the ideal DCG; for one item both equal the above.
``per_user`` scores a basket's repeat or explore items alone; ``paired_interval`` compares two
systems on the same users."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np


def recall_at_k(ranked: Sequence[str], target: str, k: int) -> float:
    return 1.0 if target in ranked[:k] else 0.0


def ndcg_at_k(ranked: Sequence[str], target: str, k: int) -> float:
    for rank, item in enumerate(ranked[:k], start=1):
        if item == target:
            return 1.0 / math.log2(rank + 1)
    return 0.0


def basket_recall(ranked: Sequence[str], targets: Collection[str], k: int) -> float:
    return len(set(ranked[:k]) & set(targets)) / max(len(set(targets)), 1)


def basket_ndcg(ranked: Sequence[str], targets: Collection[str], k: int, full_ideal: bool = False) -> float:
    """DCG@k over the ideal DCG of min(|basket|, k) hits — or of the whole basket (``full_ideal``, Li et
    al.'s convention: a basket larger than k can never score 1)."""
    wanted = set(targets)
    dcg = sum(1.0 / math.log2(rank + 1) for rank, item in enumerate(ranked[:k], start=1) if item in wanted)
    hits = len(wanted) if full_ideal else min(len(wanted), k)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, hits + 1))
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


SUBSETS = ("all", "repeat", "explore")


def subset_targets(targets: Collection[str], history: Collection[str], subset: str) -> list[str]:
    """The part of a held-out basket a subset scores: every item, the items the user had bought
    before (repeat) or the others (explore), as in the next-basket literature."""
    owned = set(history)
    if subset == "all":
        return list(targets)
    return [i for i in targets if (i in owned) == (subset == "repeat")]


def per_user(ranked: dict[str, Sequence[str]], targets: dict[str, Collection[str]],
             history: dict[str, Collection[str]], subset: str = "all", ks: Sequence[int] = (5, 10, 20, 50),
             full_ideal: bool = False) -> dict[str, dict[str, float]]:
    """metric -> user -> value, over the users whose basket has items of the subset (a user with no
    repeat item in the basket does not count towards repeat metrics)."""
    out: dict[str, dict[str, float]] = {f"{m}@{k}": {} for k in ks for m in ("recall", "ndcg")}
    for user, found in ranked.items():
        wanted = subset_targets(targets[user], history.get(user, ()), subset)
        if not wanted:
            continue
        for k in ks:
            out[f"recall@{k}"][user] = basket_recall(found, wanted, k)
            out[f"ndcg@{k}"][user] = basket_ndcg(found, wanted, k, full_ideal)
    return out


def bootstrap_interval(values: dict[str, float], samples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over users and its 95 % bootstrap interval (users resampled: whatever one user holds
    stays together)."""
    if not values:
        return 0.0, 0.0, 0.0
    data = np.array([values[u] for u in sorted(values)], dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(samples, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(data.mean()), float(low), float(high)


def paired_interval(a: dict[str, float], b: dict[str, float], samples: int = 1000, seed: int = 0,
                    ) -> tuple[float, float, float]:
    """Mean of a - b over the users both have, and its 95 % paired-bootstrap interval."""
    return bootstrap_interval({u: a[u] - b[u] for u in set(a) & set(b)}, samples, seed)
