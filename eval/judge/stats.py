"""The judge report's statistics: accuracy with a Wilson interval, win rates with a paired
bootstrap over users."""

from __future__ import annotations

import math

import numpy as np


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float, float]:
    """(rate, low, high): the Wilson score interval, sound for small samples and rates near 0 or 1."""
    if total == 0:
        return 0.0, 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(values: dict[str, float], samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over users and its 95 % bootstrap interval (users resampled: the cases of one user stay
    together, which is what pairs the two configurations)."""
    if not values:
        return 0.0, 0.0, 0.0
    data = np.array([values[u] for u in sorted(values)], dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(samples, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(data.mean()), float(low), float(high)
