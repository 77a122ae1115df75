"""Who a shopper is and what they do, in one typed record: the attributes the shop gave (``homepage
ingest --users``) and behaviour tags computed by documented rules from their events.

- ``price_band``: the median price of what they interacted with, against the catalogue's price
  terciles (``low`` / ``mid`` / ``high``).
- ``top_categories`` / ``top_brands``: the three most frequent among their items.
- ``baskets``: purchases grouped by time (every event where the log has no purchases);
  ``purchase_cycle_days``: the mean gap between their basket days (two or more baskets).
- ``segment`` (recency and frequency): ``new`` (one basket), ``repeat`` (2-4), ``loyal`` (5+), and
  ``lapsed`` when their last basket is older than twice their cycle (at least 30 days) before the
  store's latest event.

Learned, where the vector store is open (the service's ``?explain=true``, ``homepage profile
--interests``): ``interests``, the three categories the embedding model places nearest the shopper —
of the ``semantic`` source's 30 products nearest their recent items, the categories weighted by
1 / rank. They may name categories the shopper never bought from.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

from retrieval.catalog import Catalog
from retrieval.history import History
from retrieval.records import Candidate, Event, Product
from retrieval.repeat import purchase_baskets

DAY = 86_400.0
LAPSED_MIN_DAYS = 30.0


@dataclass(frozen=True)
class Profile:
    user_id: str
    attributes: dict[str, str] = field(default_factory=dict)
    events: int = 0
    baskets: int = 0
    segment: str = "new visitor"
    price_band: str | None = None
    top_categories: list[str] = field(default_factory=list)
    top_brands: list[str] = field(default_factory=list)
    purchase_cycle_days: float | None = None
    last_seen: float | None = None
    interests: list[str] | None = None  # learned (with_interests); None where the vector store was not read

    def record(self) -> dict:
        return asdict(self)


def price_terciles(products: dict[str, Product]) -> tuple[float, float] | None:
    prices = sorted(p.price for p in products.values() if p.price is not None)
    if len(prices) < 3:
        return None
    return prices[len(prices) // 3], prices[2 * len(prices) // 3]


def build_profile(user_id: str, events: list[Event], attributes: dict[str, str], products: dict[str, Product],
                  latest: float | None, terciles: tuple[float, float] | None) -> Profile:
    items = [products[e.item_id] for e in events if e.item_id in products]
    if not events:
        return Profile(user_id, dict(attributes))
    baskets = purchase_baskets(events)
    days = [b[0].timestamp / DAY for b in baskets if b[0].timestamp is not None]
    cycle = (days[-1] - days[0]) / (len(days) - 1) if len(days) >= 2 else None
    last = max((e.timestamp for e in events if e.timestamp is not None), default=None)
    segment = "new" if len(baskets) == 1 else "repeat" if len(baskets) < 5 else "loyal"
    if cycle is not None and last is not None and latest is not None and \
            (latest - last) / DAY > max(2 * cycle, LAPSED_MIN_DAYS):
        segment = "lapsed"
    prices = [p.price for p in items if p.price is not None]
    band = None
    if prices and terciles:
        median = statistics.median(prices)
        band = "low" if median < terciles[0] else "mid" if median < terciles[1] else "high"
    return Profile(
        user_id, dict(attributes), len(events), len(baskets), segment, band,
        [c for c, _ in Counter(p.category for p in items if p.category).most_common(3)],
        [b for b, _ in Counter(p.brand for p in items if p.brand).most_common(3)],
        round(cycle, 1) if cycle is not None else None, last)


INTEREST_CANDIDATES, INTERESTS = 30, 3


def learned_interests(candidates: list[Candidate], products: dict[str, Product]) -> list[str]:
    """The categories of ``candidates`` (best first), weighted by 1 / rank; the top three."""
    weight: Counter = Counter()
    for rank, candidate in enumerate(candidates, 1):
        product = products.get(candidate.item_id)
        if product is not None and product.category:
            weight[product.category] += 1 / rank
    return [c for c, _ in sorted(weight.items(), key=lambda kv: (-kv[1], kv[0]))[:INTERESTS]]


def with_interests(profile: Profile, retriever, history) -> Profile:
    """The profile with what the embedding model learned of the shopper (``semantic`` source)."""
    found = retriever.source("semantic").candidates(history, INTEREST_CANDIDATES)
    return replace(profile, interests=learned_interests(found, retriever.products))


def summary_facts(history: History, recent: int = 3) -> dict:
    """What the prompt's summary template (``prompts/summary.jinja``) may say of a shopper: facts
    about their items and the rule tags their events give (never their attributes)."""
    items, events = history.items, history.events
    if not items:
        return {"products": 0, "departments": [], "categories": [], "brands": [], "price": None, "recent": [],
                "baskets": 0, "purchase_cycle_days": None, "segment": "new visitor"}

    def top(values) -> list[dict]:
        return [{"name": name, "count": count} for name, count in Counter(values).most_common(3)]

    prices = [p.price for p in items if p.price is not None]
    baskets = purchase_baskets(list(events))
    days = [b[0].timestamp / DAY for b in baskets if b[0].timestamp is not None]
    return {
        "products": len(items),
        "departments": top(p.department for p in items),
        "categories": top(p.category for p in items),
        "brands": top(p.brand for p in items if p.brand),
        "price": {"low": min(prices), "high": max(prices), "median": statistics.median(prices)} if prices else None,
        "recent": [p.title[:80] for p in _distinct_titles(items, recent)],
        "baskets": len(baskets),
        "purchase_cycle_days": round((days[-1] - days[0]) / (len(days) - 1), 1) if len(days) >= 2 else None,
        "segment": "new" if len(baskets) == 1 else "repeat" if len(baskets) < 5 else "loyal",
    }


def _distinct_titles(items, n: int) -> list[Product]:
    """The newest ``n`` items of distinct titles, newest first."""
    found: dict[str, Product] = {}
    for product in reversed(items):
        found.setdefault(product.title, product)
        if len(found) == n:
            break
    return list(found.values())


def profile_of(catalog: Catalog, user_id: str) -> Profile:
    products = catalog.products
    return build_profile(user_id, catalog.user_events(user_id), catalog.attributes(user_id), products,
                         catalog.latest_time(), price_terciles(products))
