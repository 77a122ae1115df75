"""How likely a shopper is to buy one of their own items again on the next visit.

A small logistic model over a few facts about each (shopper, owned item) pair, learned from the
store's own logs: for every shopper with two or more baskets, the baskets before the last are the
facts and the last basket says which owned items were bought again. It is what the ``buy_again``
source ranks by, so its score is a probability that a threshold (``min_probability``) can cut.

The facts (``FEATURES``): how many baskets held the item, and what share of the shopper's
baskets; whether it was in the latest basket and how many baskets ago it was last bought; how many
baskets the shopper has; how often other shoppers buy the item again; how popular it is; and, where
the shopper's own dates show a purchase cycle (an item bought every ~30 days), how close to due it is
now. Logs where nobody buys anything twice (Amazon reviews) teach nothing: the model stays unfitted
and the source proposes nothing.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.records import Event
from retrieval.split import baskets

DAY = 86_400.0
FEATURES = ("log_baskets_with_item", "share_of_baskets", "in_latest_basket", "log_baskets_since",
            "log_shopper_baskets", "log_item_repeat_rate", "log_item_buyers", "due_now")


@dataclass(frozen=True)
class Owned:
    """One owned item's history: in how many baskets, the last one's index, and purchase days."""

    baskets: int
    last: int  # index of the latest basket that held it
    days: tuple[int, ...]  # distinct purchase days (empty without timestamps)


def purchase_baskets(events: Sequence[Event]) -> list[list[Event]]:
    """One shopper's baskets, oldest first: purchases where the log has any, else every event."""
    bought = [e for e in events if e.event_type == "purchase"]
    return baskets(bought or events)


def owned_items(baskets: list[list[Event]]) -> dict[str, Owned]:
    found: dict[str, list[int]] = {}
    days: dict[str, set[int]] = {}
    for index, basket in enumerate(baskets):
        for item in dict.fromkeys(e.item_id for e in basket):
            found.setdefault(item, []).append(index)
        for e in basket:
            if e.timestamp is not None:
                days.setdefault(e.item_id, set()).add(round(e.timestamp / DAY))
    return {item: Owned(len(at), at[-1], tuple(sorted(days.get(item, ())))) for item, at in found.items()}


def cycle_days(owned: Owned) -> float | None:
    """The mean gap between purchase days, where there are two or more."""
    if len(owned.days) < 2:
        return None
    return (owned.days[-1] - owned.days[0]) / (len(owned.days) - 1)


def due_now(owned: Owned, now: float | None, min_cycle_days: float) -> float:
    """1.0 on the day the cycle says the item is due, falling off either side (0.5 at half or
    twice the cycle); 0.0 without a cycle."""
    cycle = cycle_days(owned)
    if cycle is None or cycle < min_cycle_days or now is None:
        return 0.0
    since = max(now / DAY - owned.days[-1], 0.5)
    return math.exp(-math.log(since / cycle) ** 2 / (2 * 0.59**2))  # log-normal bump, 0.5 at x2


class RepeatModel:
    """Logistic regression over ``FEATURES``, fitted by Newton's method with a small ridge."""

    def __init__(self, min_cycle_days: float = 2.0, ridge: float = 1.0):
        self.min_cycle_days = min_cycle_days
        self.ridge = ridge
        self.weights: np.ndarray | None = None
        self.buyers: Counter = Counter()
        self.repeaters: Counter = Counter()
        self.examples = self.positives = 0

    @property
    def fitted(self) -> bool:
        return self.weights is not None

    def features(self, owned: Owned, item: str, shopper_baskets: int, now: float | None) -> list[float]:
        repeat_rate = (self.repeaters[item] + 0.5) / (self.buyers[item] + 5.0)  # smoothed towards 0.1
        return [math.log1p(owned.baskets), owned.baskets / shopper_baskets,
                float(owned.last == shopper_baskets - 1), math.log1p(shopper_baskets - 1 - owned.last),
                math.log1p(shopper_baskets), math.log(repeat_rate), math.log1p(self.buyers[item]),
                due_now(owned, now, self.min_cycle_days)]

    def _count(self, baskets_per_user: Iterable[list[list[Event]]]) -> None:
        """How many shoppers bought each item, and how many of them in two baskets or more."""
        self.buyers, self.repeaters = Counter(), Counter()
        for user_baskets in baskets_per_user:
            for item, owned in owned_items(user_baskets).items():
                self.buyers[item] += 1
                self.repeaters[item] += owned.baskets >= 2

    def fit(self, by_user: dict[str, list[Event]]) -> RepeatModel:
        """Each shopper's latest basket is the label of the baskets before it. A training row sees
        only what was known before its label: the item counts leave every label basket out (a count
        that held it would tell the model its answer), and "now" is the store's latest time just
        before the label basket — what serving would have used then — never the label's own time."""
        per_user = [purchase_baskets(events) for events in by_user.values()]
        self._count(b[:-1] if len(b) >= 2 else b for b in per_user)
        times = sorted({e.timestamp for b in per_user for basket in b for e in basket if e.timestamp is not None})
        rows, labels = [], []
        for user_baskets in per_user:
            if len(user_baskets) < 2:
                continue
            *before, latest = user_baskets
            bought = {e.item_id for e in latest}
            label_time = latest[0].timestamp
            now = None if label_time is None else times[max(bisect_left(times, label_time) - 1, 0)]
            for item, owned in owned_items(before).items():
                rows.append(self.features(owned, item, len(before), now))
                labels.append(item in bought)
        self._count(per_user)  # serving: every basket the store holds is before the next one
        self.examples, self.positives = len(labels), int(sum(labels))
        if self.positives == 0 or self.positives == self.examples:
            return self  # nothing to learn from: nobody bought an item again (or everybody did)
        x = np.column_stack([np.ones(len(rows)), np.asarray(rows)])
        y = np.asarray(labels, dtype=float)
        w = np.zeros(x.shape[1])
        penalty = self.ridge * np.eye(x.shape[1])
        penalty[0, 0] = 0.0  # the intercept is not shrunk
        for _ in range(25):
            p = 1.0 / (1.0 + np.exp(-x @ w))
            gradient = x.T @ (p - y) + penalty @ w
            hessian = (x * (p * (1 - p))[:, None]).T @ x + penalty
            step = np.linalg.solve(hessian, gradient)
            w -= step
            if np.abs(step).max() < 1e-6:
                break
        self.weights = w
        return self

    def probabilities(self, baskets: list[list[Event]], now: float | None) -> dict[str, tuple[float, Owned]]:
        """Each owned item's probability of being in the next basket (empty while unfitted)."""
        if self.weights is None or not baskets:
            return {}
        owned = owned_items(baskets)
        items = list(owned)
        x = np.asarray([[1.0, *self.features(owned[i], i, len(baskets), now)] for i in items])
        p = 1.0 / (1.0 + np.exp(-x @ self.weights))
        return {item: (float(prob), owned[item]) for item, prob in zip(items, p, strict=True)}
