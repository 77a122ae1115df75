"""A user's history and its short, PII-free summary (only facts about the items, never the user)."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

from retrieval.records import Event, Product


@dataclass(frozen=True)
class History:
    user_id: str
    events: tuple[Event, ...]
    items: tuple[Product, ...]  # the products behind the events, oldest first
    summary: str

    @property
    def is_cold(self) -> bool:
        return not self.items

    @property
    def item_ids(self) -> list[str]:
        return [p.item_id for p in self.items]

    def recent(self, n: int) -> list[Product]:
        """The n most recent distinct products, newest first."""
        seen: dict[str, Product] = {}
        for product in reversed(self.items):
            seen.setdefault(product.item_id, product)
            if len(seen) == n:
                break
        return list(seen.values())


def build_history(user_id: str, events: list[Event], products: dict[str, Product]) -> History:
    items = tuple(products[e.item_id] for e in events if e.item_id in products)
    return History(user_id, tuple(events), items, summarise(items))


def _top(counter: Counter, n: int) -> str:
    return ", ".join(f"{name} ({count})" for name, count in counter.most_common(n))


def summarise(items: tuple[Product, ...] | list[Product], recent: int = 3) -> str:
    if not items:
        return "New visitor: no purchase or browsing history yet."
    departments = Counter(p.department for p in items)
    categories = Counter(p.category for p in items)
    brands = Counter(p.brand for p in items if p.brand)
    prices = [p.price for p in items if p.price is not None]
    lines = [
        f"Interacted with {len(items)} products.",
        f"Top departments: {_top(departments, 3)}.",
        f"Top categories: {_top(categories, 3)}.",
    ]
    if brands:
        lines.append(f"Favourite brands: {_top(brands, 3)}.")
    if prices:
        low, high = min(prices), max(prices)
        lines.append(f"Price band: ${low:.0f}-${high:.0f}, median ${statistics.median(prices):.0f}.")
    newest = []
    for product in reversed(items):
        if product.title not in newest:
            newest.append(product.title)
        if len(newest) == recent:
            break
    lines.append("Most recent: " + "; ".join(t[:80] for t in newest) + ".")
    return " ".join(lines)
