"""Judge accuracy's interval (win rates use ``eval.metrics.bootstrap_interval``, over users)."""

from __future__ import annotations

import math


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float, float]:
    """(rate, low, high): the Wilson score interval, sound for small samples and rates near 0 or 1."""
    if total == 0:
        return 0.0, 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return p, max(0.0, centre - half), min(1.0, centre + half)
